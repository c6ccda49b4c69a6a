"""TESS: `OAF_back_angry.wav`; two actresses (OAF older, YAF younger), label after the word."""

from __future__ import annotations

from pathlib import Path

from kndcli.datasets.base import (
    CatalogResult,
    Clip,
    check_root,
    finish,
    normalize_label,
    walk_files,
)

EXTENSIONS = (".wav", ".flac")
SPEAKERS = ("OAF", "YAF")


def parse_name(path: Path) -> Clip | str:
    """A Clip for a TESS file name, or the reason it is not one."""
    parts = path.stem.split("_")
    speaker = parts[0].upper()
    if len(parts) < 3 or speaker not in SPEAKERS:
        return f"{path}: not a TESS name (expected OAF_WORD_EMOTION or YAF_WORD_EMOTION)"
    # "pleasant_surprise" spans two underscore-separated parts.
    two = "_".join(parts[-2:]).lower()
    if len(parts) >= 4 and two.startswith("pleasant_surprise"):
        word, raw = "_".join(parts[1:-2]), two
    else:
        word, raw = "_".join(parts[1:-1]), parts[-1]
    label = normalize_label(raw)
    if label is None:
        return f"{path}: unknown TESS emotion '{raw}'"
    return Clip(
        path=path,
        label=label,
        speaker=speaker,
        gender="female",
        dataset="tess",
        extra={"word": word.lower()},
    )


def catalog(root: Path) -> CatalogResult:
    """Every TESS file under root; a second copy of the same recording is skipped."""
    root = check_root(root, "tess")
    clips: list[Clip] = []
    skipped: list[str] = []
    # Some redistributions nest the whole set twice; counting it twice would leak across splits.
    seen: dict[tuple[str, str, str], Path] = {}
    for path in walk_files(root, EXTENSIONS):
        parsed = parse_name(path)
        if isinstance(parsed, str):
            skipped.append(parsed)
            continue
        key = (parsed.speaker, parsed.extra["word"], parsed.label)
        if key in seen:
            skipped.append(f"{path}: duplicate of {seen[key]}")
            continue
        seen[key] = path
        clips.append(parsed)
    return finish("tess", root, clips, skipped)
