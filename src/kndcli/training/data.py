"""Datasets over the prepared store: crop/pad, waveform augmentation, the DataModule."""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from kndcli.config import AugmentConfig, TrainConfig
from kndcli.data.store import PreparedSet
from kndcli.inference.robustness import babble_source
from kndcli.inference.speech import trim_bounds
from kndcli.inference.windowing import center_fit, repeat_fit
from kndcli.perturb.channel import apply_gain
from kndcli.perturb.multicondition import MultiCondition, curriculum_snr_floor

log = logging.getLogger(__name__)


class WaveformDataset(Dataset):
    """Clips of one split as fixed-length float32 waveforms, label and speaker indices.

    The speaker index numbers `speakers` (the training speakers); others get -1.

    Training: a degraded copy (`rendered`: drawn from copies rendered once; `conditions`:
    degraded afresh; no noise below `snr_floor`, the SNR curriculum's floor of the
    epoch), speed perturbation, random crop and gain. Evaluation: the centre crop, as the
    Predictor does for one window.
    """

    def __init__(
        self,
        prepared: PreparedSet,
        indices: list[int],
        labels: list[str],
        clip_seconds: float,
        *,
        train: bool,
        augment: AugmentConfig | None = None,
        trim_silence: bool = True,
        seed: int = 0,
        speakers: list[str] | None = None,
        conditions: MultiCondition | None = None,
        rendered: RenderedConditions | None = None,
        spans: TrimSpans | None = None,
    ) -> None:
        self.prepared = prepared
        self.conditions = conditions
        self.rendered = rendered
        self.speaker_index = {speaker: i for i, speaker in enumerate(speakers or [])}
        self.indices = indices
        self.label_index = {label: i for i, label in enumerate(labels)}
        self.length = int(clip_seconds * prepared.sample_rate)
        self.train = train
        self.augment = augment or AugmentConfig()
        self.trim = trim_silence
        self.spans = spans or TrimSpans(prepared.sample_rate, "energy")
        self.seed = seed
        self.epoch = 0
        self.snr_floor: float | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def targets(self) -> list[int]:
        return [self.label_index[self.prepared.rows[i]["label"]] for i in self.indices]

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, int]:
        index = self.indices[item]
        row = self.prepared.rows[index]
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            x = self._augment(index, rng, row["speaker"])
        elif self.trim:
            x = self.prepared.waveform(index)
            start, stop = self.spans.get((index, CLEAN), x)
            x = center_fit(x[start:stop], self.length)
        else:
            x = center_fit(self.prepared.waveform(index), self.length)
        speaker = self.speaker_index.get(row["speaker"], -1)
        waveform = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return waveform, self.label_index[row["label"]], speaker

    def _augment(self, index: int, rng: np.random.Generator, speaker: str) -> np.ndarray:
        """A rendered degraded copy (or the clean clip), speed, the conditions when they are
        drawn afresh, then trim, crop and gain.

        Degrading before the silence trim is what happens in production: the Predictor
        trims the noisy or reverberant clip it is given, so training sees the same cut.
        The VAD trim looks each rendered copy's span up (`TrimSpans`) and applies the speed
        to the trimmed part: the same cut within a frame or two, as the 0.1 s padding
        scales with the speed.
        """
        aug = self.augment
        drawn = self.rendered.draw(index, rng, self.snr_floor) if self.rendered else None
        copy, x = drawn if drawn is not None else (CLEAN, self.prepared.waveform(index))
        speed = float(rng.choice(aug.speeds)) if aug.speeds else 1.0
        if self.trim and self.conditions is None and self.spans.per_copy:
            start, stop = self.spans.get((index, copy), x)
            x = _stretch(x[start:stop], speed)
        else:
            x = _stretch(x, speed)
            if self.conditions is not None:
                x = self.conditions.degrade(x, rng, speaker, self.snr_floor)[0]
            if self.trim:
                start, stop = self.spans.find(x)
                x = x[start:stop]
        x = _random_fit(x, self.length, rng) if aug.random_crop else center_fit(x, self.length)
        if aug.gain_db > 0:
            x = apply_gain(x, rng.uniform(-aug.gain_db, aug.gain_db))
        return x


# The key of a clip's clean copy in `TrimSpans`; rendered copies are numbered from 0.
CLEAN = -1


class TrimSpans:
    """The speech span (`train.trim_method`) of each clip copy, found once per training run.

    The VAD trim costs about 2 ms per 16 kHz clip, 1.5 s of each epoch on RAVDESS's 720
    training clips (a tenth of the epoch on two cores) if found afresh, so training looks
    each rendered copy's span up (`per_copy`), filled before the first epoch
    (`fill`), so loader workers inherit it. The energy trim costs a fraction of that and is
    found on the sped clip, as it always was. Keys are (clip index, copy number or CLEAN).
    """

    def __init__(self, sample_rate: int, method: str) -> None:
        self.sample_rate = sample_rate
        self.method = method
        self.per_copy = method == "vad"
        self.spans: dict[tuple[int, int], tuple[int, int]] = {}

    def find(self, x: np.ndarray) -> tuple[int, int]:
        """The span of audio seen once (degraded afresh, or sped), not cached."""
        return trim_bounds(x, self.sample_rate, self.method)

    def get(self, key: tuple[int, int], x: np.ndarray) -> tuple[int, int]:
        span = self.spans.get(key)
        if span is None:
            span = self.spans[key] = self.find(x)
        return span

    def fill(self, rendered: RenderedConditions) -> None:
        """Every rendered copy's span, found now."""
        for index, copies in rendered.copies.items():
            for k, copy in enumerate(copies):
                self.get((index, k), copy.astype(np.float32))


def _stretch(x: np.ndarray, speed: float) -> np.ndarray:
    """Speed perturbation by linear interpolation (pitch and tempo together)."""
    if speed == 1.0 or len(x) < 2:
        return x
    positions = np.arange(0, len(x) - 1, speed)
    return np.interp(positions, np.arange(len(x)), x).astype(np.float32)


def _random_fit(x: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """Random crop of a long clip, or a short one repeated from a random start."""
    if len(x) >= length:
        start = int(rng.integers(0, len(x) - length + 1))
        return x[start : start + length]
    return repeat_fit(x, length, int(rng.integers(0, max(1, len(x)))))


# Seeds the rendered copies apart from the per-epoch draws of the same clip.
_RENDER_STREAM = 104729
# Memory for rendered copies (float16): RAVDESS's 720 training clips take 0.7 GB for 8.
MAX_RENDERED_BYTES = 2 * 2**30


class RenderedConditions:
    """`variants` degraded copies of every training clip, rendered once before training.

    Degrading afresh costs about 2 ms of CPU per clip in every epoch, a third of a
    training step on a 2-core machine; rendering once costs that per copy, and every
    epoch draws one copy per clip (speed, crop, gain and mixup still vary each time).
    Copies are kept as float16 to halve the memory (about 66 dB below the signal).
    """

    def __init__(
        self,
        chain: MultiCondition,
        prepared: PreparedSet,
        indices: list[int],
        variants: int,
        seed: int,
        max_bytes: int = MAX_RENDERED_BYTES,
    ) -> None:
        samples = sum(int(prepared.rows[i]["length"]) for i in indices)
        affordable = max(1, max_bytes // max(1, 2 * samples))
        if variants > affordable:
            # A large corpus (CREMA-D: 7,442 clips) would need gigabytes for 8 copies.
            log.warning(
                "rendering %d degraded copies per clip instead of %d: %d copies of %d "
                "training clips would exceed %.1f GiB of memory",
                affordable,
                variants,
                variants,
                len(indices),
                max_bytes / 2**30,
            )
            variants = affordable
        self.variants = variants
        self.copies: dict[int, list[np.ndarray]] = {}
        self.snrs: dict[int, list[float]] = {}  # each copy's noise SNR (inf: no noise)
        for index in indices:
            clean = prepared.waveform(index)
            speaker = prepared.rows[index]["speaker"]
            drawn = [
                chain.degrade(
                    clean, np.random.default_rng((seed, index, k, _RENDER_STREAM)), speaker
                )
                for k in range(variants)
            ]
            self.copies[index] = [x.astype(np.float16) for x, _ in drawn]
            self.snrs[index] = [snr for _, snr in drawn]

    def draw(
        self, index: int, rng: np.random.Generator, snr_floor: float | None = None
    ) -> tuple[int, np.ndarray] | None:
        """One of clip `index`'s copies whose noise is not below `snr_floor`: its number
        and samples (float32); None when none is, and the clean clip is used (8 copies,
        noise_prob 0.5: at most 1 clip in 256)."""
        allowed = [
            k for k, snr in enumerate(self.snrs[index]) if snr_floor is None or snr >= snr_floor
        ]
        if not allowed:
            return None
        k = allowed[int(rng.integers(len(allowed)))]
        return k, self.copies[index][k].astype(np.float32)


def train_speakers(prepared: PreparedSet) -> list[str]:
    """The training split's speakers, sorted: the classes of the speaker-adversarial head."""
    return sorted({prepared.rows[i]["speaker"] for i in prepared.indices("train")})


def member_holdouts(
    speakers: list[str], members: int, per_member: int, seed: int, has_val: bool = False
) -> list[list[str]]:
    """Disjoint sets of `per_member` training speakers, one per ensemble member, drawn by
    seed: member m learns from every speaker but its own set, on which the temperature is
    then fitted (`train.cross_fit_speakers`).

    Empty sets when cross-fitting is off, or when the train split is too small for it
    (fewer than two speakers would be learnt by every member): then calibration falls back
    to the validation split, with a warning, so the default still trains on small sets.
    A single model has no other member to learn its left-out speakers: with a validation
    split to calibrate on it leaves nobody out; without one it still does (calibration
    needs unseen speakers), and says which speakers it does not learn.
    """
    none: list[list[str]] = [[] for _ in range(members)]
    if per_member <= 0 or (members == 1 and has_val):
        return none
    need = members * per_member + 2
    if len(speakers) < need:
        log.warning(
            "train.cross_fit_speakers=%d: %d member(s) leaving out %d speakers each need at "
            "least %d training speakers, the train split has %d; calibrating on the "
            "validation split instead",
            per_member,
            members,
            per_member,
            need,
            len(speakers),
        )
        return none
    order = np.random.default_rng((seed, 0xC0F1)).permutation(sorted(speakers))
    held = [sorted(order[m * per_member : (m + 1) * per_member].tolist()) for m in range(members)]
    if members == 1:
        log.warning(
            "train.cross_fit_speakers=%d with one model and no validation split: speakers %s "
            "are left out of training to fit the temperature on; keep a validation split, or "
            "set train.cross_fit_speakers=0 to learn from them uncalibrated",
            per_member,
            ", ".join(held[0]),
        )
    return held


def training_conditions(prepared: PreparedSet, cfg: TrainConfig) -> MultiCondition | None:
    """The multi-condition chain for training; babble from the training speakers' clips."""
    conditions = cfg.augment.conditions
    if not conditions.enabled:
        return None
    babble = babble_source(prepared, prepared.indices("train"), min_speakers=2)
    if babble is None and "babble" in conditions.noise_types and conditions.noise_prob > 0:
        log.warning(
            "train.augment.conditions.noise_types: no babble, which needs at least two "
            "training speakers (a clip's babble never holds its own voice)"
        )
    chain = MultiCondition(conditions, prepared.sample_rate, babble=babble)
    if conditions.reverb_prob > 0:
        _ = chain.rooms  # build (or load) the room bank now, not in the first batch
    return chain


class PreparedDataModule(pl.LightningDataModule):
    """Train/val/test loaders over one prepared directory."""

    def __init__(self, prepared: PreparedSet, labels: list[str], cfg: TrainConfig) -> None:
        super().__init__()
        self.prepared = prepared
        self.labels = labels
        self.cfg = cfg
        self.speakers = train_speakers(prepared)
        self.conditions = training_conditions(prepared, cfg)
        self._rendered: RenderedConditions | None = None
        self.spans = TrimSpans(prepared.sample_rate, cfg.trim_method)

    @property
    def rendered(self) -> RenderedConditions | None:
        """The training clips' degraded copies, rendered on first use (None: afresh)."""
        variants = self.cfg.augment.conditions.variants
        if self.conditions is None or variants == 0:
            return None
        if self._rendered is None:
            self._rendered = RenderedConditions(
                self.conditions,
                self.prepared,
                self.prepared.indices("train"),
                variants,
                self.cfg.seed,
            )
            if self.cfg.trim_silence and self.spans.per_copy:
                self.spans.fill(self._rendered)
        return self._rendered

    def dataset(self, split: str) -> WaveformDataset:
        train = split == "train"
        rendered = self.rendered if train else None
        return WaveformDataset(
            self.prepared,
            self.prepared.indices(split),
            self.labels,
            self.cfg.clip_seconds,
            train=train,
            augment=self.cfg.augment,
            trim_silence=self.cfg.trim_silence,
            seed=self.cfg.seed,
            speakers=self.speakers,
            conditions=self.conditions if train and rendered is None else None,
            rendered=rendered,
            spans=self.spans,
        )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.dataset(split)
        if split == "train" and self.trainer is not None:
            ds.epoch = self.trainer.current_epoch
            ds.snr_floor = curriculum_snr_floor(
                self.cfg.augment.conditions, ds.epoch, self.cfg.trainer.max_epochs
            )
        return DataLoader(
            ds,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            num_workers=self.cfg.num_workers,
            persistent_workers=False,
            drop_last=shuffle and len(ds) > self.cfg.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
