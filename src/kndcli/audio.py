"""The one audio path: decode, down-mix, resample and validate, plus per-clip features.

`data prepare`, `predict` and `serve` all call `decode`, so the model never sees audio
that was read differently in training and in production.
"""

from __future__ import annotations

import functools
import io
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from kndcli.config import AudioConfig
from kndcli.errors import KndError
from kndcli.timing import Stage, untimed

if TYPE_CHECKING:
    import soundfile as sf

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif")
_BLOCK_FRAMES = 1 << 16
_CLIP_LEVEL = 0.999
# Full scale is 1.0. Float files may go a little past it; samples a thousand times past it
# are a wrong scale (integers written as floats), and past about 1e16 they overflow the
# model's float32 spectrogram into NaN probabilities.
MAX_FLOAT_PEAK = 1000.0
# Formats whose frame count in the header is exact; compressed streams only estimate it.
_EXACT_LENGTH_FORMATS = {"WAV", "WAVEX", "FLAC", "AIFF", "W64", "RF64"}
# An MP3 whose Xing/Info/VBRI header gives its length may decode up to this many frames
# short of it (encoder delay and padding are trimmed by the decoder): two MPEG-1 frames.
_MP3_LENGTH_SLACK = 2 * 1152


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
    audio: AudioConfig | None = None,
    sample_rate: int | None = None,
    name: str | None = None,
    stage: Stage = untimed,
    duration_key: str = "audio.max_duration_s",
) -> Audio:
    """Read a clip into mono float32 at `sample_rate` (default: `audio.sample_rate`).

    `audio` (the `audio:` section; the defaults when None) bounds what a clip may cost
    before any of it is decoded: bytes, container format, sample rate, channels, and,
    where the header's length is exact, duration and samples (frames x channels); header
    sizes are checked against the bytes present, so a truncated upload fails instead of
    being silently shortened. The read is bounded again, block by block, so a stream
    whose header only estimates its length (OGG, most MP3s) stops at the same limits.
    Resampling is interleaved with reading, so it is marked as stage "resample" through
    `stage` (the `knd profile` hook) from in here. `duration_key` is the config key the
    caller's duration limit came from, named in the error (serve has its own).
    """
    import soundfile as sf

    limits = audio or AudioConfig()
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<upload>")
    fileobj, mp3_length_known = _open_checked(source, label, limits, "audio.max_file_mb")
    try:
        with fileobj, sf.SoundFile(fileobj) as snd:
            stream = _check_header(snd, label, limits, mp3_length_known, duration_key)
            return _read(snd, label, stream, sample_rate or limits.sample_rate, stage)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as exc:
        raise AudioError(label, f"not a readable audio file ({_reason(exc)})") from None


def _open_checked(
    source: AudioSource, label: str, limits: AudioConfig, size_key: str
) -> tuple[BinaryIO, bool]:
    """The open file once its size and container framing pass; and whether an MP3's
    length is known from its header."""
    fileobj, size = _open(source, label)
    if size == 0:
        raise AudioError(label, "empty file (0 bytes)")
    if size is not None and size > limits.max_file_mb * 1e6:
        raise AudioError(
            label,
            f"file is {size / 1e6:.1f} MB, over the {limits.max_file_mb:g} MB limit ({size_key})",
        )
    _check_riff_length(fileobj, label, size)
    return fileobj, _scan_mp3(fileobj, label, size, limits.max_duration_s)


def _reason(exc: Exception) -> str:
    """libsndfile's own words, without the "Error opening <object>:" prefix."""
    return str(exc).split(":")[-1].strip() or type(exc).__name__


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
    """Catch WAV and RF64 headers that promise more audio than the file holds.

    libsndfile clamps such a file's frame count to the bytes present and reads it
    without complaint, so nothing after opening it can tell; a truncated upload should
    fail instead. RF64 keeps the real data size in its `ds64` chunk (the data chunk's own
    32-bit size then reads 0xFFFFFFFF), so a 4 kB file can claim 2^40 frames.
    """
    if size is None:
        return
    start = fileobj.tell()
    head = fileobj.read(12)
    try:
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            return
        ds64_data_size: int | None = None
        offset = 12
        while offset + 8 <= size:
            fileobj.seek(start + offset)
            chunk = fileobj.read(24)
            if len(chunk) < 8:
                return
            chunk_id, chunk_size = chunk[:4], struct.unpack("<I", chunk[4:8])[0]
            if chunk_id == b"ds64" and len(chunk) == 24:
                # ds64 holds 64-bit sizes: RIFF, data, sample count, then a table.
                ds64_data_size = struct.unpack("<Q", chunk[16:24])[0]
            if chunk_id == b"data":
                declared = ds64_data_size if chunk_size == 0xFFFFFFFF else chunk_size
                available = size - offset - 8
                if declared and declared > available:
                    raise AudioError(
                        label,
                        f"header declares {declared} bytes of audio but the file holds "
                        f"only {available} (truncated or corrupt)",
                    )
                return
            offset += 8 + chunk_size + (chunk_size & 1)
    finally:
        fileobj.seek(start)


# MPEG audio frame headers: kbit/s by (MPEG-1 or not, layer) and bitrate index, sample
# rates by version bits, samples per frame by (MPEG-1 or not, layer).
_MP3_KBPS = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_MP3_SPF = {
    (True, 1): 384,
    (True, 2): 1152,
    (True, 3): 1152,
    (False, 1): 384,
    (False, 2): 1152,
    (False, 3): 576,
}
_MP3_MAX_FRAME = 2881  # MPEG-1 layer II/III at 320-384 kbit/s and 32 kHz, padded


@dataclass(frozen=True)
class _Mp3Frame:
    """One MPEG audio frame header: enough to find the next frame and the Xing header."""

    length: int
    samples: int
    sample_rate: int
    side_info: int  # bytes of layer III side information after the header (and CRC)


def _mp3_frame(header: bytes) -> _Mp3Frame | None:
    """Parse a 4-byte MPEG audio frame header; None where it is not one (or free format)."""
    if len(header) < 4:
        return None
    bits = struct.unpack(">I", header)[0]
    version, layer = (bits >> 19) & 3, 4 - ((bits >> 17) & 3)
    bitrate_index, rate_index = (bits >> 12) & 15, (bits >> 10) & 3
    if bits >> 21 != 0x7FF or version == 1 or layer == 4:
        return None
    if bitrate_index in (0, 15) or rate_index == 3:
        return None
    mpeg1 = version == 3
    bitrate = _MP3_KBPS[mpeg1, layer][bitrate_index] * 1000
    rate = _MP3_RATES[version][rate_index]
    padding = (bits >> 9) & 1
    if layer == 1:
        length = (12 * bitrate // rate + padding) * 4
    else:
        length = (144 if mpeg1 or layer == 2 else 72) * bitrate // rate + padding
    mono = (bits >> 6) & 3 == 3
    side_info = (17 if mono else 32) if mpeg1 else (9 if mono else 17)
    crc = 0 if (bits >> 16) & 1 else 2
    return _Mp3Frame(length, _MP3_SPF[mpeg1, layer], rate, crc + side_info)


def _scan_mp3(fileobj: BinaryIO, label: str, size: int | None, max_duration_s: float) -> bool:
    """Walk an MP3's frame headers: refuse a stream whose last frame is cut short, and
    say whether a Xing/Info/VBRI header states its length.

    libsndfile (mpg123) decodes a truncated MP3 without complaint, and without such a
    header its frame count is only an estimate from the file size and the first frame,
    so only with one can `_read` hold the decoded length against it. False for anything
    that does not start like an MP3 (optionally behind an ID3v2 tag). The walk stops at
    bytes that are not a frame (tags, junk the decoder resyncs past: no verdict) and
    after `max_duration_s` of frames (the read refuses longer streams), so it reads at
    most a few thousand 4-byte headers.
    """
    if size is None:
        return False
    start = fileobj.tell()
    try:
        head = fileobj.read(10)
        offset = 0
        if head[:3] == b"ID3" and len(head) == 10:
            tag = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
            offset = 10 + tag + (10 if head[5] & 0x10 else 0)
        fileobj.seek(start + offset)
        first_bytes = fileobj.read(_MP3_MAX_FRAME)
        first = _mp3_frame(first_bytes[:4])
        if first is None:
            return False
        at = 4 + first.side_info
        xing_flags = int.from_bytes(first_bytes[at + 4 : at + 8], "big")
        length_known = (
            first_bytes[at : at + 4] in (b"Xing", b"Info") and xing_flags & 1 == 1
        ) or first_bytes[36:40] == b"VBRI"  # flag 1: the frame count is present
        seconds = 0.0
        while seconds <= max_duration_s:
            fileobj.seek(start + offset)
            header = fileobj.read(4)
            frame = _mp3_frame(header)
            if frame is None:
                if 0 < len(header) < 4 and header[0] == 0xFF:
                    raise AudioError(label, "MP3 stream stops inside a frame header (truncated)")
                break
            if offset + frame.length > size:
                raise AudioError(
                    label,
                    f"MP3 stream stops mid-frame: its last frame needs {frame.length} bytes, "
                    f"the file holds {size - offset} (truncated)",
                )
            offset += frame.length
            seconds += frame.samples / frame.sample_rate
        return length_known
    finally:
        fileobj.seek(start)


@dataclass(frozen=True)
class _Stream:
    """A header that passed the limits, and how far the read may go."""

    sample_rate: int
    channels: int
    declared: int  # frames the header states
    exact: bool  # `declared` is the true length, so a shorter read means truncation
    slack: int  # frames the read may fall short of an exact `declared`
    max_frames: int  # the most frames the read may return
    too_long: str  # the refusal when a read passes `max_frames`


def _check_header(
    snd: sf.SoundFile,
    label: str,
    limits: AudioConfig,
    mp3_length_known: bool,
    duration_key: str,
) -> _Stream:
    """Refuse from the header alone what the `audio:` limits exclude, before decoding.

    `duration_key` names the config key the duration limit came from; a clip too long
    for `audio.max_duration_s` is told about `knd predict --timeline` too."""
    fmt, subtype = str(snd.format), str(snd.subtype)
    if fmt not in limits.formats and f"{fmt}/{subtype}" not in limits.formats:
        raise AudioError(
            label,
            f"{fmt} ({subtype}) audio is not accepted; accepted formats: "
            f"{', '.join(limits.formats)} (audio.formats)",
        )
    rate, channels, declared = int(snd.samplerate), int(snd.channels), int(snd.frames)
    if rate <= 0 or channels <= 0:
        raise AudioError(label, "header has no valid sample rate or channel count")
    if rate < limits.min_sample_rate:
        raise AudioError(
            label,
            f"sample rate {rate} Hz is below the {limits.min_sample_rate} Hz minimum "
            "(audio.min_sample_rate)",
        )
    if rate > limits.max_sample_rate:
        raise AudioError(
            label,
            f"sample rate {rate} Hz is above the {limits.max_sample_rate} Hz maximum "
            "(audio.max_sample_rate)",
        )
    if channels > limits.max_channels:
        raise AudioError(
            label,
            f"{channels} channels, more than the {limits.max_channels} allowed "
            "(audio.max_channels)",
        )
    exact = fmt in _EXACT_LENGTH_FORMATS or (fmt == "MP3" and mp3_length_known)
    duration_frames = int(limits.max_duration_s * rate)
    sample_frames = limits.max_samples // channels
    where = duration_key
    if duration_key == "audio.max_duration_s":
        where += "; knd predict --timeline scores long recordings"
    if exact and declared > duration_frames:
        raise AudioError(
            label,
            f"too long: {declared / rate:.1f} s, over the {limits.max_duration_s:g} s limit "
            f"({where})",
        )
    if exact and declared > sample_frames:
        raise AudioError(
            label,
            f"{declared * channels:,} samples ({declared:,} frames x {channels} channels), "
            f"over the {limits.max_samples:,} limit (audio.max_samples)",
        )
    if duration_frames <= sample_frames:
        too_long = f"too long: more than {limits.max_duration_s:g} s of audio ({where})"
    else:
        too_long = (
            f"more than {limits.max_samples:,} samples at {channels} channels (audio.max_samples)"
        )
    return _Stream(
        sample_rate=rate,
        channels=channels,
        declared=declared,
        exact=exact,
        slack=_MP3_LENGTH_SLACK if fmt == "MP3" else 0,
        max_frames=min(duration_frames, sample_frames),
        too_long=too_long,
    )


@dataclass
class _ReadStats:
    """What a read saw, for the Audio it becomes: frames, clipped frames, peak."""

    frames: int = 0
    clipped: int = 0
    peak: float = 0.0


def _blocks(
    snd: sf.SoundFile,
    label: str,
    stream: _Stream,
    sample_rate: int,
    stats: _ReadStats,
    stage: Stage = untimed,
) -> Iterator[np.ndarray]:
    """Mono float32 blocks at `sample_rate`, checked as they are read (length, NaN,
    truncation); `stats` is filled in along the way."""
    import soxr

    orig_sr, channels = stream.sample_rate, stream.channels
    resampler = (
        None
        if orig_sr == sample_rate
        else soxr.ResampleStream(orig_sr, sample_rate, 1, dtype="float32", quality="HQ")
    )
    while True:
        # snd.read, not snd.blocks: blocks yields whole buffers up to the declared length
        # even when the decoder returns fewer frames (a cut MP3 came back full length,
        # padded with stale audio), which would hide truncation.
        try:
            block = snd.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
        except RuntimeError as exc:  # libsndfile mid-stream: a cut or broken frame
            raise AudioError(
                label,
                f"stream breaks off before its declared {stream.declared / orig_sr:.2f} s "
                f"({_reason(exc)}): truncated or corrupt",
            ) from None
        if len(block) == 0:
            break
        stats.frames += len(block)
        if stats.frames > stream.max_frames:
            raise AudioError(label, stream.too_long)
        # One pass for the peak; NaN and inf propagate through max, so it checks them too.
        block_peak = float(max(block.max(initial=0.0), -block.min(initial=0.0)))
        problem = sample_problem(block_peak)
        if problem:
            raise AudioError(label, problem)
        stats.peak = max(stats.peak, block_peak)
        if block_peak >= _CLIP_LEVEL:
            stats.clipped += int((np.abs(block) >= _CLIP_LEVEL).any(axis=1).sum())
        mono = block.mean(axis=1) if channels > 1 else block[:, 0]
        if resampler is not None:
            with stage("resample"):
                mono = resampler.resample_chunk(mono)
        yield mono
    if resampler is not None:
        with stage("resample"):
            yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)
    if stats.frames == 0:
        raise AudioError(label, "contains no audio frames")
    if stream.exact and stream.declared > 0 and stats.frames < stream.declared - stream.slack:
        raise AudioError(
            label,
            f"header declares {stream.declared} frames but only {stats.frames} could be read "
            "(truncated)",
        )


def _read(snd: sf.SoundFile, label: str, stream: _Stream, sample_rate: int, stage: Stage) -> Audio:
    stats = _ReadStats()
    pieces = list(_blocks(snd, label, stream, sample_rate, stats, stage))
    samples = np.ascontiguousarray(np.concatenate(pieces), dtype=np.float32)
    return Audio(
        samples=samples,
        sample_rate=sample_rate,
        orig_sample_rate=stream.sample_rate,
        channels=stream.channels,
        source=label,
        peak=stats.peak,
        clipping_ratio=stats.clipped / stats.frames,
    )


def decode_blocks(
    source: AudioSource,
    *,
    audio: AudioConfig,
    sample_rate: int,
    name: str | None = None,
) -> Iterator[np.ndarray]:
    """A recording as mono float32 blocks at `sample_rate`, for files too long to hold.

    The same checks as `decode`, under `audio`'s limits (the caller passes
    `timeline.max_duration_s` and `timeline.max_file_mb` in it); only one block (~4 s at
    16 kHz) is held at a time. The file is opened on the first `next()`, so its errors
    come from there.
    """
    import soundfile as sf

    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<upload>")
    fileobj, mp3_length_known = _open_checked(source, label, audio, "timeline.max_file_mb")
    try:
        with fileobj, sf.SoundFile(fileobj) as snd:
            stream = _check_header(snd, label, audio, mp3_length_known, "timeline.max_duration_s")
            yield from _blocks(snd, label, stream, sample_rate, _ReadStats())
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as exc:
        raise AudioError(label, f"not a readable audio file ({_reason(exc)})") from None


def sample_problem(peak: float) -> str | None:
    """Why samples whose largest magnitude is `peak` cannot be scored (None: they can).

    One rule for files and live streams. NaN and inf propagate through max, so the peak
    catches them too.
    """
    if not np.isfinite(peak):
        return "contains NaN or infinite samples"
    if peak > MAX_FLOAT_PEAK:
        return (
            f"samples reach {peak:.3g}, over {MAX_FLOAT_PEAK:g} times full scale "
            "(float audio is scaled to ±1): wrongly scaled float samples"
        )
    return None


def find_audio_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files, directories (recursively) and globs into a sorted list of audio files.

    A path that exists is taken as it is, so `song [remix].wav` is that file, not a pattern.
    """
    import glob

    found: list[Path] = []
    for raw in paths:
        text = str(raw)
        matches = (
            [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            if any(c in text for c in "*?[") and not os.path.lexists(text)
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
