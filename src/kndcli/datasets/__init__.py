"""Dataset catalogs (file -> label, speaker, gender) and checksummed downloads."""

from __future__ import annotations

from pathlib import Path

from kndcli.datasets.base import CatalogResult, Clip, normalize_label
from kndcli.datasets.folder import DEFAULT_SPEAKER_REGEX
from kndcli.errors import UsageError

DATASETS = ("ravdess", "cremad", "tess", "folder", "synth")

__all__ = ["DATASETS", "CatalogResult", "Clip", "catalog", "normalize_label"]


def catalog(
    name: str,
    root: Path,
    *,
    include_song: bool = False,
    speaker_regex: str = DEFAULT_SPEAKER_REGEX,
) -> CatalogResult:
    """List the labelled clips of dataset `name` under root, sorted by path."""
    from kndcli.datasets import cremad, folder, ravdess, tess  # small modules, loaded on use

    key = name.strip().lower()
    root = Path(root)
    if key == "ravdess":
        return ravdess.catalog(root, include_song=include_song)
    if key == "synth":
        # The synthetic generator writes RAVDESS names, so one parser serves both.
        return ravdess.catalog(root, include_song=include_song, dataset="synth")
    if key == "cremad":
        return cremad.catalog(root)
    if key == "tess":
        return tess.catalog(root)
    if key == "folder":
        return folder.catalog(root, speaker_regex=speaker_regex)
    raise UsageError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
