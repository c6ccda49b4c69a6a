"""The robustness suite: named conditions at fixed levels, rendered reproducibly."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from kndcli.config import RobustnessConfig
from kndcli.errors import ConfigError
from kndcli.perturb.channel import TELEPHONE_LAWS, clip_peaks, lowpass, telephone
from kndcli.perturb.codec import codec_roundtrip
from kndcli.perturb.noise import BabbleSource, colored_noise, mix_at_snr
from kndcli.perturb.room import RT60_RANGE_S, RoomBank, reverberate

# family -> (RobustnessConfig field, unit, bounds of a level)
FAMILIES: dict[str, tuple[str, str, tuple[float, float] | None]] = {
    "white": ("white_snr_db", "dB SNR", (-10.0, 60.0)),
    "pink": ("pink_snr_db", "dB SNR", (-10.0, 60.0)),
    "brown": ("brown_snr_db", "dB SNR", (-10.0, 60.0)),
    "babble": ("babble_snr_db", "dB SNR", (-10.0, 60.0)),
    "reverb": ("rt60_s", "s RT60", RT60_RANGE_S),
    "telephone": ("telephone", "", None),
    "mp3": ("mp3_kbps", "kbit/s", (8.0, 160.0)),
    "opus": ("opus_kbps", "kbit/s", (6.0, 256.0)),
    "lowpass": ("lowpass_hz", "Hz", (500.0, 8000.0)),
    "clipping": ("clipping_drive_db", "dB drive", (0.0, 40.0)),
}
# The reference level of each family the targets are judged at.
REFERENCE_LEVELS: dict[str, float | str] = {
    "white": 10.0,
    "babble": 10.0,
    "telephone": "mulaw",
    "reverb": 0.6,
    "mp3": 32.0,
}
BABBLE_TALKERS = 5


@dataclass(frozen=True)
class Condition:
    """One column of the robustness table: a family at one level (clean has none)."""

    family: str
    level: float | str | None = None

    @property
    def name(self) -> str:
        if self.level is None:
            return self.family
        unit = FAMILIES[self.family][1]
        level = self.level if isinstance(self.level, str) else f"{self.level:g}"
        return f"{self.family} {level} {unit}".strip()

    @property
    def is_reference(self) -> bool:
        return self.family in REFERENCE_LEVELS and REFERENCE_LEVELS[self.family] == self.level

    def rng(self, seed: int, index: int) -> np.random.Generator:
        """The draws for clip `index` under this condition: fixed by the seed alone."""
        return np.random.default_rng([seed, index, zlib.crc32(self.name.encode())])


CLEAN = Condition("clean")


def robustness_suite(cfg: RobustnessConfig) -> list[Condition]:
    """Clean first, then every configured level of every family."""
    check_robustness(cfg)
    conditions = [CLEAN]
    for family, (key, _, _) in FAMILIES.items():
        conditions += [Condition(family, level) for level in getattr(cfg, key)]
    return conditions


def check_robustness(cfg: RobustnessConfig) -> None:
    for family, (key, _, bounds) in FAMILIES.items():
        for level in getattr(cfg, key):
            if bounds is None:
                if level not in TELEPHONE_LAWS:
                    raise ConfigError(
                        f"key 'robustness.{key}': {level!r} is not one of "
                        f"{', '.join(TELEPHONE_LAWS)}"
                    )
            elif not bounds[0] <= level <= bounds[1]:
                raise ConfigError(
                    f"key 'robustness.{key}': {family} level {level} is outside "
                    f"[{bounds[0]}, {bounds[1]}]"
                )
    if cfg.rooms_per_level < 1:
        raise ConfigError(
            f"key 'robustness.rooms_per_level': at least 1, got {cfg.rooms_per_level}"
        )
    if cfg.seed < 0:
        raise ConfigError(f"key 'robustness.seed': 0 or more, got {cfg.seed}")


class ConditionRenderer:
    """Applies a Condition to a clip; rooms are built once per RT60 level (and cached)."""

    def __init__(
        self, cfg: RobustnessConfig, sample_rate: int, babble: BabbleSource | None = None
    ) -> None:
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.babble = babble
        self._rooms: dict[float, RoomBank] = {}

    def rooms(self, rt60: float) -> RoomBank:
        if rt60 not in self._rooms:
            self._rooms[rt60] = RoomBank(
                (rt60, rt60), self.cfg.rooms_per_level, self.sample_rate, seed=self.cfg.seed
            )
        return self._rooms[rt60]

    def __call__(
        self,
        x: np.ndarray,
        condition: Condition,
        rng: np.random.Generator,
        speaker: str | None = None,
    ) -> np.ndarray:
        family, level, sr = condition.family, condition.level, self.sample_rate
        if family == "clean":
            return x
        if family in ("white", "pink", "brown"):
            return mix_at_snr(x, colored_noise(len(x), family, rng), float(level))
        if family == "babble":
            if self.babble is None:
                raise ValueError("babble needs clips of other speakers")
            noise = self.babble(len(x), BABBLE_TALKERS, rng, exclude=speaker)
            return mix_at_snr(x, noise, float(level))
        if family == "reverb":
            return reverberate(x, self.rooms(float(level)).draw(rng).samples)
        if family == "telephone":
            return telephone(x, sr, str(level))
        if family in ("mp3", "opus"):
            return codec_roundtrip(x, sr, family, float(level))[0]
        if family == "lowpass":
            return lowpass(x, sr, float(level))
        if family == "clipping":
            return clip_peaks(x, float(level))
        raise ValueError(f"unknown condition family {family!r}")
