"""Pretrained speech encoders (model.name=ssl): tiny random encoders of every family, saved
with save_pretrained, trained in each mode on real RAVDESS clips, exported with parity,
and used by `knd predict` and `knd serve` unchanged. Nothing touches the network."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bench.encoders import random_encoder

from conftest import free_port, ravdess_clips, wait_ready
from kndcli.config import load_config
from kndcli.errors import ConfigError
from kndcli.inference.bundle import load_bundle

FAMILIES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "whisper")


@pytest.fixture(scope="session")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {family: random_encoder(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def ravdess_prepared(ravdess_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real RAVDESS speech: actor 01 trains, 02 validates, 05 tests (16 kHz)."""
    from kndcli.data.prepare import prepare_dataset

    base = tmp_path_factory.mktemp("ravdess3")
    for actor in ("Actor_01", "Actor_02", "Actor_05"):
        (base / "raw" / actor).mkdir(parents=True)
        for src in sorted((ravdess_root / actor).iterdir()):
            (base / "raw" / actor / src.name).symlink_to(src)
    cfg = load_config(
        overrides=[
            "data.dataset=ravdess",
            f"data.raw={base / 'raw'}",
            f"data.prepared={base / 'prepared'}",
            "data.split.val_speakers=['02']",
            "data.split.test_speakers=['05']",
        ]
    )
    prepare_dataset(cfg)
    return base / "prepared"


def ssl_overrides(prepared: Path, out: Path, encoder: Path, mode: str, *extra: str) -> list[str]:
    return [
        f"data.prepared={prepared}",
        f"train.output_dir={out}",
        "model.name=ssl",
        f"model.encoder={encoder}",
        f"model.encoder_mode={mode}",
        "model.ensemble=1",
        "model.head_dim=16",
        "train.clip_seconds=1.5",
        "train.batch_size=16",
        "train.trainer.max_epochs=1",
        "train.trainer.limit_train_batches=2",
        "train.augment.random_crop=false",
        "train.augment.gain_db=0",
        "train.augment.speeds=[1.0]",
        "train.augment.conditions.enabled=false",
        "wandb.enabled=false",
        *extra,
    ]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every connection to anything but loopback fails, and is recorded."""
    attempts: list[tuple] = []
    connect = socket.socket.connect

    def guarded(sock: socket.socket, address: tuple) -> None:
        host = address[0] if isinstance(address, tuple) else str(address)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in (
            "127.0.0.1",
            "::1",
            "localhost",
        ):
            attempts.append(address)
            raise OSError(f"test: network access to {address} refused")
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return attempts


def _train(overrides: list[str]):
    from kndcli.training.train import train

    return train(load_config(overrides=overrides))


def _predict(bundle: Path, clips: list[Path]) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "kndcli", "predict", "--model", str(bundle), "--json"]
        + [str(c) for c in clips],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)["predictions"]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_exports_and_predicts(
    family, encoders, ravdess_prepared, ravdess_root, tmp_path, offline
) -> None:
    result = _train(ssl_overrides(ravdess_prepared, tmp_path, encoders[family], "frozen"))
    bundle = load_bundle(result.run_dir)  # every sha256 checked
    encoder = bundle.meta["encoder"]
    assert encoder["family"] == family and encoder["source"] == str(encoders[family])
    assert encoder["license"] == "apache-2.0" and encoder["revision"].startswith("local-")
    assert bundle.meta["onnx"]["parity_max_abs_diff"] < 1e-4
    assert set(bundle.meta["metrics"]) == {"val", "test"}
    clips = ravdess_clips(ravdess_root, [5])[:3]
    answers = _predict(result.run_dir, clips)
    assert [a["file"] for a in answers] == [str(c) for c in clips]
    for answer in answers:
        assert answer["label"] in bundle.labels
        assert abs(sum(answer["probabilities"].values()) - 1) < 1e-4
    assert offline == []


def _encoder_weights(bundle_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    prefix = "frontend.encoder."
    state = load_file(str(bundle_dir / "weights.safetensors"))
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _changed(before: dict, after: dict, part: str) -> bool:
    keys = [k for k in before if k.startswith(part)]
    assert keys, part
    return any(not torch.equal(before[k], after[k]) for k in keys)


@pytest.mark.parametrize(
    ("mode", "convolutions", "layers"),
    [("frozen", False, False), ("partial", False, True), ("full", True, True)],
)
def test_each_mode_trains_what_it_says(
    mode, convolutions, layers, encoders, ravdess_prepared, tmp_path
) -> None:
    from safetensors.torch import load_file

    source = load_file(str(encoders["wavlm"] / "model.safetensors"))
    result = _train(
        ssl_overrides(
            ravdess_prepared, tmp_path, encoders["wavlm"], mode,
            "model.encoder_lr=1e-3", "train.average_last=0",
        )
    )  # fmt: skip
    trained = _encoder_weights(result.run_dir)
    assert set(trained) == set(source)
    assert _changed(source, trained, "feature_extractor.") is convolutions
    assert _changed(source, trained, "encoder.layers.") is layers


def test_layers_learn_at_decayed_rates(encoders) -> None:
    from kndcli.config import ModelConfig
    from kndcli.models import build_model

    cfg = ModelConfig(name="ssl", encoder=str(encoders["wavlm"]), encoder_mode="partial")
    model = build_model(cfg, 8, 16000)
    groups = model.parameter_groups(head_lr=1e-3, encoder_lr=1e-4, decay=0.5)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4 * 0.5, 1e-4, 1e-4 * 0.25]
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)  # each trainable parameter exactly once


def test_frozen_states_are_encoded_once(encoders, ravdess_prepared, tmp_path, capfd) -> None:
    overrides = ssl_overrides(
        ravdess_prepared, tmp_path, encoders["hubert"], "frozen",
        "train.trainer.max_epochs=3", "train.trainer.limit_train_batches=1.0",
    )  # fmt: skip
    _train(overrides)
    err = capfd.readouterr().err
    # Each of the 60 training and 60 validation clips is encoded once, whatever the
    # epoch it first appears in (mixup mixes the states, not the waveforms).
    assert ", 120 encoded" in err
    cache = next((tmp_path / ".cache" / "encoder-states").iterdir())
    assert len(list(cache.glob("*.npy"))) == 120


def test_the_whisper_frontend_matches_the_feature_extractor(encoders, ravdess_root) -> None:
    import soundfile as sf
    import soxr
    from transformers import WhisperFeatureExtractor

    from kndcli.models.ssl import WhisperLogMel, encoder_spec

    audio, rate = sf.read(ravdess_clips(ravdess_root, [1])[0], dtype="float32")
    audio = soxr.resample(audio if audio.ndim == 1 else audio.mean(1), rate, 16000)[:32000]
    expected = WhisperFeatureExtractor(feature_size=80)(
        audio, sampling_rate=16000, return_tensors="np"
    ).input_features[0]
    ours = WhisperLogMel(encoder_spec("w", encoders["whisper"]))(torch.from_numpy(audio)[None])
    frames = ours.shape[-1] - 1  # the last frame sees the padding the extractor adds
    # The extractor's floor comes from 30 s padded with silence, whose peak is the clip's.
    assert np.abs(ours[0, :, :frames].numpy() - expected[:, :frames]).max() < 1e-3


def test_a_bundle_rebuilds_without_the_encoder_directory(
    encoders, ravdess_prepared, tmp_path
) -> None:
    import shutil

    from kndcli.training.export import export_bundle

    source = tmp_path / "encoder"
    shutil.copytree(encoders["data2vec-audio"], source)
    result = _train(ssl_overrides(ravdess_prepared, tmp_path / "runs", source, "frozen"))
    shutil.rmtree(source)
    report = export_bundle(result.run_dir, tmp_path / "re-exported")
    assert report["parity"] < 1e-4 and report["kept"]


def test_a_missing_model_id_says_how_to_get_it(tmp_path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "kndcli", "train", "--set", "model.name=ssl",
         "--set", "model.encoder=facebook/wav2vec2-base", "--set", f"train.output_dir={tmp_path}",
         "--set", "data.prepared=/nonexistent"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "huggingface-cli download facebook/wav2vec2-base --local-dir DIR" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_cached_hub_id_loads_offline_with_its_commit(
    encoders, tmp_path, monkeypatch, offline
) -> None:
    """The Hugging Face cache layout: an id resolves to its snapshot, whose commit is the
    revision the bundle records, with the network cut."""
    import shutil

    from kndcli.models.ssl import encoder_spec, resolve_encoder

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-wavlm"
    shutil.copytree(encoders["wavlm"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    directory = resolve_encoder("acme/tiny-wavlm")
    assert directory == repo / "snapshots" / commit
    assert encoder_spec("acme/tiny-wavlm", directory).revision == commit
    assert offline == []


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("pickle", "pytorch_model.bin, a pickle"),
        ("no-config", "no config.json"),
        ("other-model", "is a bert model"),
    ],
)
def test_encoders_knd_cannot_use_are_refused_in_one_line(encoders, tmp_path, change, words):
    import shutil

    from kndcli.config import ModelConfig
    from kndcli.models import build_model

    directory = tmp_path / "enc"
    shutil.copytree(encoders["wavlm"], directory)
    if change == "pickle":
        (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    elif change == "no-config":
        (directory / "config.json").unlink()
    else:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ConfigError, match=words):
        build_model(ModelConfig(name="ssl", encoder=str(directory)), 8, 16000)


def test_knd_serve_answers_with_an_encoder_bundle(
    encoders, ravdess_prepared, ravdess_root, tmp_path
) -> None:
    import httpx

    result = _train(ssl_overrides(ravdess_prepared, tmp_path, encoders["wav2vec2"], "partial"))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KND_ALLOW_NO_TOKEN": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kndcli", "serve", "--model", str(result.run_dir),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        clip = ravdess_clips(ravdess_root, [5])[0]
        with clip.open("rb") as handle:
            answer = httpx.post(
                f"http://127.0.0.1:{port}/predict", files={"file": (clip.name, handle)}, timeout=60
            )
        assert answer.status_code == 200, answer.text
        expected = _predict(result.run_dir, [clip])[0]
        assert answer.json()["label"] == expected["label"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_encoder_in_a_bucket_is_copied_once_and_trains(
    encoders, ravdess_prepared, tmp_path, monkeypatch
) -> None:
    """How the weights reach a Vertex AI job: model.encoder=gs://BUCKET/encoders/NAME."""
    from conftest import gcs_emulator
    from kndcli.gcs import gcs_filesystem

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with gcs_emulator(monkeypatch, "weights"):
        fs = gcs_filesystem("test")
        for path in encoders["hubert"].iterdir():
            fs.put(str(path), f"weights/encoders/tiny-hubert/{path.name}")
        source = "gs://weights/encoders/tiny-hubert"
        result = _train(ssl_overrides(ravdess_prepared, tmp_path / "runs", source, "frozen"))
    meta = load_bundle(result.run_dir).meta["encoder"]
    assert meta["source"] == source and meta["family"] == "hubert"
    copy = tmp_path / "home/.cache/knd/encoders/weights/encoders/tiny-hubert"
    assert (copy / "model.safetensors").read_bytes() == (
        encoders["hubert"] / "model.safetensors"
    ).read_bytes()


def test_a_bucket_encoder_is_copied_again_when_it_changes(encoders, tmp_path, monkeypatch):
    from conftest import gcs_emulator
    from kndcli.gcs import gcs_filesystem
    from kndcli.models.ssl import resolve_encoder

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with gcs_emulator(monkeypatch, "weights"):
        fs = gcs_filesystem("test")
        for path in encoders["wavlm"].iterdir():
            fs.put(str(path), f"weights/enc/{path.name}")
        first = resolve_encoder("gs://weights/enc")
        stamp = (first / ".complete").read_text()
        assert resolve_encoder("gs://weights/enc") == first  # unchanged: reused
        assert (first / ".complete").read_text() == stamp
        fs.pipe("weights/enc/README.md", b"---\nlicense: mit\n---\n")
        again = resolve_encoder("gs://weights/enc")
    assert again == first and (again / "README.md").read_text().startswith("---\nlicense: mit")
    assert not list(again.parent.glob(".enc.*"))  # no half-built copy left behind


def test_layerdrop_never_changes_the_stack_of_states(encoders) -> None:
    """Encoders ship with LayerDrop on (0.1 by default); a dropped layer would leave the
    head a shorter stack. Off in knd, so every training step sees every layer."""
    from kndcli.config import ModelConfig
    from kndcli.models import build_model

    model = build_model(
        ModelConfig(name="ssl", encoder=str(encoders["wavlm"]), encoder_mode="full"), 8, 16000
    )
    model.train()
    torch.manual_seed(0)
    shapes = {model.frontend(torch.randn(2, 16000) * 0.1).shape[0] for _ in range(30)}
    assert shapes == {3}


@pytest.mark.parametrize("family", ["wavlm", "whisper"])
def test_gradient_checkpointing_gives_the_same_gradients(encoders, family) -> None:
    """Memory for large models: recomputing activations must not change what is learned."""
    from kndcli.config import ModelConfig
    from kndcli.models import build_model

    grads = []
    for checkpointing in (False, True):
        cfg = ModelConfig(
            name="ssl", encoder=str(encoders[family]), encoder_mode="full", dropout=0.0,
            gradient_checkpointing=checkpointing, ensemble=1,
        )  # fmt: skip
        torch.manual_seed(0)
        model = build_model(cfg, 8, 16000).train()
        torch.manual_seed(1)
        model(torch.randn(2, 16000) * 0.1).sum().backward()
        layer = model.frontend.transformer_layers()[0]
        grads.append(next(p.grad for p in layer.parameters() if p.grad is not None).clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_a_graph_over_the_protobuf_limit_keeps_its_weights_beside_it(
    encoders, ravdess_root, tmp_path, monkeypatch
) -> None:
    """Whisper-large's encoder is 2.5 GB in fp32, over ONNX's 2 GB protobuf: its weights go
    to model.onnx.data, hashed with the bundle, and predict reads them (forced here on a
    tiny model by lowering the threshold)."""
    from bench.cases import untrained_bundle

    from kndcli.config import ModelConfig
    from kndcli.training import export

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    model = ModelConfig(name="ssl", encoder=str(encoders["whisper"]), ensemble=1, head_dim=16)
    bundle_dir = untrained_bundle(tmp_path / "large", model=model)
    bundle = load_bundle(bundle_dir)  # every file's sha256 checked, the data file too
    assert set(bundle.meta["files"]) >= {"model.onnx", "model.onnx.data"}
    assert not (bundle_dir / ".onnx-export").exists()
    [answer] = _predict(bundle_dir, ravdess_clips(ravdess_root, [5])[:1])
    assert answer["label"] in bundle.labels
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 10**12)
    report = export.export_bundle(bundle_dir, tmp_path / "small")
    assert not (tmp_path / "small" / "model.onnx.data").exists() and report["kept"]
    assert "model.onnx.data" not in load_bundle(tmp_path / "small").meta["files"]


@pytest.mark.parametrize(
    ("mode", "training"), [("frozen", False), ("partial", True), ("full", True)]
)
def test_the_encoder_trains_in_training_mode_unless_frozen(encoders, mode, training) -> None:
    """from_pretrained leaves a model in eval mode and Lightning keeps the modes it finds:
    partial and full training must still get dropout and masking."""
    from kndcli.config import ModelConfig
    from kndcli.models import build_model

    model = build_model(
        ModelConfig(name="ssl", encoder=str(encoders["hubert"]), encoder_mode=mode), 8, 16000
    )
    assert {m.training for m in model.frontend.encoder.modules()} == {training}
    model.eval().train()
    assert {m.training for m in model.frontend.encoder.modules()} == {training}


def test_whisper_windows_longer_than_its_positions_are_refused(encoders, synth_prepared) -> None:
    from kndcli.training.train import check_config

    cfg = load_config(
        overrides=[
            f"data.prepared={synth_prepared}", "model.name=ssl",
            f"model.encoder={encoders['whisper']}", "train.clip_seconds=31",
        ]
    )  # fmt: skip
    with pytest.raises(ConfigError, match="train.clip_seconds.*at most 30 s"):
        check_config(cfg)


def test_a_frozen_encoder_runs_in_fp32_under_mixed_precision(encoders) -> None:
    """Its states are what the exported fp32 graph computes, whatever the training precision."""
    from kndcli.config import ModelConfig
    from kndcli.models import build_model

    model = build_model(ModelConfig(name="ssl", encoder=str(encoders["wavlm"])), 8, 16000).train()
    x = torch.randn(2, 16000) * 0.1
    plain = model.frontend(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.frontend(x)
    assert mixed.dtype == torch.float32 and torch.equal(plain, mixed)


@pytest.mark.parametrize("name", ["/x/../../../escaped.txt", "/..", "/a/..\\..\\b", "/"])
def test_a_bucket_object_named_to_escape_the_copy_is_refused(name):
    """Whoever can write to the bucket names its objects: one whose name climbs out of
    the encoder prefix must not be written outside the local copy. (The GCS emulator
    drops the connection on such names, so the name check is tested on its own.)"""
    from kndcli.models.ssl import _inside_folder

    with pytest.raises(ConfigError, match="points outside the encoder's folder"):
        _inside_folder(name, "gs://weights/enc")
    assert str(_inside_folder("/sub/./model.safetensors", "gs://w/e")) == "sub/model.safetensors"
