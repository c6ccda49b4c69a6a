"""The drift verdict: compare every column, then decide ok, drift or cannot-judge.

The verdict is drift when more than `max_drifted_share` of the tested columns drifted, or
when one drifted by at least `severe_effect` (the current values barely overlap the
reference: an 8 kHz phone line, clipped audio, heavy noise). Too few rows on either side
is cannot-judge, never ok. The per-column tests are in `drift_stats`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from kndcli.audio import FEATURE_NAMES
from kndcli.config import DriftConfig, KndConfig, check_drift
from kndcli.errors import UsageError
from kndcli.monitoring.drift_stats import ColumnDrift, compare_column

CATEGORICAL_FEATURES = ("sample_rate", "channels")
PREDICTED = "predicted"
CONFIDENCE = "confidence"
OK, DRIFT, CANNOT_JUDGE = "ok", "drift", "cannot-judge"
# 4, not 2: 2 is a usage error for every knd command (errors.py), and a cron job
# must tell "too little traffic to judge" from a typo.
EXIT_CODES = {OK: 0, DRIFT: 1, CANNOT_JUDGE: 4}


class DriftInputError(UsageError):
    """No data to judge: a missing log or bundle reference, an empty window, bad options."""


@dataclass(frozen=True)
class ReferenceSplit:
    """A bundle's reference table split by what each part is the reference for."""

    features: Any  # DataFrame: training rows, the audio-feature reference
    predictions: Any  # DataFrame: validation rows with the model's predictions


@dataclass(frozen=True)
class DriftFrames:
    """The frames an analysis compared, kept so the report draws exactly those."""

    reference: ReferenceSplit
    current: Any  # DataFrame: features, `predicted`, `confidence`


@dataclass
class DriftResult:
    """The analysis, plus the frames it compared so a report can be drawn from it."""

    verdict: str
    reason: str
    reference_rows: int
    prediction_reference_rows: int
    current_rows: int
    features: list[ColumnDrift]
    prediction: list[ColumnDrift]
    drifted_share: float
    thresholds: dict[str, float]
    frames: DriftFrames = field(repr=False)
    source: str = ""
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    @property
    def columns(self) -> list[ColumnDrift]:
        return [*self.features, *self.prediction]

    @property
    def drifted(self) -> list[str]:
        return [c.column for c in self.columns if c.drifted]

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary: plain numbers, no NaN."""
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "created": self.created,
            "source": self.source,
            "reference_rows": self.reference_rows,
            "prediction_reference_rows": self.prediction_reference_rows,
            "current_rows": self.current_rows,
            "tested_columns": sum(c.tested for c in self.columns),
            "drifted_columns": self.drifted,
            "drifted_share": round(self.drifted_share, 4),
            "thresholds": self.thresholds,
            "features": [_clean(asdict(c)) for c in self.features],
            "prediction": [_clean(asdict(c)) for c in self.prediction],
        }


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


def drift_settings(cfg: DriftConfig | KndConfig) -> DriftConfig:
    """The `drift` section: callers pass either the whole config or just that section."""
    return cfg.drift if isinstance(cfg, KndConfig) else cfg


def with_predicted(frame: Any) -> Any:
    """The frame with the predicted label as `predicted` (the prediction log calls it `label`)."""
    if PREDICTED not in frame.columns and "label" in frame.columns:
        return frame.rename(columns={"label": PREDICTED})
    return frame


def split_reference(reference_df: Any) -> ReferenceSplit:
    """The feature and prediction references in a bundle's reference table.

    Training rows are the feature reference; validation rows, which carry the model's
    predictions, are the prediction reference. A table without `source` serves as both.
    """
    if "source" in reference_df.columns:
        train = reference_df[reference_df["source"] == "train"]
        if train.empty:
            train = reference_df
        val = reference_df[reference_df["source"] == "val"]
    else:
        train = val = reference_df
    val = val[val[PREDICTED].notna()] if PREDICTED in val.columns else val.iloc[0:0]
    return ReferenceSplit(features=train, predictions=val)


def analyze_drift(
    reference_df: Any, current_df: Any, cfg: DriftConfig | KndConfig, source: str = ""
) -> DriftResult:
    """Compare current rows (features, `predicted`, `confidence`) with the reference."""
    import pandas as pd

    cfg = drift_settings(cfg)
    check_drift(cfg)  # a DriftConfig built in code has not been through load_config
    reference = split_reference(reference_df)
    feature_ref, prediction_ref = reference.features, reference.predictions
    current = with_predicted(current_df if current_df is not None else pd.DataFrame())
    thresholds = {
        "min_samples": cfg.min_samples,
        "p_value": cfg.p_value,
        "min_effect": cfg.min_effect,
        "severe_effect": cfg.severe_effect,
        "max_drifted_share": cfg.max_drifted_share,
    }
    result = DriftResult(
        verdict=CANNOT_JUDGE,
        reason="",
        reference_rows=len(feature_ref),
        prediction_reference_rows=len(prediction_ref),
        current_rows=len(current),
        features=[],
        prediction=[],
        drifted_share=0.0,
        thresholds=thresholds,
        frames=DriftFrames(reference=reference, current=current),
        source=source,
    )
    if len(current) == 0:
        result.reason = "no current data: the window holds no requests"
        return result
    if len(current) < cfg.min_samples:
        result.reason = (
            f"only {len(current)} current samples; need at least {cfg.min_samples} "
            "(drift.min_samples) to judge drift"
        )
        return result
    if len(feature_ref) < cfg.min_samples:
        result.reason = (
            f"the reference holds only {len(feature_ref)} rows; need at least "
            f"{cfg.min_samples} (drift.min_samples)"
        )
        return result

    def column(frame: Any, name: str) -> list[Any]:
        return frame[name].tolist() if name in frame.columns else []

    for name in FEATURE_NAMES:
        kind = "categorical" if name in CATEGORICAL_FEATURES else "numeric"
        result.features.append(
            compare_column(name, kind, column(feature_ref, name), column(current, name), cfg)
        )
    result.prediction = [
        compare_column(
            PREDICTED,
            "categorical",
            column(prediction_ref, PREDICTED),
            column(current, PREDICTED),
            cfg,
        ),
        compare_column(
            CONFIDENCE,
            "numeric",
            column(prediction_ref, CONFIDENCE),
            column(current, CONFIDENCE),
            cfg,
        ),
    ]
    tested = [c for c in result.columns if c.tested]
    if not tested:
        result.reason = "no column has values on both sides: nothing to compare"
        return result
    drifted = [c for c in tested if c.drifted]
    severe = [c for c in tested if c.severe]
    result.drifted_share = len(drifted) / len(tested)
    share_text = (
        f"{len(drifted)} of {len(tested)} columns drifted ({result.drifted_share:.0%}, "
        f"limit {cfg.max_drifted_share:.0%})"
    )
    if result.drifted_share > cfg.max_drifted_share or severe:
        result.verdict = DRIFT
        severe_text = ", ".join(f"{c.column} ({c.statistic:.2f})" for c in severe)
        result.reason = share_text + (f"; severe: {severe_text}" if severe else "")
    else:
        result.verdict = OK
        result.reason = share_text + (
            f": {', '.join(c.column for c in drifted)}" if drifted else ""
        )
    return result
