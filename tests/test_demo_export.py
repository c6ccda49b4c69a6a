"""`knd demo` end to end, and `knd export` (re-export and int8) on its bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kndcli.demo import run_demo
from kndcli.inference.bundle import load_bundle
from kndcli.training.export import export_bundle

FAST = ["model.channels=8", "train.trainer.max_epochs=1", "train.clip_seconds=1.5"]


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(out, actors=3, overrides=FAST, say=lambda _: None)


def test_demo_runs_every_stage(demo_result):
    assert len(list(demo_result.raw.rglob("*.wav"))) == 180
    assert (demo_result.prepared / "manifest.csv").is_file()
    bundle = load_bundle(demo_result.bundle)
    assert bundle.meta["data"]["speakers"]["test"] == ["03"]
    assert demo_result.metrics["split"] == "test" and demo_result.metrics["n_clips"] == 60
    assert (demo_result.bundle / "eval" / "test_confusion.png").is_file()
    assert demo_result.heldout_clip.parent.name == "Actor_03"
    assert demo_result.prediction["label"] in bundle.labels
    assert demo_result.prediction["windows"]


def test_reexport_keeps_parity_and_files(demo_result, tmp_path):
    out = tmp_path / "re"
    report = export_bundle(demo_result.bundle, out, data=demo_result.prepared)
    assert report["parity"] < 1e-4
    assert report["accuracy_after"] == pytest.approx(report["accuracy_before"], abs=0.02)
    meta = load_bundle(out).meta
    assert meta["export"]["quantize"] is None
    assert set(meta["files"]) == set(load_bundle(demo_result.bundle).meta["files"])


def test_int8_export_is_smaller_and_reports_the_change(demo_result, tmp_path):
    out = tmp_path / "q"
    report = export_bundle(
        demo_result.bundle, out, quantize="int8", data=demo_result.prepared, force=True
    )
    assert report["size_after"] < report["size_before"]
    assert report["kept"] and {"accuracy_before", "ms_per_clip_after"} <= set(report)
    assert 0 <= report["accuracy_after"] <= 1
    assert load_bundle(out).meta["export"]["quantize"] == "int8"


def test_export_cli_rejects_unknown_format(demo_result):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kndcli",
            "export",
            "-m",
            str(demo_result.bundle),
            "--format",
            "tflite",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "only onnx is supported" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)  # the subprocess's own limit below, not pytest's default 600 s
def test_demo_command_as_a_newcomer_runs_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kndcli", "demo", "--out", str(tmp_path / "knd-demo")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "done in" in proc.stdout
    bundle = tmp_path / "knd-demo" / "models" / "demo"
    metrics = json.loads((bundle / "eval" / "test_metrics.json").read_text())
    assert metrics["accuracy"] > 0.3  # well above the 12.5 % of chance on a held-out speaker
    calibrated = metrics["calibration"]["ece_if_calibrated"]
    assert calibrated > 0 and f"would measure about {calibrated:.1%}" in proc.stdout
    assert Path(bundle / "model.onnx").is_file()
