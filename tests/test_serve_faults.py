"""Scoring workers under fire (issue 15): stopped, killed, poisoned, and a server killed.

Each server test runs a real `knd serve` on 127.0.0.1 with two scoring workers and a short
`serve.scoring_timeout_s`, stops or kills worker processes found as its children, and
asserts what a client sees. Every process a test starts is continued and killed at the end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from tests.conftest import free_port, wait_ready

from kndcli.config import LABELS

KND = Path(sys.executable).parent / "knd"
TAG = "SERVE_FAULTS_TEST"  # environment variable that marks the processes a test started
TIMEOUT_S = 2.0  # serve.scoring_timeout_s in these servers
SLACK_S = 2.0  # what a loaded 2-core machine may add to a deadline
SETTINGS = {
    "serve.scoring_processes": 2,
    "serve.scoring_timeout_s": TIMEOUT_S,
    # One clip per batch, so N requests are N batches and which worker holds which is known.
    "serve.max_batch_size": 1,
}


@dataclass
class Served:
    """A running `knd serve`; `tag` is in the environment of it and of every process it
    starts, so processes it started after the test last looked are found too."""

    proc: subprocess.Popen
    url: str
    output: Path
    tag: str

    def tagged(self) -> list[int]:
        """Every live process (zombies aside) carrying this server's tag, orphans included."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get(TAG) == self.tag and not gone(process.pid):
                    found.append(process.pid)
            except psutil.Error:
                continue
        return found

    def workers(self) -> list[psutil.Process]:
        """The scoring worker processes (spawned children; not the resource tracker)."""
        children = psutil.Process(self.proc.pid).children(recursive=True)
        return [c for c in children if "spawn_main" in " ".join(_cmdline(c))]

    def clip(self, data: bytes, name: str = "clip.wav") -> tuple[httpx.Response, float]:
        """POST one clip: the response and the seconds it took."""
        start = time.monotonic()
        response = httpx.post(
            self.url + "/predict", files={"file": (name, data, "audio/wav")}, timeout=60
        )
        return response, time.monotonic() - start

    def clips(self, data: bytes, n: int) -> list[tuple[httpx.Response, float]]:
        """`n` clips at once, each on its own connection."""
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda i: self.clip(data, f"c{i}.wav"), range(n)))


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def end(pid: int) -> None:
    """Kill a process even if it is stopped: SIGCONT, then SIGKILL."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


@pytest.fixture
def serve(tiny_bundle: Path, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Start `knd serve` with SETTINGS plus overrides; every process under it ends at teardown."""
    started: list[Served] = []

    def start(**overrides: object) -> Served:
        port = free_port()
        settings = {**SETTINGS, **overrides, "serve.log_sink": tmp_path / f"{port}.sqlite"}
        sets = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
        output = tmp_path / f"serve-{port}.log"
        tag = uuid.uuid4().hex
        with output.open("w") as out:  # a file, not a pipe nobody reads that could fill
            proc = subprocess.Popen(
                [KND, "serve", "-m", tiny_bundle, "--port", str(port), *sets],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "KND_API_TOKEN": "", TAG: tag},
            )
        served = Served(proc, f"http://127.0.0.1:{port}", output, tag)
        started.append(served)
        wait_ready(served.url, proc)
        assert len(served.workers()) == 2
        return served

    yield start
    for served in started:
        for pid in [served.proc.pid, *served.tagged()]:
            end(pid)
        served.proc.wait(10)


@pytest.fixture
def clip_bytes(wav_factory: Callable[..., Path]) -> bytes:
    return wav_factory("one.wav", seconds=1.0).read_bytes()


# ----------------------------------------------------------------------------- a live server


def test_a_stopped_worker_costs_one_503_in_time_and_blocks_no_one(
    serve: Callable[..., Served], clip_bytes: bytes
) -> None:
    """Four clips while one worker is SIGSTOPped: the one batch it holds is a 503 with
    Retry-After at the deadline (not a 504 after 60 s); the other clips are not kept waiting."""
    served = serve()
    stopped = served.workers()[0]
    stopped.suspend()
    answers = served.clips(clip_bytes, 4)
    refused = [(r, s) for r, s in answers if r.status_code == 503]
    assert sorted(r.status_code for r, _ in answers) == [200, 200, 200, 503], answers
    response, seconds = refused[0]
    assert response.headers["retry-after"] and "scoring" in response.json()["error"]
    assert TIMEOUT_S <= seconds < TIMEOUT_S + SLACK_S
    assert all(s < TIMEOUT_S for r, s in answers if r.status_code == 200)
    assert wait_until(lambda: gone(stopped.pid), SLACK_S)  # killed, not left stopped
    assert served.clip(clip_bytes)[0].status_code == 200
    assert wait_until(lambda: len(served.workers()) == 2, 30)


def batch(served: Served, data: bytes, n: int) -> httpx.Response:
    files = [("files", (f"c{i}.wav", data, "audio/wav")) for i in range(n)]
    return httpx.post(served.url + "/predict/batch", files=files, timeout=60)


def test_a_batch_says_which_files_to_send_again_and_is_a_503_when_none_was_scored(
    serve: Callable[..., Served], clip_bytes: bytes
) -> None:
    """One worker stopped: a batch of four is a 200 whose one unscored file carries status
    503 and retry_after_s (the server's fault, not the file's). Both stopped: nothing can
    be scored, so the whole batch is a 503 with Retry-After, not a 200 of failures."""
    served = serve()
    first = served.workers()[0]
    first.suspend()
    response = batch(served, clip_bytes, 4)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["scored"], body["failed"]) == (3, 1)
    (refused,) = [r for r in body["results"] if "error" in r]
    assert refused["status"] == 503 and refused["retry_after_s"] == 2
    assert "scoring" in refused["error"] and "label" not in refused
    assert wait_until(lambda: gone(first.pid) and len(served.workers()) == 2, 30)
    for worker in served.workers():
        worker.suspend()
    start = time.monotonic()
    response = batch(served, clip_bytes, 2)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "2" and "scoring" in response.json()["error"]
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S


def test_with_every_worker_stopped_ready_flips_to_503_and_back(
    serve: Callable[..., Served], clip_bytes: bytes
) -> None:
    """Both workers SIGSTOPped: clips get 503 at the deadline; /ready answers 503 while the
    pool restarts and 200 once it can score again, and /health answers 200 throughout."""
    served = serve()
    for worker in served.workers():
        worker.suspend()
    probes: dict[str, list[int]] = {"/ready": [], "/health": []}
    gauge: list[float] = []  # knd_ready on /metrics, which follows /ready
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=5) as client:
            while not done.is_set():
                for route, statuses in probes.items():
                    statuses.append(client.get(served.url + route).status_code)
                gauge.append(ready_gauge(client.get(served.url + "/metrics").text))
                time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        answers = served.clips(clip_bytes, 2)
        assert [r.status_code for r, _ in answers] == [503, 503]
        assert all("retry-after" in r.headers for r, _ in answers)
        assert all(s < TIMEOUT_S + SLACK_S for _, s in answers)
        assert wait_until(lambda: probes["/ready"][-1:] == [200] and 503 in probes["/ready"], 30)
    finally:
        done.set()
        prober.join(10)
    assert set(probes["/health"]) == {200}
    assert probes["/ready"][0] == 200  # stopped is not known to be wedged until the deadline
    assert 0.0 in gauge and gauge[0] == 1.0
    assert served.clip(clip_bytes)[0].status_code == 200
    assert ready_gauge(httpx.get(served.url + "/metrics", timeout=5).text) == 1.0


def ready_gauge(metrics: str) -> float:
    return float(re.search(r"^knd_ready (\S+)$", metrics, re.MULTILINE).group(1))


def test_an_innocent_clip_after_idle_workers_are_killed_is_scored(
    serve: Callable[..., Served], clip_bytes: bytes
) -> None:
    """SIGKILL every idle worker, then send one good clip: it is scored (200), not a 422."""
    served = serve(**{"serve.scoring_timeout_s": 15})  # room for the new workers to load
    for worker in served.workers():
        worker.kill()
    response, seconds = served.clip(clip_bytes)
    assert response.status_code == 200, response.text
    assert response.json()["label"] in LABELS and seconds < 15
    assert wait_until(lambda: len(served.workers()) == 2, 30)


def test_sigterm_exits_in_bounded_time_with_stopped_workers(
    serve: Callable[..., Served], clip_bytes: bytes
) -> None:
    """SIGTERM with both workers stopped and a clip in flight: the clip gets its 503, and
    the server drains, kills what will not exit, and is gone within a bounded time."""
    from kndcli.serving.scoring import CLOSE_GRACE_S

    served = serve()
    for worker in served.workers():
        worker.suspend()
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(served.clip, clip_bytes)
        time.sleep(0.5)
        start = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        code = served.proc.wait(TIMEOUT_S + CLOSE_GRACE_S + 3 * SLACK_S)
        took = time.monotonic() - start
        response, _ = in_flight.result(5)
    assert response.status_code == 503 and "retry-after" in response.headers
    assert code in (0, -signal.SIGTERM) and took < TIMEOUT_S + CLOSE_GRACE_S + 2 * SLACK_S
    assert "Application shutdown complete" in served.output.read_text()
    assert wait_until(lambda: not served.tagged(), SLACK_S), served.tagged()


def test_workers_exit_when_the_server_is_sigkilled(serve: Callable[..., Served]) -> None:
    """A SIGKILLed server runs no cleanup: its workers notice and exit within seconds."""
    served = serve()
    assert len(served.tagged()) >= 3  # the server and its two workers
    served.proc.kill()
    served.proc.wait(10)
    assert wait_until(lambda: not served.tagged(), 5), served.tagged()


# ----------------------------------------------------------------------------- crash attribution


def test_a_single_clip_whose_worker_died_is_retried_alone(
    tiny_bundle: Path, tmp_path: Path, clip_bytes: bytes
) -> None:
    """A batch of one is retried too: a worker that dies under a clip (killed, not the
    clip's fault) costs that clip nothing."""
    from kndcli.serving.batcher import MicroBatcher
    from kndcli.serving.scoring import Clip, ScoringPool, ScoringUnavailableError, WorkerSpec
    from scoring_tasks import crash_once

    pool = ScoringPool(WorkerSpec(model=str(tiny_bundle)), 1, task=crash_once, timeout_s=30)
    batcher = MicroBatcher(pool.run, final_errors=(ScoringUnavailableError,))
    try:
        marker = tmp_path / "died-once"
        prediction = batcher.submit_future(Clip(clip_bytes, str(marker))).result(60)
        assert marker.exists() and prediction.label in LABELS and pool.restarts >= 1
    finally:
        batcher.close()
        pool.close()


def test_a_clip_that_kills_a_worker_twice_is_422_and_named_in_the_log(
    tiny_bundle: Path, clip_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Alone, the poison clip kills its worker twice (first try and retry); only then is it
    refused, and the log names the clip and the request."""
    from kndcli.serving.batcher import MicroBatcher
    from kndcli.serving.body import Upload
    from kndcli.serving.scoring import ScoringPool, ScoringUnavailableError, WorkerSpec
    from kndcli.serving.service import ServiceState
    from kndcli.serving.settings import ServeSettings
    from scoring_tasks import crash_on_poison

    pool = ScoringPool(WorkerSpec(model=str(tiny_bundle)), 1, task=crash_on_poison, timeout_s=30)
    batcher = MicroBatcher(pool.run, final_errors=(ScoringUnavailableError,))
    service = ServiceState(
        settings=ServeSettings(model=str(tiny_bundle)),
        bundle=None,  # type: ignore[arg-type]  # only scoring is exercised
        pool=pool,
        batcher=batcher,
        log=None,  # type: ignore[arg-type]
        metrics=None,  # type: ignore[arg-type]
    )
    try:
        with caplog.at_level(logging.ERROR, logger="kndcli.serving.service"):
            scored = asyncio.run(service._score_one(Upload("poison", clip_bytes), "req-7"))
            fine = asyncio.run(service._score_one(Upload("fine.wav", clip_bytes), "req-8"))
        assert scored.error is not None and scored.error.status == 422
        assert wait_until(lambda: pool.restarts == 2, 10)
        assert fine.prediction is not None and fine.prediction.label in LABELS
        assert any("'poison'" in m and "req-7" in m for m in caplog.messages), caplog.messages
    finally:
        batcher.close()
        pool.close()
