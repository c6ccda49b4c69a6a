"""Drift on real speech: clean held-out RAVDESS actors pass; noisy, telephone-band and
clipped versions of the same clips are flagged, and by the features that should move."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from typer.testing import CliRunner

from conftest import ravdess_clips
from kndcli.cli.main import app
from kndcli.config import DriftConfig
from kndcli.monitoring.drift_stats import categorical_drift, numeric_drift
from kndcli.monitoring.inputs import parse_since
from kndcli.monitoring.report_cache import cached_report_html, clear_report_cache
from kndcli.monitoring.verdict import CANNOT_JUDGE, DRIFT, OK, analyze_drift

CURRENT_ACTORS = [13, 14]
runner = CliRunner()


def _write_variant(clips: list[Path], out: Path, kind: str) -> Path:
    """Real files of the clips: as they are, with white noise at 5 dB SNR, as 8 kHz
    telephone audio, or amplified 4x past full scale and clipped."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for path in clips:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
        x = x.mean(axis=1)
        if kind == "noise":
            noise_power = np.mean(x.astype(np.float64) ** 2) / 10 ** (5 / 10)
            x = x + rng.standard_normal(len(x)).astype(np.float32) * np.sqrt(noise_power)
        elif kind == "telephone":
            x, sr = soxr.resample(x, sr, 8000), 8000
        elif kind == "clipping":
            x = np.clip(x * (4.0 / np.abs(x).max()), -1.0, 1.0)
        sf.write(out / f"{path.stem}.wav", np.clip(x, -1.0, 1.0), sr, subtype="PCM_16")
    return out


@pytest.fixture(scope="module")
def current_clips(ravdess_root: Path) -> list[Path]:
    return ravdess_clips(ravdess_root, CURRENT_ACTORS)


@pytest.fixture(scope="module")
def variant(current_clips, tmp_path_factory):
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = _write_variant(current_clips, tmp_path_factory.mktemp(kind), kind)
        return made[kind]

    return get


def _fill_log(bundle: Path, folder: Path, db: Path, minutes_ago: float = 5.0) -> Path:
    """Score a folder with the bundle and log each answer as `knd serve` would."""
    from kndcli.inference.predictor import Predictor
    from kndcli.monitoring.predlog import open_log, prediction_record

    predictor = Predictor.from_config(bundle)
    ts = (datetime.now(UTC) - timedelta(minutes=minutes_ago)).isoformat()
    records = [
        prediction_record(
            request_id=uuid.uuid4().hex,
            model_version=predictor.bundle.version,
            label=p.label,
            confidence=p.confidence,
            latency_ms=12.0,
            filename=p.source,
            features=p.features,
            ts=ts,
        )
        for p in predictor.predict_paths(sorted(folder.iterdir()), features=True)
    ]
    with open_log(db) as log:
        log.write(records)
    return db


def _check(*args: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["drift", "check", "--json", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


# ----------------------------------------------------------------------------- units


def test_constant_reference_feature_gives_share_not_nan() -> None:
    reference = np.zeros(200)
    some = numeric_drift(reference, np.r_[np.zeros(90), np.full(10, 0.2)], 0.05, 0.25, 0.9)
    assert some.test == "share outside constant reference"
    assert some.statistic == pytest.approx(0.1) and not some.drifted and some.distance is None
    every = numeric_drift(reference, np.full(50, 0.2), 0.05, 0.25, 0.9)
    assert every.statistic == 1.0 and every.p_value < 1e-6 and every.drifted and every.severe


def test_unseen_category_counts_fully() -> None:
    outcome = categorical_drift([48000.0] * 300, [8000.0] * 60, 0.05, 0.25, 0.9)
    assert outcome.test == "chi-square" and outcome.statistic == 1.0 and outcome.p_value < 1e-6
    assert outcome.drifted and outcome.severe
    assert "8000" in outcome.note and outcome.distance is not None and outcome.distance > 1


def test_parse_since() -> None:
    now = datetime(2025, 1, 2, 12, 0, tzinfo=UTC)
    assert parse_since("24h", now) == datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now) == datetime(2025, 1, 2, 11, 30, tzinfo=UTC)
    assert parse_since("2025-01-01T06:00", now) == datetime(2025, 1, 1, 6, 0, tzinfo=UTC)
    with pytest.raises(Exception, match="--since 'yesterday'"):
        parse_since("yesterday", now)


def test_too_few_samples_cannot_judge(drift_bundle: Path) -> None:
    import pandas as pd

    reference = pd.read_parquet(drift_bundle / "reference.parquet")
    few = reference[reference["source"] == "val"].head(5)
    result = analyze_drift(reference, few, DriftConfig(min_samples=30))
    assert result.verdict == CANNOT_JUDGE and result.exit_code == 4
    assert "only 5 current samples" in result.reason and "30" in result.reason


# ----------------------------------------------------------------------------- real audio


def test_clean_held_out_speakers_show_no_drift(drift_bundle: Path, variant) -> None:
    code, summary = _check("--model", drift_bundle, "--audio", variant("clean"))
    assert code == 0, summary["reason"]
    assert summary["verdict"] == OK and summary["current_rows"] == 120
    assert summary["drifted_share"] <= 0.3
    for name in ("sample_rate", "clipping_ratio", "snr_db", "spectral_flatness", "peak"):
        assert name not in summary["drifted_columns"]


def test_audio_folder_is_decoded_under_the_audio_section(drift_bundle: Path, variant) -> None:
    """`--audio` scores as `knd predict` would, under the same `audio:` limits."""
    code, summary = _check(
        "--model", drift_bundle, "--audio", variant("clean"), "--set", "audio.max_duration_s=1"
    )
    assert code == 4 and summary["current_rows"] == 0
    assert "audio.max_duration_s" in json.dumps(summary)


def test_noise_is_flagged_through_audio_folder(drift_bundle: Path, variant) -> None:
    code, summary = _check("--model", drift_bundle, "--audio", variant("noise"))
    assert code == 1 and summary["verdict"] == DRIFT
    assert {"snr_db", "spectral_flatness"} <= set(summary["drifted_columns"])
    assert "sample_rate" not in summary["drifted_columns"]
    snr = next(f for f in summary["features"] if f["column"] == "snr_db")
    assert snr["severe"] and snr["test"] == "ks"


def test_telephone_audio_is_flagged_through_sqlite_log(
    drift_bundle: Path, variant, tmp_path: Path
) -> None:
    db = _fill_log(drift_bundle, variant("telephone"), tmp_path / "predictions.sqlite")
    code, summary = _check("--model", drift_bundle, "--log-sink", db, "--since", "1h")
    assert code == 1 and summary["current_rows"] == 120
    drifted = set(summary["drifted_columns"])
    assert {"spectral_rolloff_hz", "spectral_centroid_hz", "sample_rate", "band_4000_8000"} <= (
        drifted
    )
    assert {"clipping_ratio", "peak"}.isdisjoint(drifted)


def test_clipping_is_flagged_and_report_written(
    drift_bundle: Path, variant, tmp_path: Path
) -> None:
    db = _fill_log(drift_bundle, variant("clipping"), tmp_path / "predictions.sqlite")
    out = tmp_path / "reports" / "drift.html"
    result = runner.invoke(
        app,
        [
            "drift",
            "report",
            "--model",
            str(drift_bundle),
            "--log-sink",
            str(db),
            "--out",
            str(out),
            "--last",
            "100",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["verdict"] == DRIFT and summary["current_rows"] == 100
    assert {"clipping_ratio", "peak"} <= set(summary["drifted_columns"])
    assert "sample_rate" not in summary["drifted_columns"]
    clipping = next(f for f in summary["features"] if f["column"] == "clipping_ratio")
    assert clipping["statistic"] is not None and clipping["severe"]
    html = out.read_text()
    assert "knd drift: drift" in html and "clipping_ratio" in html and "drawDashboard" in html
    assert "clipping_ratio" in result.output and "drift" in result.output


def test_cached_report_html_serves_from_cache(drift_bundle: Path, variant, tmp_path) -> None:
    clear_report_cache()
    db = _fill_log(drift_bundle, variant("clean"), tmp_path / "predictions.sqlite")
    first = cached_report_html(drift_bundle, str(db), DriftConfig(), max_age_s=3600)
    assert "knd drift: ok" in first
    assert cached_report_html(drift_bundle, str(db), DriftConfig(), max_age_s=3600) is first
    # Stale: the old page is answered at once while one background thread rebuilds it.
    assert cached_report_html(drift_bundle, str(db), DriftConfig(), max_age_s=0) is first
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        fresh = cached_report_html(drift_bundle, str(db), DriftConfig(), max_age_s=3600)
        if fresh is not first:
            break
        time.sleep(0.2)
    assert fresh is not first and "knd drift: ok" in fresh
    missing = cached_report_html(drift_bundle, str(tmp_path / "none.sqlite"), DriftConfig(), 60)
    assert "cannot-judge" in missing and "no prediction log" in missing
    clear_report_cache()


# ----------------------------------------------------------------------------- exit code 2


def _knd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        [str(Path(sys.executable).parent / "knd"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_check_exit_4_too_few_samples_and_2_without_a_log(
    drift_bundle: Path, variant, tmp_path: Path
) -> None:
    db = _fill_log(drift_bundle, variant("clean"), tmp_path / "predictions.sqlite")
    few = _knd(
        "drift", "check", "--model", drift_bundle, "--log-sink", db, "--last", "10", cwd=tmp_path
    )
    assert few.returncode == 4, few.stdout + few.stderr
    assert "cannot-judge" in few.stdout and "only 10 current samples" in few.stdout
    empty = _knd(
        "drift",
        "check",
        "--model",
        drift_bundle,
        "--log-sink",
        db,
        "--since",
        "2999-01-01T00:00",
        cwd=tmp_path,
    )
    assert empty.returncode == 4 and "no requests" in empty.stdout
    none = _knd(
        "drift",
        "check",
        "--model",
        drift_bundle,
        "--log-sink",
        tmp_path / "nope.sqlite",
        cwd=tmp_path,
    )
    assert none.returncode == 2 and "no prediction log at" in none.stderr  # a wrong path
    assert not (tmp_path / "nope.sqlite").exists()


def test_a_label_from_the_log_cannot_inject_script_into_the_report(
    drift_bundle: Path, variant, tmp_path: Path
) -> None:
    """Anyone who can write to the log bucket chooses the labels in it; the report, which
    `/monitoring` serves from the API's own origin, must show them as text."""
    from kndcli.inference.predictor import Predictor
    from kndcli.monitoring.predlog import open_log, prediction_record

    hostile = "</script><script>alert(1)</script>"
    predictor = Predictor.from_config(drift_bundle)
    ts = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    predictions = predictor.predict_paths(sorted(variant("clipping").iterdir()), features=True)
    records = [
        prediction_record(
            request_id=uuid.uuid4().hex,
            model_version=predictor.bundle.version,
            label=hostile if i % 3 == 0 else p.label,
            confidence=p.confidence,
            latency_ms=12.0,
            filename=p.source,
            features=p.features,
            ts=ts,
        )
        for i, p in enumerate(predictions)
    ]
    db = tmp_path / "predictions.sqlite"
    with open_log(db) as log:
        log.write(records)
    out = tmp_path / "drift.html"
    result = runner.invoke(
        app,
        ["drift", "report", "--model", str(drift_bundle), "--log-sink", str(db), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "drawDashboard" in page  # Evidently's part was drawn, with the labels in it
    assert "alert(1)" in page and "<script>alert(1)" not in page
