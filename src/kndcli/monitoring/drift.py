"""Drift: do the requests the model answers still look like the audio it was trained on?

Every feature gets a two-sample test and an effect size on the same 0..1 scale, so one
threshold means the same thing for every feature and every sample size:

- numeric features: Kolmogorov-Smirnov; the statistic is the largest gap between the two
  empirical CDFs. A feature that is constant in the reference (clipping ratio 0 in clean
  speech) uses the share of current values outside the reference value instead, which is
  what the KS statistic reduces to there, never a NaN.
- categorical features (original sample rate, channel count, predicted label): chi-square
  on the contingency table; the statistic is the total variation distance, so a sample
  rate or label never seen in the reference counts fully.

A feature has drifted when the test is significant (`p_value`) AND the statistic reaches
`min_effect`: with thousands of logged requests every tiny difference is significant,
and different speakers alone move loudness and duration a little. The verdict is drift
when more than `max_drifted_share` of the tested columns drifted, or when one drifted by
at least `severe_effect` (the current values barely overlap the reference: an 8 kHz
phone line, clipped audio, heavy noise).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from kndcli.audio import FEATURE_NAMES
from kndcli.config import DriftConfig, KndConfig
from kndcli.errors import KndError

CATEGORICAL_FEATURES = ("sample_rate", "channels")
PREDICTED = "predicted"
CONFIDENCE = "confidence"
OK, DRIFT, CANNOT_JUDGE = "ok", "drift", "cannot-judge"
EXIT_CODES = {OK: 0, DRIFT: 1, CANNOT_JUDGE: 2}


class DriftInputError(KndError):
    """No data to judge: a missing log or bundle reference, an empty window, bad options."""

    exit_code = 2


@dataclass
class ColumnDrift:
    """One column's comparison; `statistic` is on a 0..1 scale for every test."""

    column: str
    kind: str
    test: str
    statistic: float | None
    p_value: float | None
    distance: float | None
    drifted: bool
    severe: bool
    reference_n: int
    current_n: int
    reference_summary: str
    current_summary: str
    note: str = ""

    @property
    def tested(self) -> bool:
        return self.statistic is not None


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
    source: str = ""
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    frames: dict[str, Any] = field(default_factory=dict, repr=False)

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


# ----------------------------------------------------------------------------- tests


def _finite(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]


def _summary(values: np.ndarray) -> str:
    if len(values) == 0:
        return "-"
    if np.ptp(values) == 0:
        return f"= {values[0]:.4g}"
    return (
        f"{np.median(values):.4g} [{np.percentile(values, 5):.3g}, {np.percentile(values, 95):.3g}]"
    )


def numeric_drift(
    reference: Any, current: Any, p_value: float, min_effect: float, severe_effect: float
) -> tuple[str, float, float, float | None, bool, bool]:
    """(test, statistic, p, Wasserstein distance in reference std, drifted, severe)."""
    from scipy.stats import ks_2samp, wasserstein_distance

    ref, cur = _finite(reference), _finite(current)
    ks = ks_2samp(ref, cur)
    p = float(ks.pvalue)
    spread = float(ref.std())
    if spread == 0.0:
        test = "share outside constant reference"
        statistic = float(np.mean(~np.isclose(cur, ref[0], rtol=1e-9, atol=1e-12)))
        distance = None
    else:
        test = "ks"
        statistic = float(ks.statistic)
        distance = float(wasserstein_distance(ref, cur) / spread)
    drifted = p < p_value and statistic >= min_effect
    return test, statistic, p, distance, drifted, drifted and statistic >= severe_effect


def categorical_drift(
    reference: Any, current: Any, p_value: float, min_effect: float, severe_effect: float
) -> tuple[str, float, float, float, bool, bool, str]:
    """(test, TVD, chi-square p, PSI, drifted, severe, note on unseen categories)."""
    from scipy.stats import chi2_contingency

    ref = [str(v) for v in reference]
    cur = [str(v) for v in current]
    categories = sorted(set(ref) | set(cur))
    ref_counts = np.array([ref.count(c) for c in categories], dtype=np.float64)
    cur_counts = np.array([cur.count(c) for c in categories], dtype=np.float64)
    ref_p, cur_p = ref_counts / ref_counts.sum(), cur_counts / cur_counts.sum()
    statistic = float(0.5 * np.abs(ref_p - cur_p).sum())
    p = 1.0 if len(categories) < 2 else float(chi2_contingency([ref_counts, cur_counts]).pvalue)
    eps = 1e-4
    psi = float(((cur_p + eps - ref_p - eps) * np.log((cur_p + eps) / (ref_p + eps))).sum())
    unseen = [c for c, n in zip(categories, ref_counts, strict=True) if n == 0]
    note = ""
    if unseen:
        share = cur_counts[[categories.index(c) for c in unseen]].sum() / cur_counts.sum()
        note = f"{share:.0%} of current values unseen in reference: {', '.join(unseen[:5])}"
    drifted = p < p_value and statistic >= min_effect
    return "chi-square", statistic, p, psi, drifted, drifted and statistic >= severe_effect, note


def _compare(column: str, kind: str, reference: Any, current: Any, cfg: DriftConfig) -> ColumnDrift:
    if kind == "categorical":
        ref = [v for v in reference if v is not None and not _is_nan(v)]
        cur = [v for v in current if v is not None and not _is_nan(v)]
        ref_text = _category_summary(ref)
        cur_text = _category_summary(cur)
    else:
        ref, cur = _finite(reference), _finite(current)
        ref_text, cur_text = _summary(ref), _summary(cur)
    base = dict(
        column=column,
        kind=kind,
        reference_n=len(ref),
        current_n=len(cur),
        reference_summary=ref_text,
        current_summary=cur_text,
    )
    if len(ref) == 0 or len(cur) == 0:
        side = "reference" if len(ref) == 0 else "current data"
        return ColumnDrift(
            **base,
            test="-",
            statistic=None,
            p_value=None,
            distance=None,
            drifted=False,
            severe=False,
            note=f"not tested: no values in the {side}",
        )
    args = (cfg.p_value, cfg.min_effect, cfg.severe_effect)
    if kind == "categorical":
        test, stat, p, dist, drifted, severe, note = categorical_drift(ref, cur, *args)
    else:
        test, stat, p, dist, drifted, severe = numeric_drift(ref, cur, *args)
        note = ""
    return ColumnDrift(
        **base,
        test=test,
        statistic=stat,
        p_value=p,
        distance=dist,
        drifted=drifted,
        severe=severe,
        note=note,
    )


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _category_summary(values: list[Any]) -> str:
    if not values:
        return "-"
    from collections import Counter

    counts = Counter(_category_name(v) for v in values)
    return ", ".join(f"{k} {n / len(values):.0%}" for k, n in counts.most_common(3))


def _category_name(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# ----------------------------------------------------------------------------- analysis


def split_reference(reference_df: Any) -> tuple[Any, Any]:
    """(feature reference, prediction reference) from a bundle's reference table.

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
    return train, val


def current_frame(records: Iterable[dict[str, Any]]) -> Any:
    """Prediction-log records (predicted label in `label`) as the current DataFrame."""
    import pandas as pd

    frame = pd.DataFrame(list(records))
    if PREDICTED not in frame.columns and "label" in frame.columns:
        frame = frame.rename(columns={"label": PREDICTED})
    return frame


def analyze_drift(
    reference_df: Any, current_df: Any, cfg: DriftConfig | KndConfig, source: str = ""
) -> DriftResult:
    """Compare current rows (features, `predicted`, `confidence`) with the reference."""
    import pandas as pd

    cfg = cfg.drift if isinstance(cfg, KndConfig) else cfg
    _check_config(cfg)
    feature_ref, prediction_ref = split_reference(reference_df)
    current = current_df if current_df is not None else pd.DataFrame()
    if PREDICTED not in current.columns and "label" in current.columns:
        current = current.rename(columns={"label": PREDICTED})
    thresholds = {
        "min_samples": cfg.min_samples,
        "p_value": cfg.p_value,
        "min_effect": cfg.min_effect,
        "severe_effect": cfg.severe_effect,
        "max_drifted_share": cfg.max_drifted_share,
    }
    frames = {"reference": feature_ref, "prediction_reference": prediction_ref, "current": current}
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
        source=source,
        frames=frames,
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
            _compare(name, kind, column(feature_ref, name), column(current, name), cfg)
        )
    result.prediction = [
        _compare(
            PREDICTED,
            "categorical",
            column(prediction_ref, PREDICTED),
            column(current, PREDICTED),
            cfg,
        ),
        _compare(
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


def _check_config(cfg: DriftConfig) -> None:
    for name in ("p_value", "min_effect", "severe_effect", "max_drifted_share"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise DriftInputError(f"drift.{name} = {value}: must be between 0 and 1")
    if cfg.min_samples < 1:
        raise DriftInputError(f"drift.min_samples = {cfg.min_samples}: must be at least 1")


# ----------------------------------------------------------------------------- inputs


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


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


def read_log(sink: str | Path, since: str | datetime | None = None, last: int | None = None) -> Any:
    """The current frame from a prediction-log window (SQLite path or gs://bucket/prefix)."""
    from kndcli.monitoring.predlog import open_log

    text = str(sink)
    if not text.startswith("gs://") and not Path(text).is_file():
        raise DriftInputError(f"no prediction log at {text}: serve some requests or pass --log")
    if last is not None and last < 1:
        raise DriftInputError(f"--last {last}: must be at least 1")
    moment = since if isinstance(since, datetime) or since is None else parse_since(since)
    log = open_log(text, flush_s=0)
    try:
        return current_frame(log.read(since=moment, last=last))
    finally:
        log.close()


def score_audio(bundle: str | Path, folder: str | Path, workers: int = 0) -> tuple[Any, list[str]]:
    """Score a folder of audio with the bundle's model: (current frame, unreadable files)."""
    import pandas as pd

    from kndcli.audio import find_audio_files
    from kndcli.inference.predictor import Predictor

    folder = Path(folder)
    if not folder.is_dir():
        raise DriftInputError(f"--audio {folder}: not a directory")
    paths = find_audio_files([folder])
    if not paths:
        raise DriftInputError(f"--audio {folder}: no audio files found")
    predictor = Predictor.from_bundle(bundle)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for pred in predictor.predict_paths(paths, features=True, workers=workers):
        if not pred.ok or pred.features is None:
            errors.append(f"{pred.source}: {pred.error}")
            continue
        rows.append(
            {
                "filename": Path(pred.source).name,
                PREDICTED: pred.label,
                CONFIDENCE: pred.confidence,
                **pred.features,
            }
        )
    return pd.DataFrame(rows), errors


def bundle_reference(bundle: str | Path) -> Any:
    """The reference table stored in a bundle."""
    from kndcli.inference.bundle import REFERENCE_FILE, load_bundle
    from kndcli.monitoring.reference import load_reference

    loaded = load_bundle(bundle)
    path = loaded.path(REFERENCE_FILE)
    if not path.is_file():
        raise DriftInputError(f"{loaded.root}: bundle has no {REFERENCE_FILE} to compare with")
    return load_reference(path)


def run_drift(
    bundle: str | Path,
    cfg: KndConfig | DriftConfig,
    *,
    log: str | Path | None = None,
    audio: str | Path | None = None,
    since: str | datetime | None = None,
    last: int | None = None,
) -> DriftResult:
    """What `knd drift report|check` do: load reference and current data, then analyze."""
    if log is not None and audio is not None:
        raise DriftInputError("pass either --log or --audio, not both")
    reference = bundle_reference(bundle)
    errors: list[str] = []
    if audio is not None:
        if since is not None or last is not None:
            raise DriftInputError("--since and --last select a log window; not with --audio")
        current, errors = score_audio(bundle, audio)
        source = f"audio folder {audio}"
    else:
        sink = log if log is not None else _default_sink(cfg)
        current = read_log(sink, since=since, last=last)
        window = " ".join(
            part
            for part in (f"since {since}" if since else "", f"last {last}" if last else "")
            if part
        )
        source = f"prediction log {sink}" + (f" ({window})" if window else "")
    result = analyze_drift(reference, current, cfg, source=source)
    if errors:
        result.reason += f"; {len(errors)} unreadable file(s) skipped, first: {errors[0]}"
    return result


def _default_sink(cfg: KndConfig | DriftConfig) -> str:
    return cfg.serve.log_sink if isinstance(cfg, KndConfig) else "predictions.sqlite"


# ----------------------------------------------------------------------------- report

_REGISTER_LOCK = threading.Lock()


def _register_stattests(cfg: DriftConfig) -> tuple[str, str]:
    """Evidently stat tests that apply knd's rule, so the HTML flags what the summary flags."""
    from evidently.legacy.calculations.stattests.registry import (
        StatTest,
        _registered_stat_tests,
        register_stattest,
    )
    from evidently.legacy.core import ColumnType

    key = f"p{cfg.p_value:g}-s{cfg.severe_effect:g}"
    names = (f"knd-ks-{key}", f"knd-chi2-{key}")
    with _REGISTER_LOCK:
        if names[0] in _registered_stat_tests:
            return names

        def numeric(reference: Any, current: Any, feature_type: Any, threshold: float):
            _, stat, _, _, drifted, _ = numeric_drift(
                reference, current, cfg.p_value, threshold, cfg.severe_effect
            )
            return stat, drifted

        def categorical(reference: Any, current: Any, feature_type: Any, threshold: float):
            _, stat, _, _, drifted, _, _ = categorical_drift(
                reference, current, cfg.p_value, threshold, cfg.severe_effect
            )
            return stat, drifted

        register_stattest(
            StatTest(
                name=names[0],
                display_name=f"K-S statistic (p < {cfg.p_value:g})",
                allowed_feature_types=[ColumnType.Numerical],
                default_threshold=cfg.min_effect,
            ),
            numeric,
        )
        register_stattest(
            StatTest(
                name=names[1],
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

    ks_name, chi2_name = _register_stattests(cfg)
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
        for name in categorical:
            out[name] = out[name].map(
                lambda v: None if v is None or _is_nan(v) else _category_name(v)
            )
        for name in numerical:
            out[name] = pd.to_numeric(out[name], errors="coerce").astype("float64")
        return out

    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    reference = frame(result.frames["reference"], result.frames["prediction_reference"])
    current = frame(result.frames["current"], result.frames["current"])
    methods = {c: chi2_name if c in categorical else ks_name for c in columns}
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


def write_report(
    result: DriftResult,
    html_path: str | Path | None,
    json_path: str | Path | None,
    cfg: DriftConfig | KndConfig | None = None,
) -> dict[str, Path]:
    """Save the Evidently HTML report (self-contained) and the JSON summary beside it.

    When the verdict is cannot-judge there is nothing to plot: the HTML says why instead.
    """
    cfg = cfg.drift if isinstance(cfg, KndConfig) else cfg
    cfg = cfg or DriftConfig(**{k: v for k, v in result.thresholds.items()})
    written: dict[str, Path] = {}
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        written["json"] = json_path
    if html_path is not None:
        html_path = Path(html_path)
        html_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = html_path.with_name(html_path.name + ".tmp")
        tmp.write_text(report_html(result, cfg), encoding="utf-8")
        tmp.replace(html_path)
        written["html"] = html_path
    return written


def report_html(result: DriftResult, cfg: DriftConfig) -> str:
    """The report as one HTML string: knd's verdict on top, Evidently's report below."""
    banner = _banner(result)
    if result.verdict == CANNOT_JUDGE or not any(c.tested for c in result.columns):
        return (
            "<!DOCTYPE html><html lang='en'><head><meta charset='UTF-8'>"
            "<title>knd drift report</title></head><body>"
            f"{banner}</body></html>"
        )
    snapshot = evidently_snapshot(result, cfg)
    page = snapshot.get_html_str(as_iframe=False)
    return page.replace("<body>", "<body>" + banner, 1).replace(
        "<head>", "<head><title>knd drift report</title>", 1
    )


def _banner(result: DriftResult) -> str:
    import html

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


# ----------------------------------------------------------------------------- serving


@dataclass
class _CacheEntry:
    html: str = ""
    built: float = 0.0
    building: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


_CACHE: dict[tuple[str, str], _CacheEntry] = {}
_CACHE_LOCK = threading.Lock()


def cached_report_html(
    bundle: Any,
    log: Any,
    cfg: KndConfig | DriftConfig,
    max_age_s: float,
    *,
    since: str | None = "24h",
    last: int | None = None,
) -> str:
    """The latest report for `GET /monitoring`, rebuilt in the background when stale.

    The first call builds it (the caller waits); later calls answer from the cache at once
    and, when it is older than `max_age_s`, start one background rebuild. `bundle` is a
    path or a loaded Bundle; `log` a sink or an open PredictionLog.
    """
    from kndcli.inference.bundle import Bundle

    bundle_path = str(bundle.root if isinstance(bundle, Bundle) else bundle)
    sink = str(log.sink if hasattr(log, "read") else log)
    with _CACHE_LOCK:
        entry = _CACHE.setdefault((bundle_path, sink), _CacheEntry())
    if not entry.html:
        with entry.lock:
            if not entry.html:
                entry.html = _build_html(bundle_path, log, cfg, since, last)
                entry.built = time.monotonic()
        return entry.html
    if time.monotonic() - entry.built >= max_age_s:
        with entry.lock:
            start = not entry.building
            entry.building = True
        if start:

            def rebuild() -> None:
                try:
                    entry.html = _build_html(bundle_path, log, cfg, since, last)
                    entry.built = time.monotonic()
                finally:
                    entry.building = False

            threading.Thread(target=rebuild, name="knd-drift-report", daemon=True).start()
    return entry.html


def _build_html(
    bundle: str, log: Any, cfg: KndConfig | DriftConfig, since: str | None, last: int | None
) -> str:
    import html

    drift_cfg = cfg.drift if isinstance(cfg, KndConfig) else cfg
    try:
        reference = bundle_reference(bundle)
        if hasattr(log, "read"):
            current = current_frame(log.read(since=parse_since(since), last=last))
            source = f"prediction log {log.sink}"
        else:
            current = read_log(log, since=since, last=last)
            source = f"prediction log {log}"
        window = f" (since {since})" if since else ""
        result = analyze_drift(reference, current, drift_cfg, source=source + window)
        return report_html(result, drift_cfg)
    except KndError as exc:
        return (
            "<!DOCTYPE html><html lang='en'><head><meta charset='UTF-8'>"
            "<title>knd drift report</title></head><body><div id='knd-verdict'>"
            f"<h2>knd drift: cannot-judge</h2><p>{html.escape(str(exc))}</p></div></body></html>"
        )


def clear_report_cache() -> None:
    """Forget cached reports (tests; a redeployed bundle)."""
    with _CACHE_LOCK:
        _CACHE.clear()
