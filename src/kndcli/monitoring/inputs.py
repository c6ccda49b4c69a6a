"""What drift compares: the bundle's reference and the current data.

The current data is a prediction-log window (SQLite or `gs://`) or a folder of audio
scored with the bundle's model; either way one DataFrame of audio features plus
`predicted` and `confidence`. Every problem that leaves nothing to judge is a
`DriftInputError` (exit code 2), never a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kndcli.config import AudioConfig, InferenceConfig
from kndcli.monitoring.verdict import CONFIDENCE, PREDICTED, DriftInputError, with_predicted

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True)
class ScoredAudio:
    """A scored audio folder: the current frame, and the files that could not be read."""

    frame: Any  # DataFrame: filename, `predicted`, `confidence`, audio features
    errors: list[str]  # "path: reason", one per unreadable file


def parse_since(text: str | None, now: datetime | None = None) -> datetime | None:
    """`24h`, `30m`, `7d` (ago) or an ISO time (UTC when no zone is given)."""
    if text is None or not str(text).strip():
        return None
    match = _RELATIVE.match(str(text))
    now = now or datetime.now(UTC)
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        moment = datetime.fromisoformat(str(text).strip())
    except ValueError:
        raise DriftInputError(
            f"--since {text!r}: use an ISO time (2025-01-31T12:00) or an age like 24h, 30m, 7d"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def current_frame(records: Iterable[dict[str, Any]]) -> Any:
    """Prediction-log records (predicted label in `label`) as the current DataFrame."""
    import pandas as pd

    return with_predicted(pd.DataFrame(list(records)))


def read_log(sink: str | Path, since: str | datetime | None = None, last: int | None = None) -> Any:
    """The current frame from a prediction-log window (SQLite path or gs://bucket/prefix)."""
    from kndcli.monitoring.predlog import open_log

    text = str(sink)
    if not text.startswith("gs://") and not Path(text).is_file():
        raise DriftInputError(
            f"no prediction log at {text}: serve some requests or pass --log-sink"
        )
    if last is not None and last < 1:
        raise DriftInputError(f"--last {last}: must be at least 1")
    moment = since if isinstance(since, datetime) or since is None else parse_since(since)
    log = open_log(text, flush_s=0)
    try:
        return current_frame(log.read(since=moment, last=last))
    finally:
        log.close()


def score_audio(
    bundle: str | Path,
    folder: str | Path,
    inference: InferenceConfig | None = None,
    workers: int = 0,
    audio: AudioConfig | None = None,
) -> ScoredAudio:
    """Score a folder of audio with the bundle's model, as `knd predict` would (the same
    `inference:` and `audio:` sections); the model's top label, as the prediction log
    records it."""
    import pandas as pd

    from kndcli.audio import find_audio_files
    from kndcli.inference.predictor import Predictor

    folder = Path(folder)
    if not folder.is_dir():
        raise DriftInputError(f"--audio {folder}: not a directory")
    paths = find_audio_files([folder])
    if not paths:
        raise DriftInputError(f"--audio {folder}: no audio files found")
    predictor = Predictor.from_config(bundle, inference, audio=audio)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for pred in predictor.predict_paths(paths, features=True, workers=workers):
        if not pred.ok or pred.features is None:
            errors.append(f"{pred.source}: {pred.error}")
            continue
        rows.append(
            {
                "filename": Path(pred.source).name,
                PREDICTED: pred.top_label,
                CONFIDENCE: pred.confidence,
                **pred.features,
            }
        )
    return ScoredAudio(frame=pd.DataFrame(rows), errors=errors)


def bundle_reference(bundle: str | Path) -> Any:
    """The reference table stored in a bundle."""
    from kndcli.inference.bundle import REFERENCE_FILE, load_bundle
    from kndcli.monitoring.reference import load_reference

    loaded = load_bundle(bundle)
    path = loaded.path(REFERENCE_FILE)
    if not path.is_file():
        raise DriftInputError(f"{loaded.root}: bundle has no {REFERENCE_FILE} to compare with")
    return load_reference(path)
