"""The drift reference stored in each bundle as `reference.parquet`.

Rows with `source == "train"` hold the audio features of every training clip; rows with
`source == "val"` hold validation clips' features plus the model's predicted label and
confidence, the reference for prediction drift. Columns: source, label, predicted,
confidence, then `kndcli.audio.FEATURE_NAMES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kndcli.audio import FEATURE_NAMES

REFERENCE_COLUMNS = ("source", "label", "predicted", "confidence", *FEATURE_NAMES)


def build_reference(
    train_features: Sequence[dict[str, float]],
    train_labels: Sequence[str],
    val_features: Sequence[dict[str, float]],
    val_labels: Sequence[str],
    val_predicted: Sequence[str],
    val_confidence: Sequence[float],
) -> Any:
    """A pandas DataFrame in the reference layout."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for feats, label in zip(train_features, train_labels, strict=True):
        rows.append(
            {
                "source": "train",
                "label": label,
                "predicted": None,
                "confidence": None,
                **{k: feats[k] for k in FEATURE_NAMES},
            }
        )
    for feats, label, pred, conf in zip(
        val_features, val_labels, val_predicted, val_confidence, strict=True
    ):
        rows.append(
            {
                "source": "val",
                "label": label,
                "predicted": pred,
                "confidence": conf,
                **{k: feats[k] for k in FEATURE_NAMES},
            }
        )
    return pd.DataFrame(rows, columns=list(REFERENCE_COLUMNS))


def load_reference(path: str | Path) -> Any:
    import pandas as pd

    return pd.read_parquet(path)
