"""Multi-condition training: a random chain of degradations per training clip."""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from kndcli.config import ConditionsConfig
from kndcli.errors import ConfigError
from kndcli.perturb.channel import TELEPHONE_LAWS, clip_peaks, lowpass, telephone
from kndcli.perturb.codec import CODECS, codec_roundtrip
from kndcli.perturb.noise import (
    NOISE_COLORS,
    BabbleSource,
    colored_noise,
    fft_size,
    mix_at_snr,
)
from kndcli.perturb.room import RT60_RANGE_S, RoomBank, reverberate

NOISE_TYPES = (*NOISE_COLORS, "babble")
_NOISE_BANK_S = 30
# Rendered copies are held in memory (float16): 8 of RAVDESS's 720 training clips take
# about 0.7 GB; more than 64 would buy little diversity for a lot of memory.
MAX_VARIANTS = 64
# [low, high] ranges and the values a recording can physically take.
_RANGES = {
    "snr_db": (-10.0, 60.0),
    "babble_talkers": (1, 32),
    "rt60_s": RT60_RANGE_S,
    "mp3_kbps": (8.0, 160.0),
    "opus_kbps": (6.0, 256.0),
    "lowpass_hz": (500.0, 8000.0),
    "clipping_drive_db": (0.0, 40.0),
}


class MultiCondition:
    """Degrades clips the way `ConditionsConfig` says; deterministic given the Generator.

    `babble` supplies other training speakers' voices (None leaves babble out) and
    `rooms` the impulse responses (None builds the configured bank on first use).
    """

    def __init__(
        self,
        cfg: ConditionsConfig,
        sample_rate: int,
        babble: BabbleSource | None = None,
        rooms: RoomBank | None = None,
    ) -> None:
        check_conditions(cfg)
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.babble = babble
        self.noise_types = [t for t in cfg.noise_types if t != "babble" or babble is not None]
        self._rooms = rooms
        # Segments of a fixed stretch of each colour: shaping noise per clip cost more CPU
        # than the training step it feeds. The stretch is one whole FFT frame, so the
        # shaped noise is periodic and a segment that wraps around its end has no step.
        bank_rng = np.random.default_rng(0)
        bank_size = fft_size(_NOISE_BANK_S * sample_rate)
        self._noise = {
            color: colored_noise(bank_size, color, bank_rng)
            for color in NOISE_COLORS
            if color in self.noise_types
        }

    @property
    def rooms(self) -> RoomBank:
        if self._rooms is None:
            self._rooms = RoomBank(tuple(self.cfg.rt60_s), self.cfg.rooms, self.sample_rate)
        return self._rooms

    def __call__(
        self, x: np.ndarray, rng: np.random.Generator, speaker: str | None = None
    ) -> np.ndarray:
        """One draw of the chain: room, noise, channel (telephone or low-pass), clipping, codec."""
        return self.degrade(x, rng, speaker)[0]

    def degrade(
        self,
        x: np.ndarray,
        rng: np.random.Generator,
        speaker: str | None = None,
        snr_floor: float | None = None,
    ) -> tuple[np.ndarray, float]:
        """One draw of the chain and the SNR of its noise (inf: no noise was added).

        `snr_floor` raises the bottom of the SNR range (the curriculum's floor of the
        epoch); None draws from the whole configured range.
        """
        cfg, sr = self.cfg, self.sample_rate
        snr = np.inf
        if not cfg.enabled:
            return x, snr
        if cfg.reverb_prob > 0 and rng.random() < cfg.reverb_prob:
            x = reverberate(x, self.rooms.draw(rng).samples)
        if cfg.noise_prob > 0 and self.noise_types and rng.random() < cfg.noise_prob:
            kind = self.noise_types[int(rng.integers(len(self.noise_types)))]
            if kind == "babble":
                talkers = int(rng.integers(cfg.babble_talkers[0], cfg.babble_talkers[1] + 1))
                noise = self.babble(len(x), talkers, rng, exclude=speaker)
            else:
                noise = _segment(self._noise[kind], len(x), rng)
            low, high = cfg.snr_db
            snr = float(rng.uniform(low if snr_floor is None else max(low, snr_floor), high))
            x = mix_at_snr(x, noise, snr)
        if cfg.telephone_prob > 0 and rng.random() < cfg.telephone_prob:
            law = cfg.telephone_laws[int(rng.integers(len(cfg.telephone_laws)))]
            x = telephone(x, sr, law)
        elif cfg.lowpass_prob > 0 and rng.random() < cfg.lowpass_prob:
            x = lowpass(x, sr, float(rng.uniform(*cfg.lowpass_hz)))
        if cfg.clipping_prob > 0 and rng.random() < cfg.clipping_prob:
            x = clip_peaks(x, float(rng.uniform(*cfg.clipping_drive_db)))
        if cfg.codec_prob > 0 and rng.random() < cfg.codec_prob:
            codec = cfg.codecs[0]
            # One codec draws nothing for its choice: MP3 alone degrades as before Opus.
            if len(cfg.codecs) > 1:
                codec = cfg.codecs[int(rng.integers(len(cfg.codecs)))]
            kbps = cfg.mp3_kbps if codec == "mp3" else cfg.opus_kbps
            x, _ = codec_roundtrip(x, sr, codec, float(rng.uniform(*kbps)))
        return x, snr


def curriculum_snr_floor(cfg: ConditionsConfig, epoch: int, max_epochs: int) -> float | None:
    """The lowest SNR of noise training may draw in `epoch` (None: the whole range).

    With `snr_curriculum` = f > 0 the floor falls linearly from the top of `snr_db` to its
    bottom over the first f of `max_epochs`, so the model meets mild noise before hard
    noise (Braun et al. 2017); afterwards every epoch draws from the whole range.
    """
    if cfg.snr_curriculum <= 0 or max_epochs <= 0:
        return None
    progress = min(1.0, epoch / (cfg.snr_curriculum * max_epochs))
    low, high = cfg.snr_db
    return high - progress * (high - low)


def _segment(bank: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` samples from a random place in `bank`, wrapping around its end."""
    start = int(rng.integers(len(bank)))
    return np.take(bank, np.arange(start, start + n), mode="wrap")


def check_conditions(cfg: ConditionsConfig, key: str = "train.augment.conditions") -> None:
    """Every probability in [0, 1], every range a [low, high] pair inside its bounds (the
    low-pass against the clips' rate is checked by training, which knows that rate)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        name = f"{key}.{f.name}"
        if f.name.endswith("_prob") and not 0 <= value <= 1:
            raise ConfigError(f"key '{name}': a probability in [0, 1], got {value}")
        if f.name in _RANGES:
            lo, hi = _RANGES[f.name]
            if len(value) != 2 or not lo <= value[0] <= value[1] <= hi:
                raise ConfigError(
                    f"key '{name}': a range [low, high] within [{lo}, {hi}], got {list(value)}"
                )
    _check_choices(cfg.noise_types, NOISE_TYPES, f"{key}.noise_types")
    _check_choices(cfg.telephone_laws, TELEPHONE_LAWS, f"{key}.telephone_laws")
    _check_choices(cfg.codecs, CODECS, f"{key}.codecs")
    if cfg.noise_prob > 0 and not cfg.noise_types:
        raise ConfigError(f"key '{key}.noise_types': empty while noise_prob is {cfg.noise_prob}")
    if cfg.codec_prob > 0 and not cfg.codecs:
        raise ConfigError(f"key '{key}.codecs': empty while codec_prob is {cfg.codec_prob}")
    if cfg.telephone_prob > 0 and not cfg.telephone_laws:
        raise ConfigError(
            f"key '{key}.telephone_laws': empty while telephone_prob is {cfg.telephone_prob}"
        )
    if not 0 <= cfg.snr_curriculum <= 1:
        raise ConfigError(
            f"key '{key}.snr_curriculum': a fraction of training in [0, 1], "
            f"got {cfg.snr_curriculum}"
        )
    if cfg.rooms < 0:
        raise ConfigError(f"key '{key}.rooms': a number of rooms >= 0, got {cfg.rooms}")
    if cfg.reverb_prob > 0 and cfg.rooms == 0:
        raise ConfigError(f"key '{key}.rooms': 0 while reverb_prob is {cfg.reverb_prob}")
    if not 0 <= cfg.variants <= MAX_VARIANTS:
        raise ConfigError(
            f"key '{key}.variants': a number of rendered copies in [0, {MAX_VARIANTS}] "
            f"(0: degrade afresh every epoch), got {cfg.variants}"
        )


def _check_choices(values: list[str], allowed: tuple[str, ...], name: str) -> None:
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ConfigError(f"key '{name}': {unknown[0]!r} is not one of {', '.join(allowed)}")
