"""A log that never lies (issue 15): a real `knd serve` on 127.0.0.1 answers 200 only for
requests whose record is durable, through crashes, bucket outages and a locked SQLite file.

The bucket is gcp-storage-emulator in this process on a loopback port; every server is a
`knd serve` subprocess, ended at teardown.
"""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from tests.conftest import free_port, wait_ready

from kndcli.monitoring.predlog import open_log

KND = Path(sys.executable).parent / "knd"
SINK = "gs://knd-logs/served"


def clip_bytes(seconds: float = 0.5) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def post(url: str) -> httpx.Response:
    files = {"file": ("clip.wav", clip_bytes(), "audio/wav")}
    return httpx.post(url + "/predict", files=files, timeout=30)


class Emulator:
    """gcp-storage-emulator on a fixed loopback port; can be started after the server."""

    def __init__(self, port: int, reader_spool: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.reader_spool = reader_spool
        self.server = None

    def start(self) -> Emulator:
        from gcp_storage_emulator.server import create_server

        self.server = create_server(
            "127.0.0.1", self.port, in_memory=True, default_bucket="knd-logs"
        )
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def records(self, prefix: str = SINK) -> list[dict]:
        """What the bucket holds, read through the real gcsfs client (its own empty spool)."""
        reader = open_log(prefix, flush_s=0, spool=self.reader_spool)
        try:
            return reader.read()
        finally:
            reader.close()


@pytest.fixture
def emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    emu = Emulator(free_port(), tmp_path / "reader-spool")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.url)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    yield emu
    emu.stop()


@pytest.fixture
def serve(
    tiny_bundle: Path, tmp_path: Path
) -> Iterator[Callable[..., tuple[str, subprocess.Popen]]]:
    """Start `knd serve` with `--set` overrides and env; every one is ended at teardown."""
    started: list[subprocess.Popen] = []

    def start(env: dict[str, str] | None = None, **sets: object) -> tuple[str, subprocess.Popen]:
        port = free_port()
        args = [a for k, v in sets.items() for a in ("--set", f"serve.{k}={v}")]
        out = (tmp_path / f"serve-{port}.log").open("w")
        proc = subprocess.Popen(
            [KND, "serve", "-m", tiny_bundle, "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", **(env or {})},
            start_new_session=True,  # its scoring workers are killed with its group
        )
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        return url, proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def eventually(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


def test_records_acknowledged_before_a_sigkill_reach_the_bucket(serve, emulator, tmp_path):
    emulator.start()
    env = {"STORAGE_EMULATOR_HOST": emulator.url}
    spool = tmp_path / "spool"
    # No background upload: everything acknowledged is still only in the spool when killed.
    url, proc = serve(env, log_sink=SINK, log_flush_s=0, log_spool=spool, scoring_processes=0)
    answers = [post(url) for _ in range(20)]
    assert [a.status_code for a in answers] == [200] * 20
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert emulator.records() == []  # nothing uploaded: the crash came first

    serve(env, log_sink=SINK, log_flush_s=3600, log_spool=spool, scoring_processes=0)
    acknowledged = sorted(a.json()["request_id"] for a in answers)
    assert eventually(lambda: len(emulator.records()) == 20, 30)
    assert sorted(r["request_id"] for r in emulator.records()) == acknowledged
    assert list(spool.glob("*.jsonl")) == []  # uploaded, then removed from the spool


def test_bucket_down_fills_the_spool_then_503_and_recovers(serve, emulator, tmp_path):
    env = {"STORAGE_EMULATOR_HOST": emulator.url}  # nothing listens there yet
    spool = tmp_path / "spool"
    url, _ = serve(
        env,
        log_sink=SINK,
        log_flush_s=0.5,
        log_spool=spool,
        log_spool_mb=0.004,
        scoring_processes=0,
    )
    answers = [post(url) for _ in range(12)]
    codes = [a.status_code for a in answers]
    assert codes[0] == 200 and 503 in codes  # spooled while there was room, then refused
    refused = answers[codes.index(503)]
    assert "spool is full" in refused.json()["error"]
    assert str(spool) not in refused.json()["error"]  # where the spool is: the server log's
    assert refused.headers.get("retry-after")
    metrics = httpx.get(url + "/metrics", timeout=10).text
    assert "knd_log_pending_bytes" in metrics

    emulator.start()  # the bucket is back: the spool drains and writes succeed again
    acknowledged = {a.json()["request_id"] for a in answers if a.status_code == 200}
    assert eventually(lambda: {r["request_id"] for r in emulator.records()} == acknowledged, 60)
    again = post(url)
    assert again.status_code == 200
    assert eventually(lambda: len(emulator.records()) == len(acknowledged) + 1, 30)
    refused_ids = {a.json()["request_id"] for a in answers if a.status_code == 503}
    assert not refused_ids & {r["request_id"] for r in emulator.records()}


def test_a_locked_sqlite_log_answers_503_at_one_deadline_each(serve, tmp_path):
    log = tmp_path / "log.sqlite"
    url, _ = serve(log_sink=log, log_timeout_s=1.0, scoring_processes=0)
    assert post(url).status_code == 200
    holder = sqlite3.connect(log, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(4) as pool:
            timed = list(pool.map(lambda _: (post(url), time.monotonic() - started), range(4)))
    finally:
        holder.execute("COMMIT")
        holder.close()
    for response, seconds in timed:
        assert response.status_code == 503, response.text
        assert "serve.log_timeout_s" in response.json()["error"]
        assert str(log) not in response.json()["error"]
        assert seconds < 4.0  # each its own deadline, not one after the other (was 30, 60, ...)
    assert post(url).status_code == 200  # the lock is gone: writes work again
