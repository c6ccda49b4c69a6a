"""Confidence you can act on: temperature scaling, calibration error, coverage.

A temperature T turns the model's probabilities p into p^(1/T), renormalised: exactly
softmax(logits / T), since the ONNX graph's output is a softmax. T > 1 softens an
over-confident model. It is fitted on speakers the model did not learn from (Guo et al.,
2017) and applied by the Predictor to every window, so predict, serve and evaluate
report the same confidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
_FLOOR = 1e-12


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rows of probabilities recomputed as softmax(log p / T)."""
    if temperature == 1.0:
        return probs
    logits = np.log(np.maximum(probs, _FLOOR)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=-1, keepdims=True)).astype(probs.dtype, copy=False)


def clip_probabilities(window_probs: Sequence[np.ndarray], temperature: float) -> np.ndarray:
    """(clips, classes): each clip's calibrated windows averaged, as the Predictor does."""
    return np.stack([apply_temperature(w, temperature).mean(axis=0) for w in window_probs])


def negative_log_likelihood(probs: np.ndarray, truths: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(truths)), truths], _FLOOR))))


def fit_temperature(window_probs: Sequence[np.ndarray], truths: Sequence[int]) -> float:
    """The temperature with the lowest NLL of the clips' averaged calibrated windows.

    One parameter, so a grid over log T and a golden-section refinement find the optimum
    without an optimiser library; the range 0.05-20 covers any plausible model.
    """
    y = np.asarray(truths)

    def nll(log_t: float) -> float:
        return negative_log_likelihood(clip_probabilities(window_probs, float(np.exp(log_t))), y)

    grid = np.linspace(np.log(0.05), np.log(20.0), 61)
    best = int(np.argmin([nll(g) for g in grid]))
    lo, hi = grid[max(0, best - 1)], grid[min(len(grid) - 1, best + 1)]
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


@dataclass
class Reliability:
    """Per confidence bin: mean confidence, accuracy and clip count (a reliability diagram)."""

    edges: list[float]
    confidence: list[float]
    accuracy: list[float]
    count: list[int]

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted gap between accuracy and confidence."""
        total = sum(self.count)
        if not total:
            return 0.0
        return float(
            sum(
                n * abs(a - c)
                for n, a, c in zip(self.count, self.accuracy, self.confidence, strict=True)
            )
            / total
        )

    def calibrated_ece(self) -> float:
        """The ECE a perfectly calibrated model would show with these bins on average.

        With few clips per bin, accuracy scatters around confidence by chance, so even an
        exact calibrator measures an ECE above zero (about 3.7 % on 960 clips at 60 %
        accuracy). Each bin's hits are Binomial(count, confidence); the expectation of
        |hits / count - confidence| is summed exactly over the binomial distribution.
        """
        total = sum(self.count)
        bins = zip(self.count, self.confidence, strict=True)
        expected = sum(n * _expected_gap(n, c) for n, c in bins if n)
        return expected / total if total else 0.0


def _expected_gap(n: int, p: float) -> float:
    """E|k/n - p| for k ~ Binomial(n, p); the probabilities in log space so large n does
    not overflow."""
    k = np.arange(n + 1)
    q = min(max(p, _FLOOR), 1 - _FLOOR)
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])
    log_choose = log_factorial[n] - log_factorial[k] - log_factorial[n - k]
    pmf = np.exp(log_choose + k * np.log(q) + (n - k) * np.log1p(-q))
    return float(np.dot(pmf, np.abs(k / n - p)))


def reliability(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS
) -> Reliability:
    """Equal-width confidence bins over [0, 1], as ECE is usually quoted (15 bins)."""
    conf = np.asarray(confidences, np.float64)
    hit = np.asarray(correct, np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out = Reliability(edges.tolist(), [], [], [])
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        out.count.append(n)
        out.confidence.append(float(conf[mask].mean()) if n else 0.0)
        out.accuracy.append(float(hit[mask].mean()) if n else 0.0)
    return out


def coverage_curve(confidences: Sequence[float], correct: Sequence[bool]) -> list[dict[str, float]]:
    """Accuracy on the clips answered, for every confidence threshold that changes it.

    Row k answers the k most confident clips: `coverage` is the share answered,
    `threshold` the lowest confidence among them.
    """
    conf = np.asarray(confidences, np.float64)
    hit = np.asarray(correct, np.float64)
    order = np.argsort(-conf, kind="stable")
    answered = np.arange(1, len(conf) + 1)
    accuracy = np.cumsum(hit[order]) / answered
    return [
        {
            "threshold": float(conf[order][k]),
            "coverage": float(answered[k] / len(conf)),
            "accuracy": float(accuracy[k]),
        }
        for k in range(len(conf))
    ]


def selective(
    confidences: Sequence[float], correct: Sequence[bool], threshold: float
) -> dict[str, float]:
    """Coverage and accuracy when clips below `threshold` are answered 'uncertain'."""
    conf = np.asarray(confidences, np.float64)
    hit = np.asarray(correct, bool)
    keep = conf >= threshold
    return {
        "threshold": float(threshold),
        "coverage": float(keep.mean()) if len(conf) else 0.0,
        "accuracy": float(hit[keep].mean()) if keep.any() else 0.0,
    }
