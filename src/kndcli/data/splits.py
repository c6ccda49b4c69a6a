"""Speaker-independent splits: a speaker's clips all land in one split."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable

from kndcli.config import SplitConfig
from kndcli.errors import KndError

SPLITS = ("train", "val", "test")


def assign_speakers(speakers: dict[str, str], cfg: SplitConfig) -> dict[str, str]:
    """Map speaker -> split from explicit lists, else seeded fractions balanced by gender.

    `speakers` maps speaker id -> gender. Explicit lists win; any speaker not named in
    them goes to train. Fractions are taken per gender so val and test keep the mix.
    """
    val_speakers = _canonical(cfg.val_speakers, speakers)
    test_speakers = _canonical(cfg.test_speakers, speakers)
    unknown = (set(val_speakers) | set(test_speakers)) - set(speakers)
    if unknown:
        raise KndError(
            f"data.split: speakers {sorted(unknown)} are not in the dataset "
            f"(known: {', '.join(sorted(speakers))})"
        )
    both = set(val_speakers) & set(test_speakers)
    if both and not cfg.allow_shared_speakers:
        raise KndError(f"data.split: speakers {sorted(both)} are listed for both val and test")
    if val_speakers or test_speakers:
        split = {s: "train" for s in speakers}
        split.update({s: "val" for s in val_speakers})
        split.update({s: "test" for s in test_speakers})
        return split

    by_gender: dict[str, list[str]] = defaultdict(list)
    for speaker, gender in sorted(speakers.items()):
        by_gender[gender].append(speaker)
    rng = random.Random(cfg.seed)
    for gender in sorted(by_gender):
        rng.shuffle(by_gender[gender])
    # Interleave the genders so every prefix of the order is as balanced as it can be.
    order: list[str] = []
    groups = [by_gender[g] for g in sorted(by_gender)]
    for i in range(max(len(g) for g in groups)):
        order.extend(g[i] for g in groups if i < len(g))
    n = len(order)
    n_test = _count(n, cfg.test_fraction)
    n_val = _count(n - n_test, cfg.val_fraction)
    if n - n_test - n_val < 1:
        raise KndError(f"data.split: {n} speakers are too few for train, val and test splits")
    split: dict[str, str] = {}
    for i, speaker in enumerate(order):
        split[speaker] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return split


def _canonical(requested: list[str], known: dict[str, str]) -> list[str]:
    """Match '1' to '01': YAML and key=value overrides read `[01, 02]` as integers."""
    by_number = {int(s): s for s in known if s.isdigit()}
    out = []
    for speaker in map(str, requested):
        if speaker not in known and speaker.isdigit() and int(speaker) in by_number:
            speaker = by_number[int(speaker)]
        out.append(speaker)
    return out


def _count(n: int, fraction: float) -> int:
    """Round a fraction of n speakers, keeping at least one when the fraction asks for any."""
    if fraction <= 0 or n <= 1:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def shared_speakers(rows: Iterable[dict[str, str]]) -> dict[str, set[str]]:
    """Speakers that appear in more than one split, with the splits they appear in."""
    seen: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        seen[row["speaker"]].add(row["split"])
    return {speaker: splits for speaker, splits in seen.items() if len(splits) > 1}
