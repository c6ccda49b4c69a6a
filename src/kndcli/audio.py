"""The one audio path: decode, down-mix, resample and validate, plus per-clip features.

`data prepare`, `predict` and `serve` all call `decode`, so the model never sees audio
that was read differently in training and in production.
"""

from __future__ import annotations

import functools
import io
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from kndcli.errors import KndError
from kndcli.timing import Stage, untimed

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif")
_BLOCK_FRAMES = 1 << 16
_CLIP_LEVEL = 0.999
# Formats whose frame count in the header is exact; compressed streams only estimate it.
_EXACT_LENGTH_FORMATS = {"WAV", "WAVEX", "FLAC", "AIFF", "W64", "RF64"}


class AudioError(KndError):
    """A clip that cannot be used, with the file and the reason."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


@dataclass
class Audio:
    """Mono float32 samples at `sample_rate`, plus what the original file looked like."""

    samples: np.ndarray
    sample_rate: int
    orig_sample_rate: int
    channels: int
    source: str
    peak: float
    clipping_ratio: float

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


AudioSource = str | os.PathLike | bytes | BinaryIO


def decode(
    source: AudioSource,
    *,
    sample_rate: int = 16000,
    max_duration_s: float | None = 60.0,
    max_bytes: int | None = None,
    name: str | None = None,
    stage: Stage = untimed,
) -> Audio:
    """Read any soundfile-readable clip into mono float32 at `sample_rate`.

    Reads in blocks so an over-long file is rejected after at most `max_duration_s` of
    audio, whatever its header claims. Resampling is interleaved with reading, so it is
    marked as stage "resample" through `stage` (the `knd profile` hook) from in here.
    """
    import soundfile as sf

    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<upload>")
    fileobj, size = _open(source, label)
    if size == 0:
        raise AudioError(label, "empty file (0 bytes)")
    if max_bytes is not None and size is not None and size > max_bytes:
        raise AudioError(
            label, f"file is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB limit"
        )
    _check_riff_length(fileobj, label, size)
    try:
        with fileobj, sf.SoundFile(fileobj) as snd:
            return _read(snd, label, sample_rate, max_duration_s, stage)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as exc:
        reason = str(exc).split(":")[-1].strip() or type(exc).__name__
        raise AudioError(label, f"not a readable audio file ({reason})") from None


def _open(source: AudioSource, label: str) -> tuple[BinaryIO, int | None]:
    if isinstance(source, bytes):
        return io.BytesIO(source), len(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise AudioError(label, "no such file")
        if path.is_dir():
            raise AudioError(label, "is a directory, not an audio file")
        try:
            return path.open("rb"), path.stat().st_size
        except OSError as exc:
            raise AudioError(label, f"cannot open ({exc.strerror})") from None
    try:
        here = source.tell()
        source.seek(0, io.SEEK_END)
        size = source.tell() - here
        source.seek(here)
    except (OSError, AttributeError):
        size = None
    return source, size


def _check_riff_length(fileobj: BinaryIO, label: str, size: int | None) -> None:
    """Catch WAV headers that promise more audio than the file holds.

    libsndfile silently shortens such files; a truncated upload should fail instead.
    """
    if size is None:
        return
    start = fileobj.tell()
    head = fileobj.read(12)
    try:
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        offset = 12
        while offset + 8 <= size:
            fileobj.seek(start + offset)
            chunk = fileobj.read(8)
            if len(chunk) < 8:
                return
            chunk_id, chunk_size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if chunk_id == b"data":
                available = size - offset - 8
                if chunk_size not in (0, 0xFFFFFFFF) and chunk_size > available:
                    raise AudioError(
                        label,
                        f"header declares {chunk_size} bytes of audio but the file holds "
                        f"only {available} (truncated or corrupt)",
                    )
                return
            offset += 8 + chunk_size + (chunk_size & 1)
    finally:
        fileobj.seek(start)


def _read(snd, label: str, sample_rate: int, max_duration_s: float | None, stage: Stage) -> Audio:
    import soxr

    orig_sr, channels, declared = int(snd.samplerate), int(snd.channels), int(snd.frames)
    if orig_sr <= 0 or channels <= 0:
        raise AudioError(label, "header has no valid sample rate or channel count")
    limit = None if max_duration_s is None else int(max_duration_s * orig_sr)
    exact = snd.format in _EXACT_LENGTH_FORMATS
    if limit is not None and exact and declared > limit:
        raise AudioError(
            label, f"too long: {declared / orig_sr:.1f} s (limit {max_duration_s:g} s)"
        )
    resampler = (
        None
        if orig_sr == sample_rate
        else soxr.ResampleStream(orig_sr, sample_rate, 1, dtype="float32", quality="HQ")
    )
    pieces: list[np.ndarray] = []
    total = clipped = 0
    peak = 0.0
    for block in snd.blocks(blocksize=_BLOCK_FRAMES, dtype="float32", always_2d=True):
        total += len(block)
        if limit is not None and total > limit:
            raise AudioError(label, f"too long: more than {max_duration_s:g} s of audio")
        # One pass for the peak; NaN and inf propagate through max, so it checks them too.
        block_peak = float(max(block.max(initial=0.0), -block.min(initial=0.0)))
        if not np.isfinite(block_peak):
            raise AudioError(label, "contains NaN or infinite samples")
        peak = max(peak, block_peak)
        if block_peak >= _CLIP_LEVEL:
            clipped += int((np.abs(block) >= _CLIP_LEVEL).any(axis=1).sum())
        mono = block.mean(axis=1) if channels > 1 else block[:, 0]
        if resampler is not None:
            with stage("resample"):
                mono = resampler.resample_chunk(mono)
        pieces.append(mono)
    if resampler is not None:
        with stage("resample"):
            pieces.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    if total == 0:
        raise AudioError(label, "contains no audio frames")
    if exact and declared > 0 and total < declared:
        raise AudioError(
            label, f"header declares {declared} frames but only {total} could be read (truncated)"
        )
    samples = np.ascontiguousarray(np.concatenate(pieces), dtype=np.float32)
    return Audio(
        samples=samples,
        sample_rate=sample_rate,
        orig_sample_rate=orig_sr,
        channels=channels,
        source=label,
        peak=peak,
        clipping_ratio=clipped / total,
    )


def find_audio_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files, directories (recursively) and globs into a sorted list of audio files."""
    import glob

    found: list[Path] = []
    for raw in paths:
        text = str(raw)
        matches = (
            [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            if any(c in text for c in "*?[")
            else [Path(text)]
        )
        for path in matches:
            if path.is_dir():
                found.extend(
                    p
                    for p in sorted(path.rglob("*"))
                    if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS
                )
            else:
                found.append(path)
    return found


def speech_bounds(
    samples: np.ndarray, sample_rate: int, *, top_db: float = 40.0, margin_s: float = 0.1
) -> tuple[int, int]:
    """Start and stop sample of the part louder than the loudest frame minus `top_db`.

    Acted-emotion corpora start with about a second of silence; training and prediction
    both trim with this so a crop of a few seconds holds speech, not room tone.
    """
    frame = max(1, int(0.02 * sample_rate))
    n = len(samples) // frame
    if n < 2:
        return 0, len(samples)
    power = (samples[: n * frame].reshape(n, frame).astype(np.float64) ** 2).mean(axis=1)
    db = 10 * np.log10(power + 1e-12)
    if db.max() < -80:
        return 0, len(samples)
    loud = np.flatnonzero(db > db.max() - top_db)
    margin = int(margin_s * sample_rate)
    return max(0, int(loud[0]) * frame - margin), min(
        len(samples), (int(loud[-1]) + 1) * frame + margin
    )


# ----------------------------------------------------------------------------- features

FEATURE_NAMES: tuple[str, ...] = (
    "duration_s",
    "sample_rate",
    "channels",
    "rms_dbfs",
    "peak",
    "clipping_ratio",
    "silence_ratio",
    "snr_db",
    "spectral_centroid_hz",
    "spectral_rolloff_hz",
    "spectral_flatness",
    "zero_crossing_rate",
    "pitch_hz",
    "pitch_std_hz",
    "band_0_300",
    "band_300_1000",
    "band_1000_2000",
    "band_2000_4000",
    "band_4000_8000",
)
_BANDS = ((0, 300), (300, 1000), (1000, 2000), (2000, 4000), (4000, 8000))
_EPS = 1e-10


def audio_features(audio: Audio) -> dict[str, float]:
    """Per-clip descriptors that move when production audio drifts from training audio.

    Framed with numpy in one pass (32 ms frames, 16 ms hop), so it costs well under a
    millisecond per second of audio and can run on every request.
    """
    x, sr = audio.samples, audio.sample_rate
    frame = int(round(0.032 * sr))
    hop = frame // 2
    if len(x) < frame:
        x = np.pad(x, (0, frame - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, frame)[::hop]
    frame_power = np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / frame + _EPS
    frame_db = 10 * np.log10(frame_power)
    active = frame_db > -50.0
    if not active.any():
        active = np.ones_like(active)

    window, freqs, band_masks = _analysis_tables(frame, sr)
    bins = np.fft.rfft(frames * window, axis=1)
    spectrum = bins.real**2 + bins.imag**2 + np.float32(_EPS)
    spec = spectrum[active]
    energy = spec.sum(axis=1, dtype=np.float64)
    centroid = float((spec @ freqs / energy).mean())
    cumulative = np.cumsum(spec, axis=1)
    rolloff = float(freqs[np.argmax(cumulative >= 0.85 * cumulative[:, -1:], axis=1)].mean())
    flatness = float((np.exp(np.log(spec).mean(axis=1)) / spec.mean(axis=1)).mean())
    band_energy = spec.sum(axis=0, dtype=np.float64)
    total_energy = float(band_energy.sum())
    bands = {
        f"band_{lo}_{hi}": float(band_energy[mask].sum() / total_energy)
        for (lo, hi), mask in zip(_BANDS, band_masks, strict=True)
    }
    signs = np.signbit(frames)
    zcr = float((signs[:, 1:] != signs[:, :-1]).mean())
    quiet, loud = np.percentile(frame_db, [10, 90])
    pitch, pitch_std = _pitch(frames[active], spectrum[active], sr)
    rms = float(np.sqrt(np.mean(audio.samples.astype(np.float64) ** 2)) + _EPS)
    return {
        "duration_s": audio.duration,
        "sample_rate": float(audio.orig_sample_rate),
        "channels": float(audio.channels),
        "rms_dbfs": float(20 * np.log10(rms)),
        "peak": audio.peak,
        "clipping_ratio": audio.clipping_ratio,
        "silence_ratio": float(1.0 - (frame_db > -50.0).mean()),
        "snr_db": float(loud - quiet),
        "spectral_centroid_hz": centroid,
        "spectral_rolloff_hz": rolloff,
        "spectral_flatness": flatness,
        "zero_crossing_rate": zcr,
        "pitch_hz": pitch,
        "pitch_std_hz": pitch_std,
        **bands,
    }


@functools.lru_cache(maxsize=8)
def _analysis_tables(frame: int, sr: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Window, bin frequencies and band masks, computed once per frame size and rate."""
    freqs = np.fft.rfftfreq(frame, 1.0 / sr)
    masks = [(freqs >= lo) & (freqs < hi) for lo, hi in _BANDS]
    return np.hanning(frame).astype(np.float32), freqs, masks


def _pitch(frames: np.ndarray, power: np.ndarray, sr: int) -> tuple[float, float]:
    """Median and spread of F0 over voiced frames, from the FFT autocorrelation."""
    if len(frames) == 0:
        return 0.0, 0.0
    n = frames.shape[1]
    autocorr = np.fft.irfft(power, n=n, axis=1)
    autocorr /= autocorr[:, :1] + _EPS
    lo, hi = int(sr / 400), min(int(sr / 60), n - 1)
    lags = autocorr[:, lo:hi]
    best = lags.argmax(axis=1)
    strength = lags[np.arange(len(lags)), best]
    voiced = strength > 0.4
    if not voiced.any():
        return 0.0, 0.0
    f0 = sr / (best[voiced] + lo)
    return float(np.median(f0)), float(np.std(f0))
