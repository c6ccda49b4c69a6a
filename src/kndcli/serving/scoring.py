"""Scoring workers: decode, drift features and the model, in processes of their own.

Why processes: per request the server spends ~5 ms of CPU on audio (FLAC decode,
resampling, the drift features) and the model, and much of the audio part holds the
GIL. In one process the event loop, the decoders and the batcher then take turns on one
GIL and a 2-core machine tops out near 1.4 busy cores (~155 requests/s, measured). With
the work in `processes` spawned workers, the server process only parses HTTP and writes
the log; 16 clients on 2 cores reach ~230 requests/s. Several uvicorn workers would also
escape the GIL, but keep-alive connections stick to the worker that accepted them (15 of
16 on one worker, measured), while the pool hands every batch to whichever worker is free.

Why one socket per worker and not a ProcessPoolExecutor: an executor cannot take one
task back, so a wedged worker (a decoder looping, a process stopped) held its batch and a
batcher thread until it resumed, and any dead worker broke every batch in flight. Here
each worker is a process with its own socket, so the pool knows which worker holds which
batch: a worker that misses `timeout_s` is SIGKILLed and its batch alone fails
(`ScoringUnavailableError`, answered 503), and a worker that dies fails only its own
batch (`ScoringCrashedError`; the batcher retries each clip alone once, so only a clip
that kills a worker twice is refused). A watcher thread replaces every worker that
exits, whatever killed it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait
from typing import Any

import numpy as np

from kndcli.audio import Audio, AudioError
from kndcli.config import AudioConfig, InferenceConfig
from kndcli.inference.predictor import Prediction, Predictor

log = logging.getLogger(__name__)

# Loading the model in a new worker: seconds in practice, bounded so that a worker stopped
# while it starts cannot hold its replacement thread forever.
START_TIMEOUT_S = 120.0
# How long `close` lets workers exit on their own before SIGKILL (a stopped one never does).
CLOSE_GRACE_S = 5.0
# How often a worker checks that the server is still its parent, and how often the watcher
# looks at newly started workers; a death among the ones it watches wakes it at once.
POLL_S = 0.5
# Pause before starting another worker when a start failed, so a model that cannot load
# does not become a busy loop of spawns.
RESTART_PAUSE_S = 1.0

_HEADER = struct.Struct("!Q")
_SPAWN = multiprocessing.get_context("spawn")  # the server already runs threads: no fork


class ScoringCrashedError(RuntimeError):
    """A scoring worker died while it held this batch."""


class ScoringUnavailableError(RuntimeError):
    """The batch was not scored in time (its worker missed the deadline, or no worker was
    free): its clips were never judged, so the client should retry, not give up."""


@dataclass(frozen=True)
class Clip:
    """One upload as it crosses to a worker: bytes, a display name, and whether the server
    made it (a stream window, `Upload.window`)."""

    data: bytes
    name: str
    window: bool = False


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to load the model and apply the upload limits."""

    model: str
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    threads: int = 1
    max_duration_s: float | None = None
    max_bytes: int | None = None


_predictor: Predictor | None = None
# How stream windows travel (serving/stream.py, `wav_bytes`).
WINDOW_FORMATS = ["WAV/FLOAT"]


def start_worker(spec: WorkerSpec) -> None:
    """Load the model once per worker, and run one pass so no request pays the warm-up."""
    global _predictor
    audio = replace(spec.audio)  # the decoder's limits, with the service's own upload limits
    if spec.max_duration_s is not None:
        audio.max_duration_s = spec.max_duration_s
    if spec.max_bytes is not None:
        audio.max_file_mb = spec.max_bytes / 1e6
    predictor = Predictor.from_config(spec.model, spec.inference, threads=spec.threads, audio=audio)
    if spec.max_duration_s is not None:
        predictor.duration_key = "serve.max_duration_s"
    predictor.score_batches([np.zeros((1, predictor.window), np.float32)])
    _predictor = predictor


def score_clips(clips: list[Clip]) -> list[Prediction]:
    """Predictions with drift features and timeline; unusable clips come back with `error`."""
    if _predictor is None:
        raise RuntimeError("scoring worker not started")
    items: list[Audio | Prediction] = []
    for clip in clips:
        try:
            formats = WINDOW_FORMATS if clip.window else None
            items.append(_predictor.decode(clip.data, name=clip.name, formats=formats))
        except AudioError as exc:
            items.append(Prediction(source=clip.name, error=str(exc)))
    return _predictor.predict_decoded(items, timeline=True, features=True)


# ----------------------------------------------------------------------------- the wire
# One message is a length and a pickle. Both ends are this module, in processes the server
# spawned, so nothing from a client is ever unpickled.


def _left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (monotonic) for a socket timeout; None blocks."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _send(sock: socket.socket, message: Any, deadline: float | None = None) -> None:
    """Send one message; TimeoutError if the other end stops reading until `deadline`."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    for part in (_HEADER.pack(len(data)), data):
        sock.settimeout(_left(deadline))
        sock.sendall(part)


def _recv_exact(sock: socket.socket, size: int, deadline: float | None) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        sock.settimeout(_left(deadline))
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the other end closed the connection")
        got += n
    return buf


def _recv(sock: socket.socket, deadline: float | None = None) -> Any:
    """One message; TimeoutError past `deadline`, EOFError once the other end is gone."""
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, deadline))
    return pickle.loads(_recv_exact(sock, size, deadline))


# ----------------------------------------------------------------------------- a worker


def _exit_with_parent(parent: int) -> None:
    """Exit once the server is gone: a SIGKILLed server runs no cleanup, and an orphan
    would keep a core and the model's memory forever.

    A poll of getppid(), not prctl(PR_SET_PDEATHSIG): that signal fires when the *thread*
    that spawned the worker exits, and replacements are spawned from short-lived threads.
    An idle worker also sees its socket close; the poll catches one busy with a batch.
    """
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os._exit(1)


def _portable(exc: Exception) -> Exception:
    """`exc` if it survives pickling, else a RuntimeError saying what it was."""
    try:
        pickle.dumps(exc)
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def _worker_main(
    sock: socket.socket,
    spec: WorkerSpec,
    task: Callable[[list[Clip]], Any],
    parent: int,
) -> None:
    """A worker's life: load, say ready, answer batches until the pool closes its socket.

    Every message back is `(ok, value)`: the worker's pid once loaded, then each batch's
    results, or the exception that stopped the load or the batch.
    """
    # Ctrl-C reaches the whole process group; the server stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        start_worker(spec)
    except Exception as exc:
        _send(sock, (False, _portable(exc)))
        return
    _send(sock, (True, os.getpid()))
    while True:
        try:
            clips = _recv(sock)
            try:
                reply = (True, task(clips))
            except Exception as exc:
                reply = (False, _portable(exc))
            _send(sock, reply)
        except (EOFError, OSError):  # the pool closed our socket, or the server is gone
            return


class _Worker:
    """One spawned scoring process and the server's end of its socket.

    Whoever holds a worker (the idle queue, the batcher thread running a batch on it)
    closes its socket; others only signal the process, so a socket is never closed under
    a thread blocked on it.
    """

    def __init__(self, spec: WorkerSpec, task: Callable[[list[Clip]], Any]) -> None:
        ours, theirs = socket.socketpair()
        self.process = _SPAWN.Process(
            target=_worker_main,
            args=(theirs, spec, task, os.getpid()),
            name="knd-scoring",
            daemon=True,
        )
        try:
            self.process.start()
        finally:
            theirs.close()
        self.sock = ours
        self.ready = False

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def wait_ready(self) -> None:
        """Until the model is loaded; the worker's own error if it could not load it."""
        try:
            ok, value = _recv(self.sock, time.monotonic() + START_TIMEOUT_S)
        except EOFError:
            self.process.join(1)
            raise RuntimeError(
                f"scoring worker {self.pid} exited while loading the model "
                f"(exit code {self.process.exitcode})"
            ) from None
        if not ok:
            raise value
        self.ready = True

    def call(self, clips: list[Clip], timeout_s: float) -> tuple[bool, Any]:
        """Send a batch and wait for its `(ok, value)`.

        TimeoutError past `timeout_s`; EOFError or OSError when the worker died.
        """
        deadline = time.monotonic() + timeout_s
        _send(self.sock, clips, deadline)
        return _recv(self.sock, deadline)

    def discard(self) -> None:
        """SIGKILL (a stopped process ignores SIGTERM until it resumes) and close the socket."""
        self.process.kill()
        self.sock.close()


def _names(clips: list[Clip]) -> str:
    return ", ".join(repr(clip.name) for clip in clips) or "(no clips)"


class ScoringPool:
    """`processes` spawned workers running `task`, each batch under a deadline.

    `processes` 0 runs `task` in the calling thread instead: no deadline there, since a
    thread cannot be killed. `task` is `score_clips` in service; tests pass another
    module-level function.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        processes: int,
        task: Callable[[list[Clip]], Any] = score_clips,
        *,
        timeout_s: float = 15.0,
    ) -> None:
        self.spec = spec
        self.processes = processes
        self.task = task
        self.timeout_s = timeout_s
        self.restarts = 0
        self._lock = threading.Lock()
        self._closed = False
        self._workers: set[_Worker] = set()  # spawned and not yet seen to exit
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._watcher: threading.Thread | None = None
        if processes <= 0:
            start_worker(spec)
            return
        # Start every worker now, in parallel, so the first requests find them loaded.
        started = [self._spawn() for _ in range(processes)]
        try:
            for worker in started:
                worker.wait_ready()
                self._idle.put(worker)  # from here on `close` stops it through its socket
        except BaseException:
            self.close()
            raise
        self._watcher = threading.Thread(target=self._watch, name="knd-scoring-watch", daemon=True)
        self._watcher.start()

    @property
    def ready(self) -> bool:
        """Whether some loaded worker is alive to take a batch (false while all restart)."""
        if self.processes <= 0:
            return True
        with self._lock:
            return any(w.ready and w.process.is_alive() for w in self._workers)

    def run(self, clips: list[Clip]) -> Any:
        """Score one batch on a free worker within `timeout_s`, or kill the worker trying.

        Blocks the calling (batcher) thread at most `timeout_s` for a free worker plus
        `timeout_s` for the batch.
        """
        if self.processes <= 0:
            return self.task(clips)
        worker = self._take(time.monotonic() + self.timeout_s)
        try:
            ok, value = worker.call(clips, self.timeout_s)
        except TimeoutError:
            log.error(
                "scoring worker %s missed the %g s deadline (serve.scoring_timeout_s) on %s: "
                "killed; a new one is starting",
                worker.pid,
                self.timeout_s,
                _names(clips),
            )
            worker.discard()
            raise ScoringUnavailableError(
                f"scoring took longer than {self.timeout_s:g} s; the scoring worker was "
                "replaced, retry shortly"
            ) from None
        except (EOFError, OSError):
            log.error("scoring worker %s died while scoring %s", worker.pid, _names(clips))
            worker.discard()
            raise ScoringCrashedError("a scoring worker died while scoring this batch") from None
        self._idle.put(worker)
        if not ok:
            raise value
        return value

    def _take(self, deadline: float) -> _Worker:
        """A free, live worker; one that exited while idle is dropped (the watcher replaces it)."""
        while True:
            try:
                worker = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise ScoringUnavailableError(
                    f"no scoring worker was free within {self.timeout_s:g} s; retry shortly"
                ) from None
            if worker.process.is_alive():
                return worker
            worker.sock.close()

    def _spawn(self) -> _Worker:
        """A new worker process, registered so that `close` stops it; none once closed."""
        if self._closed:
            raise RuntimeError("the scoring pool is closed")
        worker = _Worker(self.spec, self.task)  # not under the lock: /ready takes it
        with self._lock:
            self._workers.add(worker)
            closed = self._closed
        if closed:  # `close` ran while this one was starting and may not have seen it
            worker.discard()
            raise RuntimeError("the scoring pool is closed")
        return worker

    def _watch(self) -> None:
        """Replace every loaded worker that exits: a crash, the deadline's kill, an operator."""
        while not self._closed:
            with self._lock:
                loaded = {w.process.sentinel: w for w in self._workers if w.ready}
            for sentinel in wait(list(loaded), timeout=POLL_S):
                worker = loaded[sentinel]
                worker.process.join(1)  # reap it
                with self._lock:
                    self._workers.discard(worker)
                    if self._closed:
                        return
                    self.restarts += 1
                log.warning(
                    "scoring worker %s exited (code %s); starting another",
                    worker.pid,
                    worker.process.exitcode,
                )
                threading.Thread(
                    target=self._replace, name="knd-scoring-start", daemon=True
                ).start()

    def _replace(self) -> None:
        """Start one worker in place of one that exited; try again while it cannot start."""
        while not self._closed:
            worker: _Worker | None = None
            try:
                worker = self._spawn()
                worker.wait_ready()
            except Exception:
                if worker is not None:
                    with self._lock:
                        self._workers.discard(worker)
                    worker.discard()
                if self._closed:
                    return
                log.exception("a new scoring worker failed to start; trying again")
                time.sleep(RESTART_PAUSE_S)
                continue
            with self._lock:  # `close` empties the idle queue once it has set _closed
                if not self._closed:
                    self._idle.put(worker)
                    return
            worker.discard()
            return

    def close(self) -> None:
        """Stop every worker within CLOSE_GRACE_S, a wedged one too: one still loading is
        killed at once (it holds no work), idle ones see their socket close and exit, and
        whatever is still alive after the grace is SIGKILLed."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        for worker in workers:
            if not worker.ready:
                worker.process.kill()
        while True:
            try:
                self._idle.get_nowait().sock.close()
            except queue.Empty:
                break
        deadline = time.monotonic() + CLOSE_GRACE_S
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.process.is_alive():
                log.warning("scoring worker %s did not exit; killing it", worker.pid)
                worker.process.kill()
                worker.process.join(1)
        if self._watcher is not None:
            self._watcher.join(POLL_S * 4)
