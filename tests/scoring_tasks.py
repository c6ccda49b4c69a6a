"""Module-level scoring tasks for the pool tests: spawned workers import them by name."""

from __future__ import annotations

import os
from pathlib import Path

from kndcli.serving.scoring import Clip, score_clips


def crash_on_poison(clips: list[Clip]) -> list:
    """Score as the server does, but die like a crashing decoder on a clip named 'poison'."""
    if any(clip.name == "poison" for clip in clips):
        os._exit(1)
    return score_clips(clips)


def crash_once(clips: list[Clip]) -> list:
    """Die on the first batch holding a clip whose name is a path that does not exist yet
    (created first), like a worker killed under whatever clip it was handed; score after."""
    for clip in clips:
        marker = Path(clip.name)
        if clip.name.startswith("/") and not marker.exists():
            marker.touch()
            os._exit(1)
    return score_clips(clips)


def heavy_modules(clips: list[Clip]) -> list[str]:
    """Which training-side packages a scoring worker has imported (it should be none)."""
    import sys

    return [name for name in ("torch", "pytorch_lightning", "wandb") if name in sys.modules]
