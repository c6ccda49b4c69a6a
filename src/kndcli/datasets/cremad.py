"""CREMA-D: `1001_DFA_ANG_XX.wav`; speakers' sex comes from the corpus's VideoDemographics.csv."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from kndcli.datasets.base import CatalogResult, Clip, check_root, finish, walk_files
from kndcli.errors import KndError

# MP3 copies (AudioMP3/) are left out so a checkout of the whole repository is not counted twice.
EXTENSIONS = (".wav", ".flac")
EMOTIONS = {
    "ANG": "angry",
    "DIS": "disgust",
    "FEA": "fearful",
    "HAP": "happy",
    "NEU": "neutral",
    "SAD": "sad",
}
INTENSITIES = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}
DEMOGRAPHICS = "VideoDemographics.csv"
_NAME = re.compile(
    r"^(?P<actor>\d{4})_(?P<sentence>[A-Z]{3})_(?P<emotion>[A-Z]{3})_(?P<level>[A-Z]{2})$"
)


def read_demographics(root: Path) -> dict[str, str]:
    """Actor id -> "male"/"female" from VideoDemographics.csv in root or its parent, if present."""
    for folder in (root, root.parent):
        path = folder / DEMOGRAPHICS
        if path.is_file():
            return _parse_demographics(path)
    return {}


def _parse_demographics(path: Path) -> dict[str, str]:
    genders: dict[str, str] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"ActorID", "Sex"} <= set(reader.fieldnames):
                raise KndError(f"{path}: expected columns ActorID and Sex, got {reader.fieldnames}")
            for row in reader:
                sex = (row.get("Sex") or "").strip().lower()
                actor = (row.get("ActorID") or "").strip()
                if actor:
                    genders[actor] = sex if sex in ("male", "female") else "unknown"
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise KndError(f"{path}: cannot read demographics: {exc}") from exc
    return genders


def parse_name(path: Path, genders: dict[str, str]) -> Clip | str:
    """A Clip for a CREMA-D file name, or the reason it is not one."""
    match = _NAME.match(path.stem)
    if not match:
        return (
            f"{path}: not a CREMA-D name "
            "(expected ACTOR_SENTENCE_EMOTION_LEVEL, e.g. 1001_DFA_ANG_XX)"
        )
    label = EMOTIONS.get(match["emotion"])
    if label is None:
        return (
            f"{path}: unknown CREMA-D emotion {match['emotion']} (expected {', '.join(EMOTIONS)})"
        )
    actor = match["actor"]
    return Clip(
        path=path,
        label=label,
        speaker=actor,
        gender=genders.get(actor, "unknown"),
        dataset="cremad",
        extra={
            "statement": match["sentence"],
            "intensity": INTENSITIES.get(match["level"], match["level"].lower()),
        },
    )


def catalog(root: Path) -> CatalogResult:
    """Every CREMA-D audio file under root."""
    root = check_root(root, "cremad")
    genders = read_demographics(root)
    clips: list[Clip] = []
    skipped: list[str] = []
    for path in walk_files(root, EXTENSIONS):
        parsed = parse_name(path, genders)
        (skipped if isinstance(parsed, str) else clips).append(parsed)
    return finish("cremad", root, clips, skipped)
