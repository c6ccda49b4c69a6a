"""A folder per label: `root/<label>/*.wav`; speakers come from a regex on the file name."""

from __future__ import annotations

import re
from pathlib import Path

from kndcli.config import LABELS
from kndcli.datasets.base import (
    CatalogResult,
    Clip,
    check_root,
    finish,
    normalize_label,
    walk_files,
)
from kndcli.errors import ConfigError

EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
DEFAULT_SPEAKER_REGEX = r"^(?P<speaker>[^_\-]+)"


def compile_speaker_regex(pattern: str) -> re.Pattern[str]:
    """The speaker pattern, checked once so a typo fails before any file is read."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"data.speaker_regex {pattern!r} is not a valid regex: {exc}") from exc
    if "speaker" not in compiled.groupindex:
        raise ConfigError(f"data.speaker_regex {pattern!r} needs a named group (?P<speaker>...)")
    return compiled


def catalog(root: Path, *, speaker_regex: str = DEFAULT_SPEAKER_REGEX) -> CatalogResult:
    """Every audio file in a label folder under root; the folder name is the label."""
    regex = compile_speaker_regex(speaker_regex)
    root = check_root(root, "folder")
    clips: list[Clip] = []
    skipped: list[str] = []
    for path in walk_files(root, EXTENSIONS):
        relative = path.relative_to(root)
        if len(relative.parts) < 2:
            skipped.append(f"{path}: not inside a label folder (expected {root}/<label>/<file>)")
            continue
        folder = relative.parts[0]
        label = normalize_label(folder)
        if label is None:
            skipped.append(
                f"{path}: unknown label '{folder}' (expected one of {', '.join(LABELS)})"
            )
            continue
        match = regex.search(path.stem)
        speaker = match["speaker"] if match and match["speaker"] else "unknown"
        clips.append(
            Clip(path=path, label=label, speaker=speaker, gender="unknown", dataset="folder")
        )
    return finish("folder", root, clips, skipped)
