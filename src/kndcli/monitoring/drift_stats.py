"""Per-column drift statistics: one two-sample test and effect size per column.

Every feature gets a test and an effect size on the same 0..1 scale, so one threshold
means the same thing for every feature and every sample size:

- numeric features: Kolmogorov-Smirnov; the statistic is the largest gap between the two
  empirical CDFs. A feature that is constant in the reference (clipping ratio 0 in clean
  speech) uses the share of current values outside the reference value instead, which is
  what the KS statistic reduces to there, never a NaN.
- categorical features (original sample rate, channel count, predicted label): chi-square
  on the contingency table; the statistic is the total variation distance, so a sample
  rate or label never seen in the reference counts fully.

A column has drifted when the test is significant (`p_value`) AND the statistic reaches
`min_effect`: with thousands of logged requests every tiny difference is significant,
and different speakers alone move loudness and duration a little.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kndcli.config import DriftConfig


@dataclass(frozen=True)
class StatResult:
    """One two-sample test's outcome, shared by the summary and the Evidently stat tests."""

    test: str
    statistic: float
    p_value: float
    # Numeric: Wasserstein distance in reference std (None for a constant reference);
    # categorical: PSI.
    distance: float | None
    drifted: bool
    severe: bool
    note: str = ""


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


def numeric_drift(
    reference: Any, current: Any, p_value: float, min_effect: float, severe_effect: float
) -> StatResult:
    """KS test, or the share outside a constant reference, plus the Wasserstein distance."""
    from scipy.stats import ks_2samp, wasserstein_distance

    ref, cur = finite(reference), finite(current)
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
    return StatResult(
        test=test,
        statistic=statistic,
        p_value=p,
        distance=distance,
        drifted=drifted,
        severe=drifted and statistic >= severe_effect,
    )


def categorical_drift(
    reference: Any, current: Any, p_value: float, min_effect: float, severe_effect: float
) -> StatResult:
    """Total variation distance with the chi-square p, PSI, and a note on unseen categories."""
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
    return StatResult(
        test="chi-square",
        statistic=statistic,
        p_value=p,
        distance=psi,
        drifted=drifted,
        severe=drifted and statistic >= severe_effect,
        note=note,
    )


def compare_column(
    column: str, kind: str, reference: Any, current: Any, cfg: DriftConfig
) -> ColumnDrift:
    """Test one column (`numeric` or `categorical`), or say why it cannot be tested."""
    if kind == "categorical":
        ref = [v for v in reference if v is not None and not is_nan(v)]
        cur = [v for v in current if v is not None and not is_nan(v)]
        ref_text = _category_summary(ref)
        cur_text = _category_summary(cur)
    else:
        ref, cur = finite(reference), finite(current)
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
    test = categorical_drift if kind == "categorical" else numeric_drift
    outcome = test(ref, cur, cfg.p_value, cfg.min_effect, cfg.severe_effect)
    return ColumnDrift(**base, **asdict(outcome))


def finite(values: Any) -> np.ndarray:
    """The finite values as float64: NaN and inf are missing, not extreme."""
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]


def is_nan(value: Any) -> bool:
    """A float NaN: pandas' missing value in a categorical column."""
    return isinstance(value, float) and math.isnan(value)


def category_name(value: Any) -> str:
    """A category as text; 16000.0 (a float column in pandas) reads as 16000."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _summary(values: np.ndarray) -> str:
    if len(values) == 0:
        return "-"
    if np.ptp(values) == 0:
        return f"= {values[0]:.4g}"
    return (
        f"{np.median(values):.4g} [{np.percentile(values, 5):.3g}, {np.percentile(values, 95):.3g}]"
    )


def _category_summary(values: list[Any]) -> str:
    if not values:
        return "-"
    counts = Counter(category_name(v) for v in values)
    return ", ".join(f"{k} {n / len(values):.0%}" for k, n in counts.most_common(3))
