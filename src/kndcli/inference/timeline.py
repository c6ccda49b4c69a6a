"""Long recordings scored by speech segments: the emotion timeline of `knd predict --timeline`.

The recording is decoded block by block (`audio.decode_blocks`), segmented online by the
voice-activity detector (`inference/speech.py`), and each closed segment is scored in
model windows by the same Predictor as every clip (calibration and `min_confidence`
included). Adjacent windows with the same answer are merged into one span. Audio is
dropped as soon as no segment can still need it, so memory stays bounded by
`timeline.max_segment_s` plus a decode block, however long the recording is.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kndcli.audio import AudioError, AudioSource, decode_blocks
from kndcli.config import AudioConfig, TimelineConfig
from kndcli.inference.predictor import Predictor
from kndcli.inference.speech import SpeechSegmenter

# Audio kept behind the newest block beyond the padding: what the detector has not
# judged yet (a part-frame, the resampler's delay) may still open a segment there.
KEEP_BEHIND_S = 0.5


@dataclass
class Span:
    """A stretch of speech with one answer: adjacent windows of the same label merged."""

    start: float
    end: float
    label: str
    confidence: float
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
        }


@dataclass
class Timeline:
    """One recording's speech segments and emotion spans; `error` says why it stopped
    (the spans before the break are kept)."""

    source: str
    labels: list[str]
    duration: float = 0.0
    speech: list[tuple[float, float]] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    label: str | None = None
    confidence: float = 0.0
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def speech_s(self) -> float:
        return sum(end - start for start, end in self.speech)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.source,
            "duration": round(self.duration, 3),
            "speech_s": round(self.speech_s, 3),
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
            "speech": [[round(a, 3), round(b, 3)] for a, b in self.speech],
            "segments": [span.to_dict() for span in self.spans],
        }
        if self.error is not None:
            out["error"] = self.error
        return out

    def csv_rows(self) -> list[list[str]]:
        """One row per span: file, start, end, label, confidence, a column per label."""
        return [
            [
                self.source,
                f"{s.start:.3f}",
                f"{s.end:.3f}",
                s.label,
                f"{s.confidence:.6f}",
                *(f"{s.probabilities[label]:.6f}" for label in self.labels),
            ]
            for s in self.spans
        ]

    def subtitles(self, fmt: str) -> str:
        """The emotion track as WebVTT (`vtt`) or SubRip (`srt`) cues, one per span."""
        sep = "." if fmt == "vtt" else ","
        cues = [
            f"{n}\n{_clock(s.start, sep)} --> {_clock(s.end, sep)}\n"
            f"{s.label} ({s.confidence:.2f})\n"
            for n, s in enumerate(self.spans, 1)
        ]
        head = ["WEBVTT\n"] if fmt == "vtt" else []
        return "\n".join(head + cues)


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


class _Recent:
    """The newest stretch of a recording at one sample rate, addressed in seconds."""

    def __init__(self, sample_rate: int) -> None:
        self.rate = sample_rate
        self.first = 0  # absolute index of samples[0]
        self.samples = np.zeros(0, np.float32)

    @property
    def end_s(self) -> float:
        return (self.first + len(self.samples)) / self.rate

    def append(self, block: np.ndarray) -> None:
        self.samples = np.concatenate([self.samples, block])

    def take(self, start: float, end: float) -> np.ndarray:
        a = max(0, int(round(start * self.rate)) - self.first)
        b = max(a, int(round(end * self.rate)) - self.first)
        return self.samples[a:b]

    def drop_before(self, seconds: float) -> None:
        cut = min(len(self.samples), max(0, int(seconds * self.rate) - self.first))
        if cut:
            self.samples = self.samples[cut:].copy()
            self.first += cut


def long_limits(audio: AudioConfig, cfg: TimelineConfig) -> AudioConfig:
    """The `audio:` limits with the timeline's duration and size; the samples bound
    follows the duration, as memory no longer grows with the file."""
    return replace(
        audio,
        max_duration_s=cfg.max_duration_s,
        max_file_mb=cfg.max_file_mb,
        max_samples=math.ceil(cfg.max_duration_s * audio.max_sample_rate) * audio.max_channels,
    )


def score_recording(
    predictor: Predictor,
    source: AudioSource,
    cfg: TimelineConfig,
    audio: AudioConfig,
    *,
    name: str | None = None,
) -> Timeline:
    """The timeline of one recording; a file that cannot be read comes back with `error`."""
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<upload>")
    builder = _Builder(predictor, Timeline(label, list(predictor.labels)))
    recent = _Recent(predictor.sample_rate)
    segmenter = SpeechSegmenter(predictor.sample_rate, cfg)
    waiting: deque[tuple[float, float]] = deque()
    try:
        blocks = decode_blocks(
            source, audio=long_limits(audio, cfg), sample_rate=predictor.sample_rate, name=label
        )
        for block in blocks:
            recent.append(block)
            waiting.extend(segmenter.push(block))
            ready = []
            while waiting and waiting[0][1] <= recent.end_s:
                ready.append(waiting.popleft())
            builder.score(ready, recent)
            keep = [recent.end_s - cfg.pad_s - KEEP_BEHIND_S]
            keep += [start for start, _ in waiting]
            if segmenter.open_since is not None:
                keep.append(segmenter.open_since)
            recent.drop_before(min(keep))
    except AudioError as exc:  # the audio before the break is still scored below
        builder.timeline.error = exc.problem
    waiting.extend(segmenter.finish())
    builder.score([(a, min(b, recent.end_s)) for a, b in waiting if a < recent.end_s], recent)
    builder.timeline.duration = recent.end_s
    return builder.finish()


class _Builder:
    """Scores segments into spans and keeps the running summary of the recording."""

    def __init__(self, predictor: Predictor, timeline: Timeline) -> None:
        self.predictor = predictor
        self.timeline = timeline
        self.weighted = np.zeros(len(predictor.labels), np.float64)

    def score(self, segments: list[tuple[float, float]], recent: _Recent) -> None:
        segments = [(a, b) for a, b in segments if b > a]
        if not segments:
            return
        clips = [recent.take(a, b) for a, b in segments]
        scored = self.predictor.score_windows(clips)
        for (start, end), (starts, probs) in zip(segments, scored, strict=True):
            self.timeline.speech.append((start, end))
            edges = [start, *(start + t for t in starts[1:]), end]
            for i, p in enumerate(probs):
                self._add(edges[i], max(edges[i], edges[i + 1]), p, first=i == 0)

    def _add(self, start: float, end: float, probs: np.ndarray, first: bool) -> None:
        """Add one window's stretch, merged into the previous span of the same segment
        when the answer is the same."""
        labels = self.predictor.labels
        self.weighted += (end - start) * probs
        answer = self.predictor.answer(probs)
        spans = self.timeline.spans
        if not first and spans and spans[-1].label == answer:
            span = spans[-1]
            prev = np.array([span.probabilities[label] for label in labels])
            total = (span.end - span.start) + (end - start)
            mean = (prev * (span.end - span.start) + probs * (end - start)) / max(total, 1e-9)
            span.end = end
        else:
            mean = probs
            span = Span(start, end, answer, 0.0, {})
            spans.append(span)
        span.probabilities = {label: float(v) for label, v in zip(labels, mean, strict=True)}
        best = labels.index(answer) if answer in labels else int(mean.argmax())
        span.confidence = float(mean[best])

    def finish(self) -> Timeline:
        total = self.weighted.sum()
        if total > 0:
            mean = self.weighted / total
            self.timeline.label = self.predictor.answer(mean)
            self.timeline.confidence = float(mean.max())
            self.timeline.probabilities = {
                label: float(v) for label, v in zip(self.predictor.labels, mean, strict=True)
            }
        return self.timeline


def write_files(timeline: Timeline, directory: Path, stem: str) -> list[Path]:
    """`stem`.json, .csv, .vtt and .srt in `directory`: the timeline for programs, sheets
    and video players (the PNG is the CLI's, as it needs matplotlib)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, text in (
        (".json", json.dumps(timeline.to_dict(), indent=1) + "\n"),
        (".csv", _csv_text(timeline)),
        (".vtt", timeline.subtitles("vtt")),
        (".srt", timeline.subtitles("srt")),
    ):
        path = directory / f"{stem}{suffix}"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def csv_header(labels: list[str]) -> list[str]:
    return ["file", "start", "end", "label", "confidence", *labels]


def _csv_text(timeline: Timeline) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(csv_header(timeline.labels))
    writer.writerows(timeline.csv_rows())
    return out.getvalue()
