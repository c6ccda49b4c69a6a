"""RAVDESS: the label, speaker and gender are all in the file name `MM-VV-EE-II-SS-RR-AA`."""

from __future__ import annotations

import re
from pathlib import Path

from kndcli.datasets.base import CatalogResult, Clip, check_root, finish, walk_files

EXTENSIONS = (".wav", ".flac")
EMOTIONS = {
    "01": "neutral",
    "02": "calm",
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgust",
    "08": "surprised",
}
_NAME = re.compile(
    r"^(?P<modality>0[1-3])-(?P<channel>0[12])-(?P<emotion>\d\d)-(?P<intensity>0[12])"
    r"-(?P<statement>0[12])-(?P<repetition>0[12])-(?P<actor>\d\d)$"
)


def parse_name(path: Path, dataset: str = "ravdess") -> Clip | str:
    """A Clip for a RAVDESS file name, or the reason it is not one."""
    match = _NAME.match(path.stem)
    if not match or match["actor"] == "00":
        return (
            f"{path}: not a RAVDESS name (expected MM-VV-EE-II-SS-RR-AA, e.g. 03-01-05-01-02-01-12)"
        )
    label = EMOTIONS.get(match["emotion"])
    if label is None:
        return f"{path}: unknown RAVDESS emotion code {match['emotion']} (expected 01-08)"
    actor = match["actor"]
    return Clip(
        path=path,
        label=label,
        speaker=actor,
        # The corpus assigns odd actor numbers to men and even ones to women.
        gender="male" if int(actor) % 2 else "female",
        dataset=dataset,
        extra={
            "modality": match["modality"],
            "vocal_channel": "song" if match["channel"] == "02" else "speech",
            "intensity": "strong" if match["intensity"] == "02" else "normal",
            "statement": match["statement"],
            "repetition": match["repetition"],
        },
    )


def catalog(root: Path, *, include_song: bool = False, dataset: str = "ravdess") -> CatalogResult:
    """Every RAVDESS audio file under root; speech only unless include_song."""
    root = check_root(root, dataset)
    clips: list[Clip] = []
    skipped: list[str] = []
    songs = 0
    for path in walk_files(root, EXTENSIONS):
        parsed = parse_name(path, dataset)
        if isinstance(parsed, str):
            skipped.append(parsed)
        elif parsed.extra["vocal_channel"] == "song" and not include_song:
            songs += 1  # a choice, not a problem: not listed among the skipped files
        else:
            clips.append(parsed)
    hint = f" ({songs} song files ignored: set data.include_song=true)" if songs else ""
    return finish(dataset, root, clips, skipped, hint)
