"""Additive noise at a chosen signal-to-noise ratio: coloured noise and babble."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

NOISE_COLORS = ("white", "pink", "brown")
# Power spectral density falls as 1/f^exponent: white 0, pink 1, brown (red) 2.
_EXPONENT = {"white": 0.0, "pink": 1.0, "brown": 2.0}


def colored_noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """`n` samples of unit-power Gaussian noise whose spectrum falls as 1/f^k.

    Shaped in the frequency domain, so pink and brown noise have the intended slope over
    the whole band (3 and 6 dB per octave) rather than a filter's approximation of it.
    """
    if color not in _EXPONENT:
        raise ValueError(f"noise colour {color!r} is not one of {', '.join(NOISE_COLORS)}")
    if color == "white" or n < 2:
        shaped = rng.standard_normal(n)
    else:
        size = fft_size(n)  # a power of two: FFTs of arbitrary clip lengths can be 10x slower
        spectrum = np.fft.rfft(rng.standard_normal(size))
        freqs = np.arange(len(spectrum), dtype=np.float64)
        freqs[0] = 1.0  # no infinite gain at DC
        spectrum *= freqs ** (-_EXPONENT[color] / 2)
        spectrum[0] = 0.0
        shaped = np.fft.irfft(spectrum, size)[:n]
    power = float(np.mean(shaped**2)) or 1.0
    return (shaped / np.sqrt(power)).astype(np.float32)


def fft_size(n: int) -> int:
    """The power of two at or above `n`."""
    return 1 << max(0, n - 1).bit_length()


def snr_db(signal: np.ndarray, noise: np.ndarray) -> float:
    """Signal-to-noise ratio in dB of two equally long arrays."""
    signal_power = float(np.mean(np.asarray(signal, np.float64) ** 2))
    noise_power = float(np.mean(np.asarray(noise, np.float64) ** 2))
    return 10 * np.log10((signal_power + 1e-20) / (noise_power + 1e-20))


def mix_at_snr(signal: np.ndarray, noise: np.ndarray, snr: float) -> np.ndarray:
    """`signal` plus `noise` scaled so that their power ratio is `snr` dB.

    The signal's power is measured over its louder frames (speech, not the pauses around
    it), the way SNR is quoted for speech corpora; a clip with a second of leading
    silence would otherwise get noise 2-3 dB quieter than asked for.
    """
    noise = _fit_length(noise, len(signal))
    speech_power = active_power(signal)
    noise_power = float(np.mean(noise.astype(np.float64) ** 2))
    if speech_power <= 0 or noise_power <= 0:
        return signal.astype(np.float32, copy=True)
    scale = np.sqrt(speech_power / (noise_power * 10 ** (snr / 10)))
    return (signal + noise * np.float32(scale)).astype(np.float32)


def active_power(samples: np.ndarray, frame: int = 320, top_db: float = 40.0) -> float:
    """Mean power of the frames within `top_db` of the loudest one (speech activity)."""
    x = np.asarray(samples, np.float64)
    n = len(x) // frame
    if n < 2:
        return float(np.mean(x**2)) if len(x) else 0.0
    power = (x[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
    if power.max() <= 0:
        return 0.0
    active = power[power > power.max() * 10 ** (-top_db / 10)]
    return float(active.mean())


def _fit_length(noise: np.ndarray, n: int) -> np.ndarray:
    if len(noise) >= n:
        return noise[:n]
    return np.tile(noise, -(-n // max(1, len(noise))))[:n]


class BabbleSource:
    """Babble: several other talkers at once, drawn from a pool of clips.

    `clips[i]` returns clip i's samples and `speakers[i]` names its talker; a babble for
    a clip never uses that clip's own speaker, so it is a crowd, not an echo. Training
    draws from the training speakers; the robustness report from speakers it does not
    score.
    """

    def __init__(self, clip: Callable[[int], np.ndarray], speakers: Sequence[str]) -> None:
        self.clip = clip
        self.speakers = list(speakers)

    def __call__(
        self, n: int, talkers: int, rng: np.random.Generator, exclude: str | None = None
    ) -> np.ndarray:
        """`n` samples of `talkers` voices, each at equal speech power; unit power overall."""
        pool = [i for i, s in enumerate(self.speakers) if s != exclude]
        if not pool:
            raise ValueError("babble needs clips of at least one other speaker")
        mixture = np.zeros(n, np.float64)
        for index in rng.choice(pool, size=min(talkers, len(pool)), replace=False):
            voice = np.asarray(self.clip(int(index)), np.float64)
            power = active_power(voice)
            if power <= 0:
                continue
            start = int(rng.integers(0, max(1, len(voice))))
            voice = np.roll(voice, -start)  # each talker starts mid-sentence
            mixture += _fit_length(voice, n) / np.sqrt(power)
        power = float(np.mean(mixture**2)) or 1.0
        return (mixture / np.sqrt(power)).astype(np.float32)
