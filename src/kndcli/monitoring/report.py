"""The drift report as HTML: knd's verdict on top, Evidently's interactive report below.

Evidently is imported only when a report with tested columns is drawn; it runs stat
tests registered from `drift_stats`, so the HTML flags exactly what the summary flags.
"""

from __future__ import annotations

import html
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from kndcli.config import DriftConfig
from kndcli.monitoring.drift_stats import categorical_drift, category_name, is_nan, numeric_drift
from kndcli.monitoring.verdict import CANNOT_JUDGE, DRIFT, OK, DriftResult

_REGISTER_LOCK = threading.Lock()


@dataclass(frozen=True)
class _StatTestNames:
    """Evidently's registry names of knd's tests for one set of thresholds."""

    numeric: str
    categorical: str


def _register_stattests(cfg: DriftConfig) -> _StatTestNames:
    """Evidently stat tests that apply knd's rule, so the HTML flags what the summary flags."""
    from evidently.legacy.calculations.stattests.registry import (
        StatTest,
        _registered_stat_tests,
        register_stattest,
    )
    from evidently.legacy.core import ColumnType

    key = f"p{cfg.p_value:g}-s{cfg.severe_effect:g}"
    names = _StatTestNames(numeric=f"knd-ks-{key}", categorical=f"knd-chi2-{key}")
    with _REGISTER_LOCK:
        if names.numeric in _registered_stat_tests:
            return names

        def numeric(reference: Any, current: Any, feature_type: Any, threshold: float):
            outcome = numeric_drift(reference, current, cfg.p_value, threshold, cfg.severe_effect)
            return outcome.statistic, outcome.drifted

        def categorical(reference: Any, current: Any, feature_type: Any, threshold: float):
            outcome = categorical_drift(
                reference, current, cfg.p_value, threshold, cfg.severe_effect
            )
            return outcome.statistic, outcome.drifted

        register_stattest(
            StatTest(
                name=names.numeric,
                display_name=f"K-S statistic (p < {cfg.p_value:g})",
                allowed_feature_types=[ColumnType.Numerical],
                default_threshold=cfg.min_effect,
            ),
            numeric,
        )
        register_stattest(
            StatTest(
                name=names.categorical,
                display_name=f"total variation (chi-square p < {cfg.p_value:g})",
                allowed_feature_types=[ColumnType.Categorical],
                default_threshold=cfg.min_effect,
            ),
            categorical,
        )
    return names


def evidently_snapshot(result: DriftResult, cfg: DriftConfig) -> Any:
    """An Evidently 0.7 Report run: per-feature data drift, prediction drift, summary."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    names = _register_stattests(cfg)
    tested = {c.column: c for c in result.columns if c.tested}
    features = [c.column for c in result.features if c.tested]
    prediction = [c.column for c in result.prediction if c.tested]
    columns = features + prediction
    categorical = [c for c in columns if tested[c].kind == "categorical"]
    numerical = [c for c in columns if tested[c].kind == "numeric"]

    def frame(features_from: Any, prediction_from: Any) -> Any:
        # Feature rows and prediction rows may differ (train vs val): stack them with NaN
        # in the other part, since Evidently drops missing values column by column.
        top = features_from.reindex(columns=columns).copy()
        top[prediction] = np.nan
        if prediction_from is features_from:
            top[prediction] = features_from.reindex(columns=prediction).to_numpy()
            parts = [top]
        else:
            bottom = prediction_from.reindex(columns=columns).copy()
            bottom[features] = np.nan
            parts = [top, bottom]
        out = pd.concat(parts, ignore_index=True)
        # Evidently embeds the data as JSON inside a <script> without escaping "</":
        # a label from a prediction log someone else can write could close it.
        for name in categorical:
            out[name] = out[name].map(
                lambda v: None if v is None or is_nan(v) else html.escape(category_name(v))
            )
        for name in numerical:
            out[name] = pd.to_numeric(out[name], errors="coerce").astype("float64")
        return out

    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    reference = frame(result.frames.reference.features, result.frames.reference.predictions)
    current = frame(result.frames.current, result.frames.current)
    methods = {c: names.categorical if c in categorical else names.numeric for c in columns}
    # The preset's summary counts features and prediction columns together, as knd does;
    # the prediction columns then get their own section.
    items: list[Any] = [
        DataDriftPreset(
            columns=columns,
            drift_share=cfg.max_drifted_share,
            per_column_method=methods,
            threshold=cfg.min_effect,
        ),
    ]
    items += [ValueDrift(column=c, method=methods[c], threshold=cfg.min_effect) for c in prediction]
    report = Report(items, metadata={"verdict": result.verdict, "reason": result.reason})
    with warnings.catch_warnings():
        # Evidently correlates every column pair; constant columns make numpy warn.
        warnings.simplefilter("ignore", RuntimeWarning)
        return report.run(
            Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition),
        )


def report_html(result: DriftResult, cfg: DriftConfig) -> str:
    """The report as one HTML string: knd's verdict on top, Evidently's report below."""
    banner = _banner(result)
    if result.verdict == CANNOT_JUDGE or not any(c.tested for c in result.columns):
        return plain_page(banner)
    snapshot = evidently_snapshot(result, cfg)
    page = snapshot.get_html_str(as_iframe=False)
    return page.replace("<body>", "<body>" + banner, 1).replace(
        "<head>", "<head><title>knd drift report</title>", 1
    )


def plain_page(body: str) -> str:
    """A minimal report page, for when there is nothing for Evidently to plot."""
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='UTF-8'>"
        "<title>knd drift report</title></head><body>"
        f"{body}</body></html>"
    )


def _banner(result: DriftResult) -> str:
    colour = {OK: "#1b7f3b", DRIFT: "#b3261e", CANNOT_JUDGE: "#8a6d00"}[result.verdict]
    rows = "".join(
        f"<tr><td>{html.escape(c.column)}</td><td>{html.escape(c.test)}</td>"
        f"<td>{'' if c.statistic is None else f'{c.statistic:.3f}'}</td>"
        f"<td>{'' if c.p_value is None else f'{c.p_value:.3g}'}</td>"
        f"<td>{'yes' if c.drifted else 'no'}{' (severe)' if c.severe else ''}</td></tr>"
        for c in result.columns
        if c.tested
    )
    table = (
        "<table style='border-collapse:collapse;font-size:13px' cellpadding='3'>"
        "<tr><th align='left'>column</th><th align='left'>test</th><th>statistic</th>"
        f"<th>p-value</th><th>drifted</th></tr>{rows}</table>"
        if rows
        else ""
    )
    return (
        "<div id='knd-verdict' style='font-family:sans-serif;padding:16px 24px;"
        f"border-left:8px solid {colour};margin:12px'>"
        f"<h2 style='margin:0;color:{colour}'>knd drift: {html.escape(result.verdict)}</h2>"
        f"<p>{html.escape(result.reason)}</p>"
        f"<p style='color:#555'>{html.escape(result.source)} &middot; current rows "
        f"{result.current_rows}, reference rows {result.reference_rows} (features), "
        f"{result.prediction_reference_rows} (predictions) &middot; {result.created}</p>"
        f"{table}</div>"
    )
