"""Speech segments of a recording, found online by WebRTC's voice-activity detector.

WebRTC VAD (the `webrtcvad-wheels` build: a small C extension with no dependencies, the
detector of Chrome's audio stack) judges 30 ms frames of 16-bit PCM; `SpeechSegmenter`
turns those judgements into segments with the `timeline:` rules (bridge short pauses,
drop blips, pad, cut speech that runs on) while the audio is still arriving, so a
recording of any length is segmented with bounded memory.
"""

from __future__ import annotations

import numpy as np

from kndcli.audio import speech_bounds
from kndcli.config import TimelineConfig

VAD_RATES = (8000, 16000, 32000, 48000)
FRAME_S = 0.03


class SpeechSegmenter:
    """Feed mono float32 blocks at `sample_rate`; closed segments come back in seconds.

    A segment is closed once `min_silence_s` of non-speech follows it (or it reaches
    `max_segment_s`), so its padded end may lie up to `pad_s` beyond the audio pushed
    so far; `finish` closes the last one.
    """

    def __init__(self, sample_rate: int, cfg: TimelineConfig) -> None:
        import webrtcvad

        self.cfg = cfg
        self.vad = webrtcvad.Vad(cfg.vad_mode)
        self.rate = sample_rate if sample_rate in VAD_RATES else 16000
        self.resampler = None
        if self.rate != sample_rate:
            import soxr

            self.resampler = soxr.ResampleStream(sample_rate, self.rate, 1, dtype="float32")
        self.frame = int(self.rate * FRAME_S)
        self.pending = np.zeros(0, np.int16)
        self.frames = 0  # VAD frames judged so far
        self.start: int | None = None  # first frame of the open segment
        self.last_speech = 0  # frame after the open segment's last speech frame
        self.closed_until = 0.0  # end of the previous segment (seconds), padding included
        self.finished = False

    @property
    def open_since(self) -> float | None:
        """Where the open segment's audio may begin (seconds), or None when none is open."""
        if self.start is None:
            return None
        return max(self.closed_until, self.start * FRAME_S - self.cfg.pad_s)

    def push(self, block: np.ndarray) -> list[tuple[float, float]]:
        if self.finished:
            raise RuntimeError("SpeechSegmenter.push after finish: the recording has ended")
        if self.resampler is not None:
            block = self.resampler.resample_chunk(block)
        return self._judge_block(block)

    def _judge_block(self, block: np.ndarray) -> list[tuple[float, float]]:
        pcm = (np.clip(block, -1.0, 1.0) * 32767).astype(np.int16)
        self.pending = np.concatenate([self.pending, pcm])
        usable = len(self.pending) - len(self.pending) % self.frame
        frames, self.pending = self.pending[:usable], self.pending[usable:]
        closed: list[tuple[float, float]] = []
        for i in range(0, usable, self.frame):
            speech = self.vad.is_speech(frames[i : i + self.frame].tobytes(), self.rate)
            closed.extend(self._judge(speech))
        return closed

    def finish(self) -> list[tuple[float, float]]:
        """The segments still open, closed at the end of the recording.

        A resampler holds back up to a few dozen milliseconds until told the input has
        ended (up to 0.09 s measured at 11.025 kHz): they are judged first, or speech
        running to the end of a recording at such a rate would end early. Nothing may be
        pushed after this.
        """
        if self.finished:
            raise RuntimeError("SpeechSegmenter.finish was called already")
        self.finished = True
        closed: list[tuple[float, float]] = []
        if self.resampler is not None:
            closed = self._judge_block(
                self.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            )
        if self.start is None:
            return closed
        return closed + self._close(self.last_speech)

    def _judge(self, speech: bool) -> list[tuple[float, float]]:
        n = self.frames
        self.frames += 1
        cfg = self.cfg
        if speech:
            if self.start is None:
                self.start = n
            self.last_speech = n + 1
            if (n + 1 - self.start) * FRAME_S >= cfg.max_segment_s:
                return self._close(n + 1)
        elif self.start is not None and (n + 1 - self.last_speech) * FRAME_S >= cfg.min_silence_s:
            return self._close(self.last_speech)
        return []

    def _close(self, end_frame: int) -> list[tuple[float, float]]:
        start, begin = self.start, self.open_since
        self.start = None
        if start is None or begin is None or (end_frame - start) * FRAME_S < self.cfg.min_speech_s:
            return []
        end = end_frame * FRAME_S + self.cfg.pad_s
        self.closed_until = end
        return [(begin, end)]


# The VAD trim's rules: 0.3 s of speech counts, 0.3 s of non-speech ends a segment, 0.1 s
# of padding (the energy trim's margin).
_TRIM_VAD = TimelineConfig(vad_mode=2, min_silence_s=0.3, min_speech_s=0.3, pad_s=0.1)


def vad_bounds(samples: np.ndarray, sample_rate: int) -> tuple[int, int]:
    """From the first speech segment's start to the last one's end (the whole clip if none).

    Unlike the energy trim, this holds under noise: mixed in at 30 dB SNR or lower, the
    leading and trailing silence of a clip is noise within 40 dB of its peak, which the
    energy trim keeps (docs/quality.md, "Noisy clips keep their silence").
    """
    segmenter = SpeechSegmenter(sample_rate, _TRIM_VAD)
    segments = segmenter.push(samples.astype(np.float32)) + segmenter.finish()
    if not segments:
        return 0, len(samples)
    start = max(0, int(segments[0][0] * sample_rate))
    return start, max(start, min(len(samples), int(segments[-1][1] * sample_rate)))


def trim_bounds(samples: np.ndarray, sample_rate: int, method: str) -> tuple[int, int]:
    """The speech span `train.trim_method` keeps: training and the Predictor both call it."""
    if method == "vad":
        return vad_bounds(samples, sample_rate)
    if method == "energy":
        return speech_bounds(samples, sample_rate)
    raise ValueError(f"unknown trim method {method!r}: energy or vad")
