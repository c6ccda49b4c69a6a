"""`knd profile predict|train`: stage breakdowns, operator tables, Chrome traces, --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kndcli.cli.main import app
from kndcli.profiling import ONNX_STAGES, PREDICT_STAGES, onnx_operators

runner = CliRunner()


@pytest.fixture
def clips(wav_factory) -> list[Path]:
    """A 16 kHz mono clip, a 48 kHz stereo one (resampled), and a longer one (windows)."""
    return [
        wav_factory("a.wav", seconds=2.5),
        wav_factory("b.wav", seconds=2.0, rate=48000, channels=2, freq=300),
        wav_factory("c.flac", seconds=5.0, rate=44100, freq=180),
    ]


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_profile_predict_torch_json_and_trace(tiny_bundle: Path, clips, tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    trace = tmp_path / "trace" / "predict.json"
    out = _json(
        runner.invoke(
            app,
            [
                "profile",
                "predict",
                "-m",
                str(tiny_bundle),
                "--backend",
                "torch",
                *map(str, clips),
                str(bad),
                "--json",
                "--trace",
                str(trace),
            ],
        )
    )
    assert out["backend"] == "torch" and out["files"] == 4
    assert list(out["stages"]) == list(PREDICT_STAGES)
    assert all(seconds > 0 for seconds in out["stages"].values())
    assert out["total_s"] == pytest.approx(sum(out["stages"].values()))
    assert out["windows"] >= 4  # the 5 s clip is scored in several windows
    assert [f["file"] for f in out["failed"]] == [str(bad)]
    names = [op["name"] for op in out["operators"]]
    assert names and all(n.startswith("aten::") for n in names)
    assert out["operators"][0]["self_ms"] >= out["operators"][-1]["self_ms"]
    events = json.loads(trace.read_text())["traceEvents"]
    labels = {e.get("name") for e in events}
    assert {"knd/frontend", "knd/backbone", "knd/decode"} <= labels


def test_profile_predict_onnx(tiny_bundle: Path, clips, tmp_path: Path) -> None:
    trace = tmp_path / "ort.json"
    out = _json(
        runner.invoke(
            app,
            [
                "profile",
                "predict",
                "-m",
                str(tiny_bundle),
                "--backend",
                "onnx",
                *map(str, clips),
                "--json",
                "--trace",
                str(trace),
            ],
        )
    )
    assert list(out["stages"]) == list(ONNX_STAGES)
    assert all(seconds > 0 for seconds in out["stages"].values())
    ops = {op["name"] for op in out["operators"]}
    assert "Conv" in ops
    assert out["model_breakdown_ms"]["frontend"] > 0
    assert out["model_breakdown_ms"]["backbone"] > 0
    assert any(e.get("cat") == "Node" for e in json.loads(trace.read_text()))


def test_profile_predict_table(tiny_bundle: Path, clips) -> None:
    result = runner.invoke(app, ["profile", "predict", "-m", str(tiny_bundle), str(clips[0])])
    assert result.exit_code == 0, result.output
    for word in ("decode", "resample", "frontend", "backbone", "post_processing", "top operators"):
        assert word in result.stdout


def test_profile_predict_errors(tiny_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"garbage")
    result = runner.invoke(app, ["profile", "predict", "-m", str(tiny_bundle), str(bad)])
    assert result.exit_code != 0
    result = runner.invoke(
        app, ["profile", "predict", "-m", str(tiny_bundle), "--backend", "tpu", str(bad)]
    )
    assert result.exit_code != 0


def test_onnx_operators_summary() -> None:
    events = [
        {"cat": "Node", "name": "node_stft_kernel_time", "dur": 3000, "args": {"op_name": "STFT"}},
        {
            "cat": "Node",
            "name": "conv2d_nchwc_kernel_time",
            "dur": 1000,
            "args": {"op_name": "Conv"},
        },
        {
            "cat": "Node",
            "name": "node_conv2d_1_kernel_time",
            "dur": 500,
            "args": {"op_name": "Conv"},
        },
        {"cat": "Session", "name": "model_run", "dur": 9000, "args": {}},
    ]
    parts = {"node_stft": "frontend", "node_conv2d": "backbone", "node_conv2d_1": "backbone"}
    ops, split = onnx_operators(events, top=5, node_parts=parts)
    assert [(o["name"], o["calls"]) for o in ops] == [("STFT", 1), ("Conv", 2)]
    assert split == {"frontend": 3.0, "backbone": 1.5}


def test_profile_train(synth_prepared: Path, tmp_path: Path) -> None:
    trace = tmp_path / "train.json"
    out = _json(
        runner.invoke(
            app,
            [
                "profile",
                "train",
                "--prepared",
                str(synth_prepared),
                "--set",
                "train.batch_size=4",
                "--set",
                "model.channels=8",
                "--steps",
                "2",
                "--json",
                "--trace",
                str(trace),
            ],
        )
    )
    assert out["steps"] == 2 and out["samples"] == 8
    assert out["data_wait_s"] > 0 and out["compute_s"] > 0
    assert 0 < out["data_fraction"] < 1
    assert out["samples_per_s"] > 0
    assert out["operators"] and "traceEvents" in json.loads(trace.read_text())
    table = runner.invoke(
        app,
        [
            "profile",
            "train",
            "--prepared",
            str(synth_prepared),
            "--set",
            "train.batch_size=4",
            "--set",
            "model.channels=8",
            "--steps",
            "1",
            "--warmup",
            "0",
        ],
    )
    assert table.exit_code == 0, table.output
    assert "data wait" in table.stdout and "samples/s" in table.stdout


def test_profile_train_bad_steps(synth_prepared: Path) -> None:
    result = runner.invoke(
        app, ["profile", "train", "--prepared", str(synth_prepared), "--steps", "0"]
    )
    assert result.exit_code != 0
