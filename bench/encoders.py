"""Pretrained-encoder backbones (model.name=ssl) against the default CNN, on this CPU.

No weights can be downloaded here, so the encoders are random-initialised with the real
architectures: `tiny` (2 layers of 32, what the tests use) and `base` (transformers'
default config of the family: WavLM-base-plus's 12 layers of 768, 94 M parameters).
Speed, memory and size depend on the architecture, not the weights; accuracy does not,
so none is claimed here (docs/quality.md has the published figures).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import BenchResult, Figure, knd_command, stats, timed_run

FAMILY_CLASSES = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
    "hubert": ("HubertConfig", "HubertModel"),
    "wavlm": ("WavLMConfig", "WavLMModel"),
    "data2vec-audio": ("Data2VecAudioConfig", "Data2VecAudioModel"),
}
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": (16, 16, 16),
    "conv_stride": (5, 4, 4),
    "conv_kernel": (10, 8, 4),
}


def random_encoder(family: str, out: Path, size: str = "tiny", license: str = "apache-2.0") -> Path:
    """A random-initialised encoder of `family` in the save_pretrained layout, with its
    feature-extractor settings and a model card (for tests and this benchmark)."""
    import torch
    import transformers as tf

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    if family == "whisper":
        small = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2}
        config = tf.WhisperConfig(
            **(small if size == "tiny" else {}),
            encoder_ffn_dim=64 if size == "tiny" else 1536,
            decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=64,
            max_target_positions=16, pad_token_id=1, bos_token_id=2, eos_token_id=3,
            decoder_start_token_id=2,
        )  # fmt: skip
        tf.WhisperModel(config).save_pretrained(out)
        tf.WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    else:
        config_name, model_name = FAMILY_CLASSES[family]
        fields: dict[str, Any] = dict(TINY) if size == "tiny" else {}
        if size == "tiny" and family != "data2vec-audio":
            fields["num_conv_pos_embeddings"] = 16
        config = getattr(tf, config_name)(**fields)
        getattr(tf, model_name)(config).save_pretrained(out)
        normalize = family in ("wav2vec2", "data2vec-audio")
        tf.Wav2Vec2FeatureExtractor(do_normalize=normalize).save_pretrained(out)
    (out / "README.md").write_text(f"---\nlicense: {license}\n---\n# random {size} {family}\n")
    return out


def _ssl_overrides(prepared: Path, encoder: Path, mode: str, batch: int) -> list[str]:
    return [
        f"data.prepared={prepared}",
        "model.name=ssl",
        f"model.encoder={encoder}",
        f"model.encoder_mode={mode}",
        "model.ensemble=1",
        f"train.batch_size={batch}",
    ]


def _train_rates(overrides: list[str], steps: int) -> list[float]:
    from kndcli.config import load_config
    from kndcli.profiling import profile_train

    cfg = load_config(overrides=overrides)
    report = profile_train(cfg, steps=steps, warmup=1, profile_ops=False)
    return [s["samples"] / (s["data_s"] + s["compute_s"]) for s in report["per_step"]]


def _cached_head_rates(prepared: Path, encoder: Path, batch: int, steps: int) -> list[float]:
    """Frozen mode once the states are cached: one batch encoded, then head-only steps on
    it with every state read from the cache (what every epoch after the first costs)."""
    import torch

    from kndcli.config import load_config
    from kndcli.data.store import PreparedSet
    from kndcli.models.ssl import FeatureCache
    from kndcli.training.data import PreparedDataModule
    from kndcli.training.module import EmotionClassifier
    from kndcli.training.train import training_labels

    cfg = load_config(overrides=_ssl_overrides(prepared, encoder, "frozen", batch))
    data = PreparedSet.open(cfg.data.prepared)
    labels = training_labels(cfg, data)
    module = EmotionClassifier.from_config(cfg, labels, data.sample_rate)
    module.train()
    x, y, speaker = next(iter(PreparedDataModule(data, labels, cfg.train).train_dataloader()))
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        module.model.frontend.cache = FeatureCache(Path(tmp), "bench", 2**34)
        for step in range(steps + 1):  # the first encodes and stores, the rest read
            start = time.perf_counter()
            loss = module.training_step((x, y, speaker), step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step:
                rates.append(len(x) / (time.perf_counter() - start))
    return rates


def _bundle_mb(bundle: Path) -> float:
    return sum(p.stat().st_size for p in bundle.iterdir() if p.is_file()) / 1e6


def bench_encoders(ctx: Any) -> BenchResult:
    from bench.cases import untrained_bundle
    from kndcli.config import ModelConfig

    prepared = ctx.prepared()
    sizes = ["tiny"] if ctx.quick else ["tiny", "base"]
    steps = 1 if ctx.quick else 3
    cnn_rates = _train_rates([f"data.prepared={prepared}", "train.batch_size=8"], steps)
    cnn_bundle = untrained_bundle(ctx.work / "bundle-untrained")
    clips = ctx.speech_clips(1 if ctx.quick else 20)
    cold = [str(clips[0])]
    cnn_cold = [timed_run([*knd_command(), "predict", "-m", str(cnn_bundle), *cold])]
    cnn_cold += [
        timed_run([*knd_command(), "predict", "-m", str(cnn_bundle), *cold])
        for _ in range(ctx.reps - 1)
    ]
    many = [str(c) for c in clips]
    cnn_many = [timed_run([*knd_command(), "predict", "-m", str(cnn_bundle), *many])]
    cnn_note = "default CNN (2-member ensemble), same batch, same clips"
    figures: list[Figure] = []
    details: dict[str, Any] = {"cnn_bundle_mb": _bundle_mb(cnn_bundle)}
    for size in sizes:
        encoder = random_encoder("wavlm", ctx.work / "encoders" / f"wavlm-{size}", size)
        batch = 8
        for mode in ("frozen", "partial", "full"):
            rates = _train_rates(_ssl_overrides(prepared, encoder, mode, batch), steps)
            figures.append(
                Figure(
                    f"training throughput, WavLM-{size} {mode} (batch {batch}, 3 s clips)",
                    "clips/s",
                    "higher",
                    stats(rates),
                    stats(cnn_rates),
                    cnn_note,
                    note="frozen: the encoder runs on each input (first epoch)"
                    if mode == "frozen"
                    else "",
                )
            )
        cached = _cached_head_rates(prepared, encoder, batch, steps)
        figures.append(
            Figure(
                f"training throughput, WavLM-{size} frozen, states cached (later epochs)",
                "clips/s",
                "higher",
                stats(cached),
                stats(cnn_rates),
                cnn_note,
            )
        )
        model = ModelConfig(name="ssl", encoder=str(encoder), ensemble=1)
        bundle_dir = ctx.work / f"bundle-wavlm-{size}"
        shutil.rmtree(bundle_dir, ignore_errors=True)
        bundle = untrained_bundle(bundle_dir, model=model, name=f"wavlm-{size}")
        knd_cold = [
            timed_run([*knd_command(), "predict", "-m", str(bundle), *cold])
            for _ in range(ctx.reps)
        ]
        figures.append(
            Figure(
                f"knd predict one clip, cold, WavLM-{size} bundle",
                "s",
                "lower",
                stats(knd_cold),
                stats(cnn_cold),
                "default CNN bundle, same clip",
            )
        )
        knd_many = timed_run([*knd_command(), "predict", "-m", str(bundle), *many])
        figures.append(
            Figure(
                f"knd predict {len(many)} clips in one process, WavLM-{size}",
                "clips/s",
                "higher",
                stats([len(many) / knd_many]),
                stats([len(many) / s for s in cnn_many]),
                "default CNN bundle, same clips",
            )
        )
        details[f"wavlm_{size}_bundle_mb"] = _bundle_mb(bundle)
        figures.append(
            Figure(
                f"bundle size, WavLM-{size} (ONNX + safetensors + reference)",
                "MB",
                "lower",
                stats([_bundle_mb(bundle)]),
                stats([details["cnn_bundle_mb"]]),
                "default CNN bundle",
            )
        )
    return BenchResult(
        "encoders",
        figures,
        details=details,
        notes=[
            "encoders are random-initialised real architectures (no weights can be "
            "downloaded here): speed, memory and size are the real ones, accuracy is not",
            "training: the real LightningModule over the real train loader "
            "(profile_train); predict: the installed knd console script, ONNX Runtime",
            f"python {sys.version.split()[0]}",
        ],
    )
