"""The Predictor: a bundle's model behind the shared audio path, batched and windowed.

The ONNX path imports numpy, soundfile, soxr and onnxruntime only; `backend="torch"`
rebuilds the torch model from `weights.safetensors` for parity checks and profiling.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kndcli.audio import Audio, AudioError, AudioSource, audio_features, decode
from kndcli.config import AudioConfig, InferenceConfig, check_min_confidence
from kndcli.cpus import usable_cpus
from kndcli.errors import UsageError
from kndcli.inference.bundle import ONNX_FILE, Bundle, load_bundle
from kndcli.inference.calibration import apply_temperature
from kndcli.inference.speech import trim_bounds
from kndcli.inference.windowing import make_windows
from kndcli.timing import Stage, time_forward, untimed


@dataclass
class Prediction:
    """One clip's result; `error` is set instead of a label when the clip was unusable."""

    source: str
    label: str | None = None
    confidence: float = 0.0
    probabilities: dict[str, float] = field(default_factory=dict)
    duration: float = 0.0
    windows: list[dict[str, Any]] | None = None
    features: dict[str, float] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def top_label(self) -> str | None:
        """The most probable class, even where `label` says "uncertain"."""
        if not self.probabilities:
            return self.label
        return max(self.probabilities.items(), key=lambda kv: kv[1])[0]

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]

    def to_dict(self, timeline: bool = False) -> dict[str, Any]:
        if self.error is not None:
            return {"file": self.source, "error": self.error}
        out: dict[str, Any] = {
            "file": self.source,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
            "duration": round(self.duration, 4),
        }
        if timeline and self.windows is not None:
            out["windows"] = self.windows
        return out


UNCERTAIN = "uncertain"


def answer(probs: np.ndarray, labels: list[str], min_confidence: float) -> str:
    """The most probable label, or "uncertain" below the confidence threshold."""
    best = int(probs.argmax())
    return labels[best] if probs[best] >= min_confidence else UNCERTAIN


class Predictor:
    """Scores clips with a bundle's model. Thread-safe: ONNX Runtime sessions are.

    Probabilities are calibrated with the bundle's temperature; below `min_confidence`
    a clip (or a timeline window) is answered "uncertain" instead of a label.
    """

    def __init__(
        self,
        bundle: Bundle,
        backend: str = "onnx",
        threads: int | None = None,
        min_confidence: float = 0.0,
        *,
        audio: AudioConfig | None = None,
        stage: Stage = untimed,
        device: str = "cpu",
        onnx_profile_prefix: str | None = None,
    ) -> None:
        """`audio` is the `audio:` section whose limits every clip is decoded under (the
        defaults when None). The other keyword-only arguments are `knd profile`'s hooks
        into this, the real path: a stage hook (decode, resample, windowing, model,
        post_processing; frontend and backbone inside the torch model), the torch
        backend's device, and where ONNX Runtime writes its operator profile."""
        check_min_confidence(min_confidence)
        self.audio = audio or AudioConfig()
        # The key a too-long clip's error names: serve replaces the duration limit.
        self.duration_key = "audio.max_duration_s"
        self.stage = stage
        self.bundle = bundle
        self.temperature = bundle.temperature
        self.min_confidence = min_confidence
        self.labels = bundle.labels
        self.sample_rate = bundle.sample_rate
        self.window = int(round(bundle.window_seconds * self.sample_rate))
        self.hop = max(1, int(round(bundle.hop_seconds * self.sample_rate)))
        self.backend = backend
        if backend == "onnx":
            self._run = self._onnx_runner(threads, onnx_profile_prefix)
        elif backend == "torch":
            self._run = self._torch_runner(device)
        else:
            raise UsageError(f"backend {backend!r}: choose 'onnx' or 'torch'")

    @classmethod
    def from_config(
        cls,
        path: str | os.PathLike,
        inference: InferenceConfig | None = None,
        threads: int | None = None,
        audio: AudioConfig | None = None,
    ) -> Predictor:
        """The bundle's Predictor with the `inference:` section applied, the one way every
        caller (predict, serve, evaluate, drift, profile) builds it: backend,
        min_confidence, and the window and hop when they are set; clips are decoded under
        the `audio:` section's limits (serve passes its own duration limit in it)."""
        inf = inference or InferenceConfig()
        predictor = cls(
            load_bundle(path),
            backend=inf.backend,
            threads=threads,
            min_confidence=inf.min_confidence,
            audio=audio,
        )
        if inf.window_s > 0:
            predictor.window = int(round(inf.window_s * predictor.sample_rate))
        if inf.hop_s > 0:
            predictor.hop = max(1, int(round(inf.hop_s * predictor.sample_rate)))
        return predictor

    # ------------------------------------------------------------------ runners
    def _onnx_runner(self, threads: int | None, profile_prefix: str | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or usable_cpus()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning intra-op threads burn the cores that decode threads (predict) and request
        # handling (serve) need; without spinning, 2 threads cost the CPU of 1 when idle.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        session = ort.InferenceSession(
            str(self.bundle.path(ONNX_FILE)), options, providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name

        def run(batch: np.ndarray) -> np.ndarray:
            with self.stage("model"):
                return session.run(None, {name: batch})[0]

        self.session = session
        return run

    def _torch_runner(self, device: str = "cpu"):
        import torch

        from kndcli.models.emotion import WithProbabilities

        wrapped = WithProbabilities(self.bundle.torch_model()).to(device).eval()
        if self.stage is not untimed:
            for part in ("frontend", "backbone"):
                time_forward(getattr(wrapped.model, part), self.stage, part)

        def run(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode(), self.stage("model"):
                return wrapped(torch.from_numpy(batch).to(device)).cpu().numpy()

        return run

    # ------------------------------------------------------------------ scoring
    def decode(
        self, source: AudioSource, *, name: str | None = None, formats: list[str] | None = None
    ) -> Audio:
        """The shared audio path at the bundle's rate, under this Predictor's limits;
        `formats` replaces `audio.formats` for audio the caller made itself."""
        audio = self.audio if formats is None else replace(self.audio, formats=formats)
        with self.stage("decode"):
            return decode(
                source,
                audio=audio,
                sample_rate=self.sample_rate,
                name=name,
                stage=self.stage,
                duration_key=self.duration_key,
            )

    def prepare(self, samples: np.ndarray) -> tuple[np.ndarray, list[int], int]:
        """Trim as in training, then cut into model windows: (windows, starts, trim offset)."""
        offset = 0
        if self.bundle.trim_silence:
            offset, stop = trim_bounds(samples, self.sample_rate, self.bundle.trim_method)
            samples = samples[offset:stop]
        windows, starts = make_windows(samples, self.window, self.hop)
        return windows, starts, offset

    def score_batches(self, batches: list[np.ndarray], max_batch: int = 64) -> list[np.ndarray]:
        """Probabilities for each clip's windows, running all windows in shared batches."""
        if not batches:
            return []
        stacked = np.concatenate(batches)
        out = np.concatenate(
            [self._run(stacked[i : i + max_batch]) for i in range(0, len(stacked), max_batch)]
        )
        bounds = np.cumsum([0] + [len(b) for b in batches])
        return [out[a:b] for a, b in itertools.pairwise(bounds)]

    def score_windows(self, clips: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per clip: its windows' start times in seconds from the clip's start (after the
        silence trim) and their calibrated probabilities (windows x labels), scored in
        shared batches. The timeline of a long recording is built from these."""
        prepared = [self.prepare(samples) for samples in clips]
        probs = self.score_batches([w for w, _, _ in prepared])
        return [
            (
                (offset + np.asarray(starts, dtype=np.float64)) / self.sample_rate,
                apply_temperature(p, self.temperature),
            )
            for (_, starts, offset), p in zip(prepared, probs, strict=True)
        ]

    def predict_audios(
        self, audios: list[Audio], *, timeline: bool = False, features: bool = False
    ) -> list[Prediction]:
        with self.stage("windowing"):
            prepared = [self.prepare(a.samples) for a in audios]
        probs = self.score_batches([w for w, _, _ in prepared])
        with self.stage("post_processing"):
            return [
                self._prediction(audio, p, starts, offset, timeline, features)
                for audio, (_, starts, offset), p in zip(audios, prepared, probs, strict=True)
            ]

    def _prediction(
        self,
        audio: Audio,
        probs: np.ndarray,
        starts: list[int],
        offset: int,
        timeline: bool,
        features: bool,
    ) -> Prediction:
        probs = apply_temperature(probs, self.temperature)
        mean = probs.mean(axis=0)
        best = int(mean.argmax())
        windows = None
        if timeline:
            windows = [
                {
                    "start": round((offset + s) / self.sample_rate, 3),
                    # A clip shorter than a window is repeated to fill it; the window
                    # still ends where the clip does.
                    "end": round(
                        min((offset + s + self.window) / self.sample_rate, audio.duration), 3
                    ),
                    "label": self.answer(p),
                    "confidence": round(float(p.max()), 6),
                }
                for s, p in zip(starts, probs, strict=True)
            ]
        return Prediction(
            source=audio.source,
            label=self.answer(mean),
            confidence=float(mean[best]),
            probabilities={label: float(v) for label, v in zip(self.labels, mean, strict=True)},
            duration=audio.duration,
            windows=windows,
            features=audio_features(audio) if features else None,
        )

    def answer(self, probs: np.ndarray) -> str:
        return answer(probs, self.labels, self.min_confidence)

    def predict_paths(
        self,
        paths: Iterable[str | os.PathLike],
        *,
        batch_size: int = 32,
        workers: int = 0,
        timeline: bool = False,
        features: bool = False,
        read: Callable[[str], AudioSource] | None = None,
    ) -> Iterator[Prediction]:
        """Decode in a thread pool and score in batches; bad files yield error predictions.

        `read` turns each name into what is decoded (e.g. a gs:// URL into its bytes);
        the name stays the prediction's `source`.
        """
        paths = [str(p) for p in paths] if read else [Path(p) for p in paths]
        # One decoder per core: more only fight ONNX Runtime for the same cores (measured).
        workers = workers or min(8, usable_cpus())

        def load(path: str | Path) -> Audio | Prediction:
            try:
                if read is None:
                    return self.decode(path)
                return self.decode(read(str(path)), name=str(path))
            except AudioError as exc:
                return Prediction(source=str(path), error=exc.problem)
            except OSError as exc:  # a listed object gone or unreadable: this file only
                return Prediction(source=str(path), error=f"cannot read ({exc})")

        # Decode at most a few batches ahead: a directory of 100k clips must not be held
        # in memory at once, yet the decoders keep working while a batch is scored.
        ahead = max(2 * batch_size, 2 * workers)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            try:
                todo = iter(paths)
                inflight: deque[Future[Audio | Prediction]] = deque(
                    pool.submit(load, path) for path in itertools.islice(todo, ahead)
                )
                pending: list[Audio | Prediction] = []
                while inflight:
                    pending.append(inflight.popleft().result())
                    for path in itertools.islice(todo, 1):
                        inflight.append(pool.submit(load, path))
                    if len(pending) >= batch_size:
                        yield from self.predict_decoded(
                            pending, timeline=timeline, features=features
                        )
                        pending = []
                yield from self.predict_decoded(pending, timeline=timeline, features=features)
            except BaseException:
                # A read that stops the run (a bucket refusing every read), or a caller
                # that stops early: the reads queued behind it are dropped, not waited for
                # (each could spend half a minute in gcsfs' retries).
                pool.shutdown(wait=False, cancel_futures=True)
                raise

    def predict_decoded(
        self, items: list[Audio | Prediction], *, timeline: bool = False, features: bool = False
    ) -> list[Prediction]:
        """Score the decoded clips in one batch; error predictions pass through in place."""
        audios = [item for item in items if isinstance(item, Audio)]
        scored = iter(self.predict_audios(audios, timeline=timeline, features=features))
        return [item if isinstance(item, Prediction) else next(scored) for item in items]
