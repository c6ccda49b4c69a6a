"""The prediction log: SQLite (WAL, concurrent writers, idempotent) and gs:// (emulator)."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tests.conftest import gcs_emulator as start_gcs_emulator

from kndcli.audio import FEATURE_NAMES
from kndcli.monitoring.predlog import (
    LOG_COLUMNS,
    GCSPredictionLog,
    PredictionLogError,
    SQLitePredictionLog,
    open_log,
    prediction_record,
)


def record(i: int, ts: str | None = None, **extra: object) -> dict:
    features = {name: float(i) for name in FEATURE_NAMES}
    rec = prediction_record(
        request_id=f"req-{i:05d}",
        model_version="tiny@abc",
        label="happy",
        confidence=0.5,
        latency_ms=3.0,
        filename=f"/secret/dir/clip{i}.wav",
        features=features,
        ts=ts,
    )
    rec.update(extra)
    return rec


def test_record_layout_has_every_feature_and_no_paths() -> None:
    rec = record(1)
    assert list(rec) == list(LOG_COLUMNS)
    assert set(FEATURE_NAMES) <= set(rec)
    assert rec["filename"] == "clip1.wav"
    assert (
        prediction_record(
            request_id="x",
            model_version="m",
            label="sad",
            confidence=1,
            latency_ms=1,
            filename="C:\\Users\\me\\a.wav",
            features={},
        )["filename"]
        == "a.wav"
    )
    datetime.fromisoformat(rec["ts"])


def test_sqlite_roundtrip_idempotent_and_filters(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "log.sqlite"
    base = datetime(2025, 1, 1, tzinfo=UTC)
    with open_log(path) as plog:
        assert isinstance(plog, SQLitePredictionLog)
        plog.write([record(i, ts=(base + timedelta(minutes=i)).isoformat()) for i in range(10)])
        plog.write([record(3, ts=base.isoformat(), label="angry")])  # a retry: ignored
        rows = plog.read()
        assert [r["request_id"] for r in rows] == [f"req-{i:05d}" for i in range(10)]
        assert rows[3]["label"] == "happy"
        assert rows[0]["pitch_hz"] == 0.0 and rows[9]["band_0_300"] == 9.0
        assert [r["request_id"] for r in plog.read(last=3)] == [
            "req-00007",
            "req-00008",
            "req-00009",
        ]
        since = plog.read(since=base + timedelta(minutes=5))
        assert since[0]["request_id"] == "req-00005" and len(since) == 5
        naive = plog.read(since=datetime(2025, 1, 1, 0, 8))
        assert len(naive) == 2
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 10


def test_sqlite_record_without_request_id_is_rejected(tmp_path: Path) -> None:
    with open_log(tmp_path / "log.sqlite") as plog, pytest.raises(PredictionLogError):
        plog.write([{"label": "sad"}])


def test_unknown_sink_scheme_is_rejected() -> None:
    with pytest.raises(PredictionLogError, match="s3://"):
        open_log("s3://bucket/prefix")


def _writer(path: str, worker: int, n: int) -> None:
    plog = open_log(path)
    for i in range(n):
        plog.write([record(worker * 1000 + i)])
    plog.close()


def test_sqlite_several_processes_write_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sqlite")
    open_log(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with open_log(path) as plog:
        ids = [r["request_id"] for r in plog.read()]
    assert len(ids) == len(set(ids)) == 160


# ----------------------------------------------------------------------------- GCS


@pytest.fixture
def gcs_emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """gcp-storage-emulator in memory on a free loopback port, with the bucket knd-logs."""
    with start_gcs_emulator(monkeypatch, "knd-logs") as url:
        yield url


def test_gcs_spools_flushes_objects_and_reads_back(gcs_emulator: str, tmp_path: Path) -> None:
    start = time.perf_counter()
    plog = open_log("gs://knd-logs/serve/preds", flush_s=0, spool=tmp_path / "spool")
    assert isinstance(plog, GCSPredictionLog)
    plog.write([record(i) for i in range(5)])
    assert plog.fs.find("knd-logs/serve/preds") == []  # spooled, nothing uploaded yet
    assert len(list((tmp_path / "spool").glob("*.jsonl"))) == 1
    plog.flush()
    plog.write([record(i) for i in range(3, 8)])  # 3 and 4 were already written
    plog.close()
    objects = plog.fs.find("knd-logs/serve/preds")
    assert len(objects) == 2
    today = datetime.now(UTC)
    for name in objects:
        assert name.startswith(f"knd-logs/serve/preds/{today:%Y/%m/%d}/")
        assert name.endswith(".jsonl")

    reader = open_log("gs://knd-logs/serve/preds", flush_s=0, spool=tmp_path / "reader")
    rows = reader.read()
    assert [r["request_id"] for r in rows] == [f"req-{i:05d}" for i in range(8)]
    assert rows[0]["filename"] == "clip0.wav" and rows[7]["snr_db"] == 7.0
    assert len(reader.read(last=2)) == 2
    assert reader.read(since=datetime.now(UTC) + timedelta(days=2)) == []
    reader.close()
    assert time.perf_counter() - start < 20  # no credential probing against the emulator


def test_gcs_interval_flush(gcs_emulator: str, tmp_path: Path) -> None:
    plog = open_log("gs://knd-logs/interval", flush_s=0.2, spool=tmp_path)
    plog.write([record(1)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not plog.fs.find("knd-logs/interval"):
        time.sleep(0.05)
    assert len(plog.fs.find("knd-logs/interval")) == 1
    plog.close()


def test_gcs_read_of_empty_prefix(gcs_emulator: str, tmp_path: Path) -> None:
    with open_log("gs://knd-logs/nothing-here", flush_s=0, spool=tmp_path) as plog:
        assert plog.read() == []
