"""Lossy codecs at low bitrates, encoded and decoded through libsndfile (soundfile)."""

from __future__ import annotations

import io

import numpy as np

CODECS = ("mp3", "opus")
# libsndfile maps its compression level (0 best .. 1 smallest) linearly onto a bitrate
# range. Opus: 256 -> 6 kbit/s at every rate. MP3: the range of the MPEG version the rate
# selects, by lowest rate: MPEG-2.5 (8-12 kHz) 64 -> 8, MPEG-2 (16-24 kHz) 160 -> 8,
# MPEG-1 (32-48 kHz) 320 -> 32 kbit/s; LAME then picks the nearest bitrate of that version.
# Measured on mono at each rate; the test checks the size of the encoded stream.
_OPUS_BITRATES = (6.0, 256.0)
_MP3_BITRATES = ((32000, (32.0, 320.0)), (16000, (8.0, 160.0)), (0, (8.0, 64.0)))
_FORMATS = {
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
}
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
# LAME's encoder delay (576 samples) plus the MP3 decoder's (529). libsndfile's decoder
# removes them itself only when the stream carries LAME's gapless header (then the decoded
# stream is exactly as long as the input); otherwise the sound starts this much late.
_MP3_DELAY = 1105


def codec_roundtrip(
    samples: np.ndarray, sample_rate: int, codec: str, kbps: float
) -> tuple[np.ndarray, float]:
    """Samples after encoding at about `kbps` and decoding, and the bitrate achieved.

    The decoded stream is aligned with the input (MP3's encoder and decoder delay is cut
    from its start) and trimmed or padded back to the input's length; Opus, which only
    runs at a few rates, is resampled around.
    """
    import soundfile as sf
    import soxr

    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not one of {', '.join(CODECS)}")
    x = np.clip(np.asarray(samples, np.float32), -1, 1)
    rate = sample_rate
    if codec == "opus" and rate not in _OPUS_RATES:
        rate = 16000
        x = soxr.resample(x, sample_rate, rate)
    fmt, subtype = _FORMATS[codec]
    buffer = io.BytesIO()
    kwargs = {"compression_level": compression_level(codec, kbps, rate)}
    if codec == "mp3":
        kwargs["bitrate_mode"] = "CONSTANT"
    sf.write(buffer, x, rate, format=fmt, subtype=subtype, **kwargs)
    achieved = len(buffer.getvalue()) * 8 / 1000 / max(len(x) / rate, 1e-9)
    buffer.seek(0)
    decoded, _ = sf.read(buffer, dtype="float32")
    if decoded.ndim > 1:
        decoded = decoded.mean(axis=1)
    if codec == "mp3" and len(decoded) > len(x):
        decoded = decoded[min(_MP3_DELAY, len(decoded) - len(x)) :]
    if rate != sample_rate:
        decoded = soxr.resample(decoded, rate, sample_rate)
    n = len(samples)
    decoded = decoded[:n] if len(decoded) >= n else np.pad(decoded, (0, n - len(decoded)))
    return decoded.astype(np.float32), achieved


def compression_level(codec: str, kbps: float, sample_rate: int) -> float:
    """libsndfile's compression level for a target bitrate at `sample_rate` (clamped to
    what the codec reaches there: MP3 at 44.1 kHz has nothing below 32 kbit/s)."""
    low, high = _OPUS_BITRATES
    if codec == "mp3":
        low, high = next(span for lowest, span in _MP3_BITRATES if sample_rate >= lowest)
    return float(np.clip((high - kbps) / (high - low), 0.0, 0.99))
