"""Scoring workers: decode, drift features and the model, in processes of their own.

Why processes: per request the server spends ~5 ms of CPU on audio (FLAC decode,
resampling, the drift features) and the model, and much of the audio part holds the
GIL. In one process the event loop, the decoders and the batcher then take turns on one
GIL and a 2-core machine tops out near 1.4 busy cores (~155 requests/s, measured). With
the work in `processes` spawned workers, the server process only parses HTTP and writes
the log; 16 clients on 2 cores reach ~230 requests/s. Several uvicorn workers would also
escape the GIL, but keep-alive connections stick to the worker that accepted them (15 of
16 on one worker, measured), while a pool hands every batch to whichever worker is free.

A worker that dies (a decoder crash on a hostile file) breaks only the batches it was
running: the pool is rebuilt, and the batcher retries those clips one by one, so only
the clip that kills a worker is refused.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from kndcli.audio import Audio, AudioError
from kndcli.config import InferenceConfig
from kndcli.inference.predictor import Prediction, Predictor

log = logging.getLogger(__name__)


class ScoringCrashedError(RuntimeError):
    """A scoring worker died while it held this batch."""


@dataclass(frozen=True)
class Clip:
    """One upload as it crosses to a worker: bytes and a display name, nothing else."""

    data: bytes
    name: str


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to load the model and apply the upload limits."""

    model: str
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    threads: int = 1
    max_duration_s: float | None = None
    max_bytes: int | None = None


_state: tuple[Predictor, WorkerSpec] | None = None


def start_worker(spec: WorkerSpec) -> None:
    """Load the model once per worker, and run one pass so no request pays the warm-up."""
    global _state
    predictor = Predictor.from_config(spec.model, spec.inference, threads=spec.threads)
    predictor.score_batches([np.zeros((1, predictor.window), np.float32)])
    _state = (predictor, spec)


def score_clips(clips: list[Clip]) -> list[Prediction]:
    """Predictions with drift features and timeline; unusable clips come back with `error`."""
    if _state is None:
        raise RuntimeError("scoring worker not started")
    predictor, spec = _state
    items: list[Audio | Prediction] = []
    for clip in clips:
        try:
            items.append(
                predictor.decode(
                    clip.data,
                    name=clip.name,
                    max_duration_s=spec.max_duration_s,
                    max_bytes=spec.max_bytes,
                )
            )
        except AudioError as exc:
            items.append(Prediction(source=clip.name, error=str(exc)))
    return predictor.predict_decoded(items, timeline=True, features=True)


def _pid() -> int:
    return os.getpid()


class ScoringPool:
    """`processes` spawned workers running `task`; 0 runs it in the calling thread instead.

    `task` is `score_clips` in service; tests pass another module-level function.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        processes: int,
        task: Callable[[list[Clip]], list[Prediction]] = score_clips,
    ) -> None:
        self.spec = spec
        self.processes = processes
        self.task = task
        self.restarts = 0
        self._lock = threading.Lock()
        self._executor: Executor | None = None
        if processes <= 0:
            start_worker(spec)
        else:
            self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        # spawn, not fork: the server process already runs threads (uvicorn, ONNX Runtime).
        executor = ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=start_worker,
            initargs=(self.spec,),
        )
        # Start every worker now, in parallel, so the first requests find them loaded.
        for future in [executor.submit(_pid) for _ in range(self.processes)]:
            future.result()
        return executor

    def run(self, clips: list[Clip]) -> list[Prediction]:
        """Score one batch, blocking the calling (batcher) thread until a worker returns it."""
        executor = self._executor
        if executor is None:
            return self.task(clips)
        try:
            return executor.submit(self.task, clips).result()
        except BrokenProcessPool:
            self._restart(executor)
            raise ScoringCrashedError("a scoring worker died while scoring this batch") from None

    def _restart(self, broken: Executor) -> None:
        """Replace the pool once per breakage, however many batches saw it break."""
        with self._lock:
            if self._executor is not broken:
                return
            log.error("a scoring worker died; starting a new pool")
            broken.shutdown(wait=False, cancel_futures=True)
            self.restarts += 1
            self._executor = self._start()

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
