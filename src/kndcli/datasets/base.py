"""What a catalog returns, and the label vocabulary every dataset is mapped onto."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kndcli.config import LABELS
from kndcli.errors import KndError, UsageError

GENDERS = ("male", "female", "unknown")

# Spellings seen in the wild (folder names, TESS suffixes) -> the vocabulary in config.LABELS.
LABEL_SYNONYMS: dict[str, str] = {
    "fear": "fearful",
    "afraid": "fearful",
    "surprise": "surprised",
    "ps": "surprised",
    "pleasant_surprise": "surprised",
    "pleasant_surprised": "surprised",
    "anger": "angry",
    "happiness": "happy",
    "sadness": "sad",
    "disgusted": "disgust",
}


@dataclass(frozen=True)
class Clip:
    """One labelled recording; `extra` holds dataset-specific fields (intensity, statement)."""

    path: Path
    label: str
    speaker: str
    gender: str
    dataset: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class CatalogResult:
    """Clips found, plus one line per file that was left out and why."""

    clips: list[Clip]
    skipped: list[str] = field(default_factory=list)


def normalize_label(text: str) -> str | None:
    """Map a label spelling to the vocabulary, or None if it is not an emotion we know."""
    key = text.strip().lower().replace(" ", "_").replace("-", "_")
    key = LABEL_SYNONYMS.get(key, key)
    return key if key in LABELS else None


def check_root(root: Path, dataset: str) -> Path:
    """Fail early, naming the folder, when there is nothing to catalog."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{dataset}: folder {root} does not exist")
    if not root.is_dir():
        raise UsageError(f"{dataset}: {root} is not a folder")
    if not any(root.iterdir()):
        raise UsageError(f"{dataset}: folder {root} is empty")
    return root


def walk_files(root: Path, extensions: Iterable[str]) -> list[Path]:
    """Files under root with one of the extensions (any case), sorted, hidden entries skipped.

    Linked folders are followed (a data set assembled from links to another disk is
    common), each real folder once, so a link back up the tree is not a loop.
    """
    wanted = {e.lower() for e in extensions}
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        # Hidden folders (.git, .knd tmp dirs) hold no clips; sorting keeps the walk stable.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            # "._x.wav" are macOS resource forks, not audio.
            if not name.startswith(".") and Path(name).suffix.lower() in wanted:
                found.append(Path(dirpath) / name)
    return sorted(found)


def finish(
    dataset: str, root: Path, clips: list[Clip], skipped: list[str], hint: str = ""
) -> CatalogResult:
    """Sort the clips and refuse an empty result, quoting the first reason files were skipped."""
    if not clips:
        why = f"; {len(skipped)} files skipped, first: {skipped[0]}" if skipped else ""
        raise KndError(f"{dataset}: no clips found under {root}{why}{hint}")
    clips.sort(key=lambda c: str(c.path))
    return CatalogResult(clips=clips, skipped=skipped)
