"""Channels: telephone lines, band limits, cheap microphones, gain and clipping."""

from __future__ import annotations

import io

import numpy as np

from kndcli.errors import ConfigError
from kndcli.perturb.noise import fft_size

TELEPHONE_LAWS = ("mulaw", "alaw", "gsm")
TELEPHONE_RATE = 8000
TELEPHONE_BAND = (300.0, 3400.0)


def band_limit(
    samples: np.ndarray,
    sample_rate: int,
    low_hz: float = 0.0,
    high_hz: float | None = None,
    transition_hz: float = 100.0,
) -> np.ndarray:
    """Zero-phase band-pass: unity inside the band, zero outside, with raised-cosine
    edges `transition_hz` wide centred on `low_hz` and `high_hz` (half amplitude there).

    Done on the clip's spectrum (numpy only): exact band edges, no phase distortion and
    no filter design to get wrong. The clip is zero-padded by several lengths of the
    filter's impulse response, so the end of the clip does not wrap onto its start.
    """
    n = len(samples)
    if n == 0:
        return samples.astype(np.float32, copy=True)
    size = fft_size(n + 8 * int(np.ceil(sample_rate / transition_hz)))
    spectrum = np.fft.rfft(np.asarray(samples, np.float64), size)
    freqs = np.fft.rfftfreq(size, 1 / sample_rate)
    gain = np.ones_like(freqs)
    half = transition_hz / 2
    if low_hz > 0:
        gain *= _edge(freqs, low_hz - half, low_hz + half)
    if high_hz is not None and high_hz < sample_rate / 2:
        gain *= 1 - _edge(freqs, high_hz - half, high_hz + half)
    return np.fft.irfft(spectrum * gain, size)[:n].astype(np.float32)


def _edge(freqs: np.ndarray, start: float, stop: float) -> np.ndarray:
    """0 below `start`, 1 above `stop`, a raised cosine between."""
    t = np.clip((freqs - start) / max(stop - start, 1e-9), 0, 1)
    return 0.5 - 0.5 * np.cos(np.pi * t)


def lowpass(samples: np.ndarray, sample_rate: int, cutoff_hz: float) -> np.ndarray:
    """A cheap microphone or a narrow-band stream: nothing above `cutoff_hz`."""
    return band_limit(samples, sample_rate, 0.0, cutoff_hz, transition_hz=cutoff_hz / 8)


def check_cutoffs(cutoffs_hz: list[float], sample_rate: int, key: str, source: str) -> None:
    """Refuse a low-pass at or above the Nyquist frequency of the clips it degrades: it
    changes nothing, so training under its name would be clean audio in disguise."""
    nyquist = sample_rate / 2
    for hz in cutoffs_hz:
        if hz >= nyquist:
            raise ConfigError(
                f"key '{key}': {hz:g} Hz is not below {nyquist:g} Hz, the highest frequency "
                f"of {source} ({sample_rate} Hz); a low-pass there changes nothing"
            )


def telephone(samples: np.ndarray, sample_rate: int, law: str = "mulaw") -> np.ndarray:
    """A narrow-band phone call: 8 kHz, 300-3400 Hz, G.711 mu-law or A-law, or GSM 6.10.

    Returned at the input's sample rate, as a recording of a call would be played back.
    GSM goes through libsndfile's GSM 6.10 codec (the full-rate GSM speech codec).
    """
    import soxr

    if law not in TELEPHONE_LAWS:
        raise ValueError(f"telephone law {law!r} is not one of {', '.join(TELEPHONE_LAWS)}")
    narrow = soxr.resample(np.asarray(samples, np.float32), sample_rate, TELEPHONE_RATE)
    narrow = band_limit(narrow, TELEPHONE_RATE, *TELEPHONE_BAND)
    # A line has a fixed level: normalise so companding works on a telephone-like level.
    peak = float(np.max(np.abs(narrow))) if len(narrow) else 0.0
    scale = 0.5 / peak if peak > 0 else 1.0
    narrow = narrow * np.float32(scale)
    coded = _gsm610(narrow) if law == "gsm" else _g711(narrow, law)
    # The receiving side filters the line again: codec noise stays inside the band.
    coded = band_limit(coded, TELEPHONE_RATE, *TELEPHONE_BAND)
    wide = soxr.resample(coded / np.float32(scale), TELEPHONE_RATE, sample_rate)
    return _fit(wide.astype(np.float32), len(samples))


def _g711(x: np.ndarray, law: str) -> np.ndarray:
    """8-bit companding as G.711 does it: compress, quantise to 256 levels, expand."""
    x = np.clip(x, -1, 1).astype(np.float64)
    if law == "mulaw":
        mu = 255.0
        y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
        y = np.round(y * 127) / 127
        out = np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu
    else:
        a = 87.6
        ax = np.abs(x)
        small = ax < 1 / a
        y = np.where(small, a * ax, 1 + np.log(np.maximum(a * ax, 1e-12))) / (1 + np.log(a))
        y = np.round(y * 127) / 127
        big = y >= 1 / (1 + np.log(a))
        ax = np.where(big, np.exp(y * (1 + np.log(a)) - 1) / a, y * (1 + np.log(a)) / a)
        out = np.sign(x) * ax
    return out.astype(np.float32)


def _gsm610(x: np.ndarray) -> np.ndarray:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.clip(x, -1, 1), TELEPHONE_RATE, format="WAV", subtype="GSM610")
    buffer.seek(0)
    decoded, _ = sf.read(buffer, dtype="float32")
    return _fit(decoded, len(x))


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) >= n:
        return x[:n]
    return np.pad(x, (0, n - len(x)))


def apply_gain(samples: np.ndarray, gain_db: float) -> np.ndarray:
    """A louder or quieter recording (training draws it per clip, `train.augment.gain_db`);
    no clipping, so a clip that leaves [-1, 1] keeps its shape for the normaliser."""
    return (samples * np.float32(10 ** (gain_db / 20))).astype(np.float32)


def clip_peaks(samples: np.ndarray, drive_db: float) -> np.ndarray:
    """An overdriven input: peak-normalise, amplify by `drive_db`, clip hard at full scale."""
    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    if peak <= 0:
        return samples.astype(np.float32, copy=True)
    driven = samples / peak * 10 ** (drive_db / 20)
    return (np.clip(driven, -1, 1) * peak).astype(np.float32)
