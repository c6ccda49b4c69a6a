"""`knd train` / `knd evaluate` on generated audio: bundle, tracking, resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kndcli.cli.main import app
from kndcli.config import InferenceConfig, load_config
from kndcli.data.store import PreparedSet
from kndcli.errors import ConfigError
from kndcli.inference.bundle import BundleError, load_bundle
from kndcli.inference.predictor import Predictor
from kndcli.inference.windowing import center_fit

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.channels=8",
    "train.clip_seconds=1.5",
    "train.batch_size=16",
    "train.trainer.max_epochs=2",
    "train.trainer.limit_train_batches=4",
    "train.trainer.log_every_n_steps=1",
]


def tiny_overrides(prepared: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.prepared={prepared}", f"train.output_dir={out}", *TINY, *extra]


def as_sets(overrides: list[str]) -> list[str]:
    """`key=value` overrides as the CLI takes them: `--set key=value` each."""
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(scope="module")
def trained_run(synth_prepared: Path, tmp_path_factory: pytest.TempPathFactory):
    from kndcli.training.train import train

    out = tmp_path_factory.mktemp("runs")
    saved_key = os.environ.pop("WANDB_API_KEY", None)
    try:
        result = train(
            load_config(overrides=tiny_overrides(synth_prepared, out, "train.run_name=t1"))
        )
    finally:
        if saved_key is not None:
            os.environ["WANDB_API_KEY"] = saved_key
    return result


def test_train_writes_a_complete_bundle(trained_run):
    run = trained_run.run_dir
    bundle = load_bundle(run)  # verifies every sha256
    meta = bundle.meta
    assert meta["labels"] == [
        "neutral",
        "calm",
        "happy",
        "sad",
        "angry",
        "fearful",
        "disgust",
        "surprised",
    ]
    assert meta["sample_rate"] == 16000 and meta["clip_seconds"] == 1.5
    assert meta["model"]["name"] == "cnn" and meta["model"]["channels"] == 8
    assert meta["trim_silence"] is True and meta["trim_method"] == "energy"
    assert set(meta["files"]) == {"model.onnx", "weights.safetensors", "reference.parquet"}
    assert meta["onnx"]["parity_max_abs_diff"] < 1e-4
    assert meta["versions"]["torch"].startswith("2.11")
    assert meta["data"]["clips"] == {"train": 120, "val": 60, "test": 60}
    for split in ("val", "test"):
        m = meta["metrics"][split]
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["uar"] <= 1 and m["n_clips"] == 60
    for name in (
        "config.yaml",
        "learning_curve.png",
        "confusion_val.png",
        "eval/test_confusion.png",
        "eval/test_metrics.json",
        "logs/metrics.csv",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
    ):
        assert (run / name).is_file(), name
    assert (run.parent / "latest").resolve() == run.resolve()


def test_wandb_runs_offline_without_a_key(trained_run):
    offline = list((trained_run.run_dir / "wandb").glob("offline-run-*"))
    assert offline, "no offline W&B run directory"
    assert not list((trained_run.run_dir / "wandb").glob("run-*"))


def test_reference_table_holds_train_features_and_val_predictions(trained_run):
    import pandas as pd

    ref = pd.read_parquet(trained_run.run_dir / "reference.parquet")
    assert (ref["source"] == "train").sum() == 120
    val = ref[ref["source"] == "val"]
    assert len(val) == 60 and val["predicted"].notna().all()
    assert ((val["confidence"] > 0) & (val["confidence"] <= 1)).all()


def test_onnx_and_torch_agree_on_real_clips(trained_run, synth_prepared):
    ps = PreparedSet.open(synth_prepared)
    clips = [center_fit(ps.waveform(i), 24000) for i in ps.indices("test")[:6]]
    onnx = Predictor.from_config(trained_run.run_dir)
    torch_backend = Predictor.from_config(trained_run.run_dir, InferenceConfig(backend="torch"))
    batch = np.stack(clips).astype(np.float32)
    assert np.abs(onnx._run(batch) - torch_backend._run(batch)).max() < 1e-4


def test_tampered_bundle_is_refused(trained_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(
        trained_run.run_dir, copy, ignore=shutil.ignore_patterns("wandb", "checkpoints")
    )
    with (copy / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="sha256 .* does not match"):
        load_bundle(copy)


def test_evaluate_cli_matches_bundle_metrics(trained_run, synth_prepared):
    result = CliRunner().invoke(app, ["evaluate", "-m", str(trained_run.run_dir), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    expected = load_bundle(trained_run.run_dir).meta["metrics"]["test"]
    assert summary["accuracy"] == pytest.approx(expected["accuracy"])
    assert summary["per_speaker"].keys() == {"03"}
    assert np.array(summary["confusion"]).sum() == 60
    # What chance alone puts into ECE on 60 clips: several points, never zero.
    assert 0.02 < summary["calibration"]["ece_if_calibrated"] < 0.2


def test_unknown_model_is_a_config_error(synth_prepared, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kndcli",
            "train",
            *as_sets(tiny_overrides(synth_prepared, tmp_path, "model.name=transformer9000")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown model 'transformer9000'" in proc.stderr


def _knd(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in (env or os.environ).items() if k != "WANDB_API_KEY"}
    return subprocess.Popen(
        [sys.executable, "-m", "kndcli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kwargs,
    )


@pytest.mark.slow
def test_resume_after_sigkill(synth_prepared, tmp_path):
    import torch

    epochs = 8
    args = [
        "train",
        *as_sets(
            tiny_overrides(
                synth_prepared,
                tmp_path,
                "train.run_name=killed",
                f"train.trainer.max_epochs={epochs}",
                "wandb.enabled=false",
                "train.trainer.limit_train_batches=1.0",
            )
        ),
    ]
    proc = _knd(*args)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert last.exists(), proc.stdout.read() if proc.poll() is not None else "no checkpoint"
    time.sleep(0.3)  # into the next epoch
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert killed_at < epochs - 1, "killed too late to test a resume"
    assert not (tmp_path / "killed" / "bundle.json").exists()

    resumed = _knd("train", "--resume", str(tmp_path / "killed"))
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    meta = load_bundle(tmp_path / "killed").meta
    assert meta["training"]["resumed_from"].endswith("last.ckpt")
    assert meta["training"]["epochs"] == epochs


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(synth_prepared, tmp_path):
    proc = _knd(
        "train",
        *as_sets(
            tiny_overrides(
                synth_prepared,
                tmp_path,
                "train.run_name=ddp",
                "wandb.enabled=false",
                "train.trainer.strategy=ddp",
                "train.trainer.devices=2",
                "train.trainer.accelerator=cpu",
            )
        ),
    )
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    meta = load_bundle(tmp_path / "ddp").meta
    assert meta["training"]["world_size"] == 2


def test_vtlp_moves_formants_and_only_in_training():
    import torch

    from kndcli.config import ModelConfig
    from kndcli.models.frontend import LogMel, warp_frequencies

    power = torch.zeros(2, 257, 3)
    power[:, 100] = 1.0
    warped = warp_frequencies(power, torch.tensor([1.1, 1.0]))
    assert int(warped[0, :, 0].argmax()) == 110  # a formant at bin 100 moves up by 10 %
    assert torch.equal(warped[1], power[1])  # alpha 1 leaves the clip alone

    frontend = LogMel(ModelConfig(vtlp=0.2, freq_masks=0, time_masks=0), 16000)
    wave = torch.randn(4, 16000)
    frontend.eval()
    assert torch.equal(frontend(wave), frontend(wave))
    frontend.train()
    assert not torch.allclose(frontend(wave), frontend(wave))


def test_spec_augment_masks_each_clip_of_a_batch_on_its_own_and_only_in_training():
    import torch

    from kndcli.config import ModelConfig
    from kndcli.models.frontend import LogMel

    cfg = ModelConfig(freq_masks=1, time_masks=1)
    frontend = LogMel(cfg, 16000)
    wave = torch.randn(8, 48000)
    torch.manual_seed(0)
    masked = frontend.train()(wave)[:, 0] == 0  # (clips, mels, frames)
    bands = [tuple(m.all(dim=1).nonzero().flatten().tolist()) for m in masked]
    frames = [tuple(m.all(dim=0).nonzero().flatten().tolist()) for m in masked]
    assert len(set(bands)) > 4 and len(set(frames)) > 4  # not one mask for the batch
    assert max(len(b) for b in bands) <= cfg.freq_mask_width
    assert max(len(f) for f in frames) <= cfg.time_mask_width
    assert not (frontend.eval()(wave) == 0).any()


def test_pcen_smooths_like_the_first_order_filter_and_ignores_channel_gain():
    import numpy as np
    import scipy.signal
    import torch

    from kndcli.models.frontend import PCEN

    pcen = PCEN(bands=3, hop_s=0.016)
    energy = torch.rand(2, 3, 400, dtype=torch.float64).float() + 0.05
    s = 1 - pcen.decay
    iir = scipy.signal.lfilter([s], [1, -(1 - s)], energy.numpy(), axis=-1)
    started = 1 - (1 - s) ** (np.arange(400) + 1)  # the weight a zero-state filter has seen
    smoothed = pcen.smooth(energy).numpy()
    assert np.abs(smoothed - iir / started).max() < 1e-3 * iir.max()

    # A stationary noise floor over a 40 dB range of gains comes out within a fifth of its
    # level (automatic gain control), where the log moves by 9.2; a burst stands out.
    floor = torch.rand(1, 3, 400) + 0.5
    burst = floor.clone()
    burst[..., 300:320] *= 30
    with torch.no_grad():
        outs = [pcen(floor * g)[..., 200:].mean().item() for g in (1e-2, 1.0, 1e2)]
        peak = pcen(burst)[..., 300:320].mean().item()
    assert max(outs) - min(outs) < 0.2 * outs[1]
    assert peak > 3 * outs[1]


def test_a_pcen_model_trains_and_exports_with_parity(synth_prepared, tmp_path):
    from kndcli.config import ModelConfig
    from kndcli.models.frontend import LogMel
    from kndcli.training.train import train

    with pytest.raises(ConfigError, match="model.compression"):
        LogMel(ModelConfig(compression="cube-root"), 16000)
    cfg = load_config(
        overrides=tiny_overrides(
            synth_prepared, tmp_path, "train.run_name=pcen", "model.compression=pcen"
        )
    )
    result = train(cfg)
    meta = load_bundle(result.run_dir).meta
    assert meta["model"]["compression"] == "pcen"
    assert meta["onnx"]["parity_max_abs_diff"] < 1e-4


def test_speaker_adversarial_head_trains_and_stays_out_of_the_bundle(synth_prepared, tmp_path):
    import csv

    from safetensors import safe_open

    from kndcli.training.train import train

    cfg = load_config(
        overrides=tiny_overrides(
            synth_prepared,
            tmp_path,
            "train.run_name=adv",
            "train.speaker_adversarial=1.0",
            "model.ensemble=1",
        )
    )
    result = train(cfg)
    rows = list(csv.DictReader((result.run_dir / "logs" / "metrics.csv").open()))
    losses = [float(r["train/speaker_loss"]) for r in rows if r.get("train/speaker_loss")]
    assert losses and all(np.isfinite(losses))
    with safe_open(str(result.run_dir / "weights.safetensors"), "pt") as weights:
        assert not any("speaker" in key for key in weights.keys())  # noqa: SIM118
    assert load_bundle(result.run_dir).meta["onnx"]["parity_max_abs_diff"] < 1e-4


def test_weight_averaging_exports_the_averaged_model(synth_prepared, tmp_path):
    import torch

    from kndcli.training.train import train

    cfg = load_config(
        overrides=tiny_overrides(
            synth_prepared,
            tmp_path,
            "train.run_name=avg",
            "train.average_last=0.5",
            "train.trainer.max_epochs=4",
            "model.ensemble=1",  # the key below names a single backbone's layer
        )
    )
    result = train(cfg)
    averaged = result.run_dir / "checkpoints" / "averaged.ckpt"
    assert result.best_checkpoint == str(averaged)
    saved = torch.load(averaged, weights_only=True)
    assert saved["averaged_epochs"] == 2
    last = torch.load(result.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 3  # the last epoch, whether or not it was the best
    assert last["callbacks"]["WeightAveraging"]["count"] == 2  # a resumed run keeps the mean
    bn = "model.backbone.features.1.running_mean"
    assert not torch.equal(saved["state_dict"][bn], last["state_dict"][bn])  # re-estimated
    assert load_bundle(result.run_dir).meta["onnx"]["parity_max_abs_diff"] < 1e-4


@pytest.mark.parametrize(
    "override",
    [
        "train.average_last=1.0",
        "train.speaker_adversarial=-1",
        "train.fit_splits=[val,test]",
        "model.ensemble=0",
    ],
)
def test_bad_training_options_are_config_errors(synth_prepared, tmp_path, override):
    from kndcli.training.train import check_config

    cfg = load_config(overrides=tiny_overrides(synth_prepared, tmp_path, override))
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        check_config(cfg)


def test_speaker_adversarial_with_an_ensemble_is_a_config_error(synth_prepared, tmp_path):
    from kndcli.training.train import check_config

    extra = ("train.speaker_adversarial=0.5", "model.ensemble=2")
    cfg = load_config(overrides=tiny_overrides(synth_prepared, tmp_path, *extra))
    with pytest.raises(ConfigError, match="train.speaker_adversarial"):
        check_config(cfg)


def test_refit_on_test_speakers_reports_no_test_figures(synth_prepared, tmp_path):
    from kndcli.errors import KndError
    from kndcli.inference.evaluate import evaluate_predictor
    from kndcli.training.train import train

    cfg = load_config(
        overrides=tiny_overrides(
            synth_prepared, tmp_path, "train.run_name=refit", "train.fit_splits=[train,test]"
        )
    )
    result = train(cfg)
    prepared = PreparedSet.open(synth_prepared)
    meta = load_bundle(result.run_dir).meta
    assert meta["data"]["fit_splits"] == ["train", "test"]
    assert meta["data"]["clips"]["train"] == len(prepared.indices("train")) + len(
        prepared.indices("test")
    )
    assert meta["data"]["speakers"]["test"] == []
    assert set(result.metrics) == {"val"}
    predictor = Predictor(load_bundle(result.run_dir))
    with pytest.raises(KndError, match="trained on the 'test' split"):
        evaluate_predictor(predictor, prepared, "test")
    assert evaluate_predictor(predictor, prepared, "val").n_clips == len(prepared.indices("val"))


@pytest.fixture
def prepared_without_val(synth_prepared: Path, tmp_path: Path) -> Path:
    """synth_prepared with its validation speaker moved into train."""
    import csv
    import shutil

    out = tmp_path / "noval"
    shutil.copytree(synth_prepared, out)
    rows = list(csv.DictReader((out / "manifest.csv").open(newline="")))
    for row in rows:
        row["split"] = "train" if row["split"] == "val" else row["split"]
    with (out / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_training_without_a_validation_split_ships_the_averaged_weights(
    prepared_without_val, tmp_path
):
    from kndcli.training.train import train

    cfg = load_config(
        overrides=tiny_overrides(
            prepared_without_val,
            tmp_path,
            "train.run_name=noval",
            "train.average_last=0.5",
            "train.trainer.max_epochs=2",
        )
    )
    result = train(cfg)
    assert result.best_checkpoint.endswith("averaged.ckpt")
    assert set(result.metrics) == {"test"}
    assert not (result.run_dir / "checkpoints" / "best.ckpt").exists()
    assert load_bundle(result.run_dir).meta["onnx"]["parity_max_abs_diff"] < 1e-4


def test_early_stopping_without_a_validation_split_is_a_config_error(
    prepared_without_val, tmp_path
):
    from kndcli.training.train import train

    cfg = load_config(
        overrides=tiny_overrides(prepared_without_val, tmp_path, "train.early_stopping_patience=3")
    )
    with pytest.raises(ConfigError, match="early_stopping_patience.*has none"):
        train(cfg)


def test_ensemble_bundle_outputs_the_members_geometric_mean(synth_prepared, tmp_path):
    """The members' mean log-probability, so the bundle's temperature acts on the ensemble
    exactly as on each member; bundles without `ensemble_mean` still average probabilities."""
    import onnxruntime as ort
    import torch
    from safetensors.torch import load_file

    from kndcli.config import ModelConfig
    from kndcli.inference.calibration import apply_temperature
    from kndcli.models import build_model
    from kndcli.training.train import train

    cfg = load_config(
        overrides=tiny_overrides(synth_prepared, tmp_path, "train.run_name=ens", "model.ensemble=2")
    )
    run_dir = train(cfg).run_dir
    bundle = load_bundle(run_dir)
    assert bundle.meta["model"]["ensemble"] == 2
    assert bundle.meta["onnx"]["parity_max_abs_diff"] < 1e-4

    model = build_model(ModelConfig(**bundle.meta["model"]), len(bundle.labels), 16000)
    model.load_state_dict(load_file(str(run_dir / "weights.safetensors")))
    model.eval()
    members = model.backbone.members
    assert not torch.equal(members[0].head[1].weight, members[1].head[1].weight)
    prepared = PreparedSet.open(synth_prepared)
    test = prepared.indices("test")[:4]
    clips = np.stack([center_fit(prepared.waveform(i), 24000) for i in test]).astype(np.float32)
    with torch.no_grad():
        mel = model.frontend(torch.from_numpy(clips))
        logits = torch.stack([m(mel) for m in members])
    session = ort.InferenceSession(str(run_dir / "model.onnx"))
    onnx_probs = session.run(None, {session.get_inputs()[0].name: clips})[0]
    geometric = torch.softmax(torch.log_softmax(logits, -1).mean(0), -1).numpy()
    assert np.allclose(onnx_probs, geometric, atol=1e-4)
    cooled = torch.softmax(torch.log_softmax(logits / 0.7, -1).mean(0), -1).numpy()
    assert np.allclose(apply_temperature(onnx_probs, 0.7), cooled, atol=1e-4)

    del bundle.meta["model"]["ensemble_mean"]  # as written before the key existed
    with torch.no_grad():
        legacy = torch.softmax(bundle.torch_model()(torch.from_numpy(clips)), -1).numpy()
    arithmetic = torch.softmax(logits, -1).mean(0).numpy()
    assert np.allclose(legacy, arithmetic, atol=1e-5)
    assert not np.allclose(legacy, geometric, atol=1e-3)


def test_an_ensemble_of_zero_members_is_a_config_error():
    from kndcli.config import ModelConfig
    from kndcli.models import build_model

    with pytest.raises(ConfigError, match="model.ensemble"):
        build_model(ModelConfig(ensemble=0), 8, 16000)
    with pytest.raises(ConfigError, match="model.ensemble_mean"):
        build_model(ModelConfig(ensemble_mean="median"), 8, 16000)


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from kndcli.training.train import cpu_has_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert cpu_has_bf16(cpuinfo)  # Intel Sapphire Rapids
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert cpu_has_bf16(cpuinfo)  # AMD Zen 4
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert not cpu_has_bf16(cpuinfo)
    assert not cpu_has_bf16(tmp_path / "missing")


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_precision_is_bf16_on_a_cpu_only_with_native_bf16(monkeypatch, bf16):
    import torch

    from kndcli.training import train as train_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: bf16)
    expected = "bf16-mixed" if bf16 else "32-true"
    assert train_module.resolve_precision("auto", "auto") == expected
    assert train_module.resolve_precision("auto", "cpu") == expected
    assert train_module.resolve_precision("32-true", "auto") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_module.resolve_precision("auto", "gpu") == "bf16-mixed"


def test_bf16_training_keeps_the_features_in_fp32_and_exports_fp32(synth_prepared, tmp_path):
    import torch

    from kndcli.config import ModelConfig
    from kndcli.models.frontend import LogMel
    from kndcli.training.train import train

    frontend = LogMel(ModelConfig(freq_masks=0, time_masks=0), 16000).eval()
    wave = torch.randn(2, 16000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = frontend(wave)
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, frontend(wave), atol=1e-5)

    cfg = load_config(
        overrides=tiny_overrides(
            synth_prepared, tmp_path, "train.run_name=bf16", "train.trainer.precision=bf16-mixed"
        )
    )
    result = train(cfg)
    assert load_bundle(result.run_dir).meta["onnx"]["parity_max_abs_diff"] < 1e-4


def test_a_bundle_written_before_ensembles_loads_as_one_backbone(tmp_path):
    """Bundles from before `model.ensemble` existed have no such key and one backbone."""
    from dataclasses import asdict

    from kndcli.config import LABELS, ModelConfig
    from kndcli.inference.bundle import BundleMeta, update_bundle
    from kndcli.models import build_model
    from kndcli.training.export import write_bundle

    cfg = ModelConfig(channels=8, ensemble=1)
    meta = BundleMeta(
        name="old",
        labels=list(LABELS),
        sample_rate=16000,
        clip_seconds=1.0,
        trim_silence=False,
        model=cfg,
    )
    clips = np.random.default_rng(0).standard_normal((2, 16000)).astype(np.float32) * 0.1
    write_bundle(build_model(cfg, len(LABELS), 16000), tmp_path / "old", meta, clips)
    legacy = {k: v for k, v in asdict(cfg).items() if k != "ensemble"}
    update_bundle(tmp_path / "old", {"model": legacy})  # as written before ensembles
    onnx = Predictor.from_config(tmp_path / "old")
    torch_backend = Predictor.from_config(tmp_path / "old", InferenceConfig(backend="torch"))
    assert np.abs(onnx._run(clips) - torch_backend._run(clips)).max() < 1e-4


def test_training_fits_a_temperature_on_the_validation_speakers(trained_run):
    meta = load_bundle(trained_run.run_dir).meta
    calibration = meta["calibration"]
    assert calibration["method"] == "temperature" and calibration["temperature"] > 0
    assert calibration["fitted_on"]["speakers"] == ["02"]
    assert calibration["fitted_on"]["copies"] == ["clean", "degraded"]
    assert calibration["after"]["nll"] <= calibration["before"]["nll"] + 1e-9
    assert 0 <= meta["metrics"]["test"]["ece"] <= 1
    for name in ("test_reliability.png", "test_coverage.png"):
        assert (trained_run.run_dir / "eval" / name).stat().st_size > 1000


def test_robustness_report_is_deterministic_and_drawn(trained_run, synth_prepared, tmp_path):
    suite = [
        "robustness.white_snr_db=[0]",
        "robustness.pink_snr_db=[]",
        "robustness.brown_snr_db=[]",
        "robustness.babble_snr_db=[10]",
        "robustness.rt60_s=[0.6]",
        "robustness.rooms_per_level=2",
        "robustness.telephone=[mulaw]",
        "robustness.mp3_kbps=[32]",
        "robustness.opus_kbps=[]",
        "robustness.lowpass_hz=[8000]",  # above nothing in 16 kHz clips: skipped, said why
        "robustness.clipping_drive_db=[]",
    ]
    command = [
        sys.executable, "-m", "kndcli", "evaluate", "-m", str(trained_run.run_dir),
        "--prepared", str(synth_prepared), "--robustness", "--json", "--out", str(tmp_path),
        *as_sets(suite),
    ]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    report, repeat = json.loads(first.stdout), json.loads(again.stdout)
    names = [row["condition"] for row in report["conditions"]]
    assert names == [
        "clean",
        "white 0 dB SNR",
        "babble 10 dB SNR",
        "reverb 0.6 s RT60",
        "telephone mulaw",
        "mp3 32 kbit/s",
    ]
    assert report["skipped"] == [
        "lowpass 8000 Hz: the 16000 Hz clips hold nothing above 8000 Hz, so it would change nothing"
    ]
    assert [r["accuracy"] for r in report["conditions"]] == [
        r["accuracy"] for r in repeat["conditions"]
    ]
    clean = report["conditions"][0]["accuracy"]
    expected = load_bundle(trained_run.run_dir).meta["metrics"]["test"]["accuracy"]
    assert clean == pytest.approx(expected)
    assert (tmp_path / "robustness.png").stat().st_size > 1000
    assert json.loads((tmp_path / "robustness.json").read_text()) == report


def test_bad_robustness_level_is_one_line_exit_2(trained_run, synth_prepared):
    result = subprocess.run(
        [sys.executable, "-m", "kndcli", "evaluate", "-m", str(trained_run.run_dir), "--prepared",
         str(synth_prepared), "--robustness", "--set", "robustness.rt60_s=[9]"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "robustness.rt60_s" in result.stderr and "Traceback" not in result.stderr


def _noisy_datamodule(prepared: Path, *extra: str):
    """A DataModule whose every training clip is mixed with white noise at 0 dB SNR."""
    from kndcli.training.data import PreparedDataModule

    cfg = load_config(
        overrides=[
            f"data.prepared={prepared}",
            "train.clip_seconds=1.0",
            "train.trim_silence=false",
            "train.augment.gain_db=0",
            "train.augment.speeds=[1.0]",
            "train.augment.conditions.noise_prob=1.0",
            "train.augment.conditions.noise_types=[white]",
            "train.augment.conditions.snr_db=[0,0]",
            "train.augment.conditions.reverb_prob=0",
            "train.augment.conditions.telephone_prob=0",
            "train.augment.conditions.lowpass_prob=0",
            "train.augment.conditions.clipping_prob=0",
            "train.augment.conditions.codec_prob=0",
            *extra,
        ]
    )
    prepared_set = PreparedSet.open(prepared)
    labels = sorted({row["label"] for row in prepared_set.rows})
    return PreparedDataModule(prepared_set, labels, cfg.train), prepared_set


def _found_in(window: np.ndarray, copies: list[np.ndarray]) -> bool:
    """Whether `window` is a contiguous stretch of one of `copies`."""
    for copy in copies:
        copy = copy.astype(np.float32)
        for start in np.flatnonzero(copy[: len(copy) - len(window) + 1] == window[0]):
            if np.array_equal(copy[start : start + len(window)], window):
                return True
    return False


def test_rendered_copies_are_degraded_once_and_drawn_every_epoch(synth_prepared):
    module, prepared = _noisy_datamodule(synth_prepared, "train.augment.conditions.variants=3")
    train_indices = prepared.indices("train")
    rendered = module.rendered
    assert sorted(rendered.copies) == sorted(train_indices)
    index = train_indices[0]
    clean = prepared.waveform(index).astype(np.float64)
    copies = rendered.copies[index]
    assert len(copies) == 3
    for copy in copies:  # each copy carries its own 0 dB noise: residual power ~ speech power
        noise = copy.astype(np.float64) - clean
        assert 10 * np.log10(np.mean(clean[np.abs(clean) > 0] ** 2) / np.mean(noise**2)) < 6
    assert not np.array_equal(copies[0], copies[1])
    again, _ = _noisy_datamodule(synth_prepared, "train.augment.conditions.variants=3")
    np.testing.assert_array_equal(again.rendered.copies[index][2], copies[2])

    dataset = module.dataset("train")
    drawn = set()
    for epoch in range(6):
        dataset.epoch = epoch
        window = dataset[0][0].numpy()
        assert _found_in(window, copies)  # training reads a rendered copy, not fresh noise
        drawn.add(next(k for k, c in enumerate(copies) if _found_in(window, [c])))
    assert len(drawn) > 1  # and a different copy in different epochs


def test_snr_curriculum_draws_only_copies_above_the_epochs_floor(synth_prepared):
    module, prepared = _noisy_datamodule(
        synth_prepared,
        "train.augment.conditions.variants=6",
        "train.augment.conditions.snr_db=[0,30]",
        "train.augment.conditions.snr_curriculum=0.5",
        "train.trainer.max_epochs=10",
    )
    rendered = module.rendered
    dataset = module.dataset("train")
    index = dataset.indices[0]
    copies, snrs = rendered.copies[index], rendered.snrs[index]
    floor = float(np.median(snrs))
    mild = [c for c, snr in zip(copies, snrs, strict=True) if snr >= floor]
    harsh = [c for c, snr in zip(copies, snrs, strict=True) if snr < floor]
    assert mild and harsh
    dataset.snr_floor = floor
    for epoch in range(8):
        dataset.epoch = epoch
        window = dataset[0][0].numpy()
        assert _found_in(window, mild) and not _found_in(window, harsh)
    dataset.snr_floor = 31.0  # above every copy: the clean clip
    assert _found_in(dataset[0][0].numpy(), [prepared.waveform(index)])

    class Trainer:  # stands in for Lightning's: the DataModule reads only the epoch
        current_epoch = 0

    module.trainer = Trainer()
    floors = []
    for epoch in (0, 2, 5, 9):
        module.trainer.current_epoch = epoch
        floors.append(module.train_dataloader().dataset.snr_floor)
    assert floors == [30.0, 18.0, 0.0, 0.0]


def test_zero_variants_degrades_afresh_every_epoch(synth_prepared):
    module, prepared = _noisy_datamodule(synth_prepared, "train.augment.conditions.variants=0")
    assert module.rendered is None
    dataset = module.dataset("train")
    clean = prepared.waveform(dataset.indices[0])
    first = dataset[0][0].numpy()
    dataset.epoch = 1
    second = dataset[0][0].numpy()
    assert not np.array_equal(first, second)
    assert not _found_in(first, [clean])  # degraded, not the studio clip


def test_rendered_copies_fit_a_memory_budget(synth_prepared):
    from kndcli.training.data import RenderedConditions

    module, prepared = _noisy_datamodule(synth_prepared)
    indices = prepared.indices("train")
    one_copy = 2 * sum(int(prepared.rows[i]["length"]) for i in indices)
    rendered = RenderedConditions(
        module.conditions, prepared, indices, 8, seed=0, max_bytes=int(2.5 * one_copy)
    )
    assert rendered.variants == 2  # what fits, not the 8 asked for
    assert all(len(copies) == 2 for copies in rendered.copies.values())


@pytest.mark.slow
def test_vertex_directories_on_gcs_keep_the_model_and_only_their_own_checkpoint(
    synth_prepared, tmp_path, monkeypatch
):
    """`knd train` as a Vertex AI job runs it: AIP_MODEL_DIR and AIP_CHECKPOINT_DIR on a
    bucket (the GCS emulator). The bundle and checkpoints land there; a restart of the
    same job resumes from them; another configuration is refused that checkpoint."""
    from tests.conftest import gcs_emulator

    from kndcli.gcs import gcs_filesystem

    with gcs_emulator(monkeypatch, "vertex"):
        monkeypatch.setenv("AIP_MODEL_DIR", "gs://vertex/runs/j1/model")
        monkeypatch.setenv("AIP_CHECKPOINT_DIR", "gs://vertex/runs/j1/checkpoints")
        monkeypatch.setenv("CLOUD_ML_JOB_ID", "4242")
        args = [
            "train",
            *as_sets(
                tiny_overrides(synth_prepared, tmp_path, "train.run_name=j1", "wandb.enabled=false")
            ),
        ]
        first, _ = _knd(*args).communicate(timeout=600)
        fs = gcs_filesystem("the test")
        names = {Path(n).name for n in fs.find("vertex/runs/j1")}
        assert {"bundle.json", "model.onnx", "weights.safetensors"} <= names, first
        assert {"last.ckpt", "run.json"} <= names

        again = _knd(*args)
        output, _ = again.communicate(timeout=600)
        assert again.returncode == 0, output
        meta = json.loads(fs.cat_file("vertex/runs/j1/model/bundle.json"))
        assert meta["training"]["resumed_from"] == "gs://vertex/runs/j1/checkpoints/last.ckpt"

        other = _knd(*args, "--set", "train.seed=7")
        output, _ = other.communicate(timeout=600)
        assert other.returncode == 2, output
        assert "holds the checkpoint of run 'j1'" in output and "train.seed" in output

        monkeypatch.setenv("CLOUD_ML_JOB_ID", "5151")  # another job, same config
        stranger = _knd(*args)
        output, _ = stranger.communicate(timeout=600)
        assert stranger.returncode == 2 and "job 4242 != 5151" in output, output


@pytest.mark.slow
def test_two_vertex_replicas_train_one_model_over_gloo(synth_prepared, tmp_path):
    """Two `knd train` processes with the variables Vertex AI sets on two replicas
    (CLUSTER_SPEC, MASTER_ADDR/PORT, WORLD_SIZE and RANK counted in nodes) form one
    DDP group over gloo on loopback; only the primary writes the bundle."""
    from tests.conftest import free_port

    port = free_port()
    cluster = {"workerpool0": [f"127.0.0.1:{port}"], "workerpool1": ["127.0.0.1:2222"]}
    args = [
        "train",
        *as_sets(
            tiny_overrides(
                synth_prepared,
                tmp_path,
                "train.run_name=vertex2",
                "wandb.enabled=false",
                "train.trainer.strategy=ddp",
                "train.trainer.accelerator=cpu",
                "train.trainer.devices=1",
                "train.trainer.num_nodes=2",  # what `knd cloud submit --replicas 2` adds
            )
        ),
    ]
    procs = []
    for rank, pool in enumerate(("workerpool0", "workerpool1")):
        env = {
            "CLUSTER_SPEC": json.dumps({"cluster": cluster, "task": {"type": pool, "index": 0}}),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
        }
        procs.append(_knd(*args, env={**os.environ, **env, "WANDB_MODE": "offline"}))
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    meta = load_bundle(tmp_path / "vertex2").meta
    assert meta["training"]["world_size"] == 2


def test_resume_record_compares_the_recipe_only(tmp_path):
    from kndcli.config import ConfigError
    from kndcli.training.resume import check_resume, record_of

    ckpt = str(tmp_path / "checkpoints")
    cfg = load_config(overrides=["train.run_name=r1"])
    check_resume(ckpt, record_of(cfg), has_last=False)
    other_sections = load_config(overrides=["train.run_name=r1", "wandb.enabled=false"])
    other_sections.serve.max_streams = 3
    check_resume(ckpt, record_of(other_sections), has_last=True)  # not the recipe: resumes
    newer = record_of(cfg)
    newer["config"]["model.some_new_key"] = 1  # a key only a newer knd writes
    check_resume(ckpt, newer, has_last=True, write=False)
    changed = load_config(overrides=["train.run_name=r1", "train.seed=7"])
    with pytest.raises(ConfigError, match="train.seed"):
        check_resume(ckpt, record_of(changed), has_last=True)


# ---------------------------------------------------------------- cross-fitted calibration
def test_each_member_leaves_out_its_own_speakers(caplog):
    from kndcli.training.data import member_holdouts

    speakers = [f"{i:02d}" for i in range(1, 13)]
    held = member_holdouts(speakers, members=2, per_member=2, seed=42)
    assert [len(h) for h in held] == [2, 2] and not set(held[0]) & set(held[1])
    assert set(held[0]) | set(held[1]) <= set(speakers)
    assert member_holdouts(speakers, 2, 2, seed=42) == held  # the seed decides, not chance
    assert member_holdouts(speakers, 2, 2, seed=1) != held
    assert member_holdouts(speakers, 2, 0, seed=42) == [[], []]
    # Too few speakers for cross-fitting: nobody is left out, and the log says why.
    assert member_holdouts(speakers[:7], members=3, per_member=2, seed=42) == [[], [], []]
    assert "train.cross_fit_speakers=2" in caplog.text and "at least 8" in caplog.text


def test_a_single_model_leaves_speakers_out_only_without_a_validation_split(caplog):
    """No other member learns a single model's left-out speakers: they are lost to it, so
    it calibrates on the val split when there is one, and names them when there is not."""
    from kndcli.training.data import member_holdouts

    speakers = [f"{i:02d}" for i in range(1, 13)]
    assert member_holdouts(speakers, members=1, per_member=2, seed=42, has_val=True) == [[]]
    assert caplog.text == ""
    (held,) = member_holdouts(speakers, members=1, per_member=2, seed=42, has_val=False)
    assert len(held) == 2
    assert f"speakers {', '.join(held)} are left out of training" in caplog.text
    # Two members learn every speaker between them, validation split or not.
    assert all(member_holdouts(speakers, members=2, per_member=2, seed=42, has_val=True))


@pytest.mark.parametrize("mixup", [False, True])
def test_a_left_out_speakers_labels_never_reach_its_member(mixup):
    import torch

    from kndcli.config import LABELS
    from kndcli.training.module import EmotionClassifier

    module = EmotionClassifier(
        model={"channels": 8, "ensemble": 2},
        labels=list(LABELS),
        sample_rate=16000,
        member_holdout=[[0], [1]],
    )
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 8, generator=gen)
    speaker = torch.tensor([0, 1, 2, 0, 3, 1])
    y = torch.tensor([1, 2, 3, 4, 5, 6])
    perm = torch.tensor([1, 2, 3, 4, 5, 0]) if mixup else None
    lam = 0.7 if mixup else 1.0

    def loss(member: int, labels: torch.Tensor) -> float:
        kept = module._kept(member, speaker)
        return float(module._member_loss(logits, labels, lam, perm, kept))

    for member, own in ((0, speaker == 0), (1, speaker == 1)):
        relabelled = torch.where(own, (y + 3) % 8, y)  # change only the left-out labels
        assert loss(member, relabelled) == pytest.approx(loss(member, y), abs=1e-6)
        other = torch.where(~own, (y + 3) % 8, y)
        assert abs(loss(member, other) - loss(member, y)) > 1e-3
    # Without left-out speakers the member's loss is the ordinary (mixed) loss.
    assert module._kept(0, speaker) is not None
    plain = EmotionClassifier(model={"channels": 8}, labels=list(LABELS), sample_rate=16000)
    assert plain._kept(0, speaker) is None


def test_cross_fitted_training_calibrates_on_each_members_left_out_speakers(
    synth_prepared, tmp_path
):
    """Every speaker trains (no validation split), and the temperature is fitted on each
    member's outputs for speakers whose labels that member never saw."""
    from kndcli.training.train import train

    cfg = load_config(
        overrides=tiny_overrides(
            synth_prepared,
            tmp_path,
            "train.run_name=cf",
            "model.ensemble=2",
            "train.cross_fit_speakers=1",
            "train.fit_splits=[train,val,test]",
        )
    )
    result = train(cfg)
    bundle = load_bundle(result.run_dir)
    calibration = bundle.meta["calibration"]
    assert calibration["method"] == "temperature, cross-fitted over ensemble members"
    members = calibration["fitted_on"]["members"]
    assert [len(m) for m in members] == [1, 1] and members[0] != members[1]
    assert calibration["fitted_on"]["speakers"] == sorted(members[0] + members[1])
    assert calibration["fitted_on"]["clips"] == 120  # the two left-out synthetic actors
    assert calibration["fitted_on"]["copies"] == ["clean", "degraded"]
    assert calibration["after"]["nll"] <= calibration["before"]["nll"] + 1e-9
    # The Predictor applies it like a temperature fitted on validation speakers.
    assert Predictor(bundle).temperature == calibration["temperature"] != 1.0


def test_rebuilding_a_bundle_from_its_weights_repeats_its_calibration(synth_prepared, tmp_path):
    """`bench.accuracy_cv --rebuild`: what follows training, redone from the saved weights,
    gives the same calibration as the run itself."""
    from kndcli.training.train import rebuild_bundle, train

    cfg = load_config(
        overrides=tiny_overrides(
            synth_prepared,
            tmp_path,
            "train.run_name=rb",
            "model.ensemble=2",
            "train.cross_fit_speakers=1",
            "train.fit_splits=[train,val,test]",
        )
    )
    from bench.accuracy_cv import calibration_of

    first = load_bundle(train(cfg).run_dir).meta["calibration"]
    again = rebuild_bundle(cfg, epochs=2)
    second = load_bundle(again.run_dir).meta["calibration"]
    assert again.epochs == 2 and again.best_checkpoint.endswith("averaged.ckpt")
    assert second["fitted_on"] == first["fitted_on"]
    # The bench records which left-out speakers the temperature was fitted on.
    recorded = calibration_of(again.run_dir)
    assert recorded["calibrated_on"] == first["fitted_on"]["speakers"]
    assert len(recorded["calibrated_on"]) == 2 and recorded["temperature"] == second["temperature"]
    assert second["temperature"] == pytest.approx(first["temperature"], rel=1e-6)


def test_training_without_a_second_speaker_says_it_has_no_babble(synth_prepared, caplog):
    from kndcli.config import TrainConfig
    from kndcli.data.store import PreparedSet
    from kndcli.training.data import training_conditions

    full = PreparedSet.open(synth_prepared)
    kept = [r for r in full.rows if r["split"] != "train" or r["speaker"] == "01"]
    one_speaker = PreparedSet(root=full.root, info=full.info, rows=kept, source=full.source)
    cfg = TrainConfig()
    cfg.augment.conditions.reverb_prob = 0.0  # no room bank to build for this test
    chain = training_conditions(one_speaker, cfg)
    assert "babble" not in chain.noise_types
    assert "no babble, which needs at least two training speakers" in caplog.text
    caplog.clear()
    assert "babble" in training_conditions(full, cfg).noise_types
    assert caplog.text == ""
