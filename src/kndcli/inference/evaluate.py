"""`knd evaluate`: score a bundle on a prepared split through the real inference path."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kndcli.audio import Audio
from kndcli.data.store import PreparedSet
from kndcli.errors import KndError, UsageError
from kndcli.inference.calibration import Reliability, coverage_curve, reliability, selective
from kndcli.inference.predictor import Prediction, Predictor


@dataclass
class Evaluation:
    split: str
    labels: list[str]
    n_clips: int
    accuracy: float
    macro_f1: float
    uar: float
    per_class: dict[str, dict[str, float]]
    per_speaker: dict[str, float]
    confusion: list[list[int]]
    ece: float = 0.0
    temperature: float = 1.0
    min_confidence: float = 0.0
    predictions: list[Prediction] = field(default_factory=list, repr=False)
    truths: list[str] = field(default_factory=list, repr=False)

    @property
    def confidences(self) -> list[float]:
        return [p.confidence for p in self.predictions]

    @property
    def correct(self) -> list[bool]:
        return [p.top_label == t for p, t in zip(self.predictions, self.truths, strict=True)]

    def reliability(self) -> Reliability:
        return reliability(self.confidences, self.correct)

    def coverage(self) -> list[dict[str, float]]:
        """Accuracy when answering only the most confident 100 %, 90 %, ... 10 % of clips."""
        curve = coverage_curve(self.confidences, self.correct)
        if not curve:
            return []
        points = []
        for share in np.linspace(1.0, 0.1, 10):
            k = max(1, int(round(share * len(curve)))) - 1
            points.append({key: round(value, 4) for key, value in curve[k].items()})
        return points

    def summary(self) -> dict[str, Any]:
        bins = self.reliability()
        return {
            "split": self.split,
            "n_clips": self.n_clips,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "uar": self.uar,
            "ece": self.ece,
            "per_class": self.per_class,
            "per_speaker": self.per_speaker,
            "labels": self.labels,
            "confusion": self.confusion,
            "calibration": {
                "temperature": self.temperature,
                "ece_if_calibrated": bins.calibrated_ece(),
                "bins": len(bins.count),
                "bin_confidence": bins.confidence,
                "bin_accuracy": bins.accuracy,
                "bin_count": bins.count,
            },
            "coverage": self.coverage(),
            "selective": selective(self.confidences, self.correct, self.min_confidence),
        }


def classification_metrics(
    truths: list[str], predicted: list[str], labels: list[str], speakers: list[str] | None = None
) -> dict[str, Any]:
    """Accuracy, macro-F1, UAR, per class and per speaker, and the confusion matrix."""
    index = {label: i for i, label in enumerate(labels)}
    n = len(labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(truths, predicted, strict=True):
        confusion[index[t], index[p]] += 1
    tp = np.diag(confusion).astype(float)
    support = confusion.sum(axis=1).astype(float)
    predicted_count = confusion.sum(axis=0).astype(float)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    precision = np.divide(tp, predicted_count, out=np.zeros(n), where=predicted_count > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0
    )
    present = support > 0
    per_speaker: dict[str, list[bool]] = defaultdict(list)
    for speaker, t, p in zip(speakers or [], truths, predicted, strict=False):
        per_speaker[speaker].append(t == p)
    return {
        "accuracy": float(tp.sum() / max(1, confusion.sum())),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "uar": float(recall[present].mean()) if present.any() else 0.0,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "per_speaker": {s: float(np.mean(v)) for s, v in sorted(per_speaker.items())},
        "confusion": confusion.tolist(),
    }


# (samples, prepared-set index, speaker) -> samples: how a perturbation enters evaluation.
Transform = Callable[[np.ndarray, int, str], np.ndarray]


def evaluate_predictor(
    predictor: Predictor,
    prepared: PreparedSet,
    split: str = "test",
    batch: int = 64,
    transform: Transform | None = None,
) -> Evaluation:
    """Score every clip of `split` from the prepared store, windowed as in production.

    `transform` degrades each clip before the Predictor sees it (the robustness report).
    Metrics use each clip's most probable class, whatever `min_confidence` answers;
    the selective figures say what the threshold does.
    """
    indices = split_indices(predictor, prepared, split)
    predictions: list[Prediction] = []
    for start in range(0, len(indices), batch):
        audios = [_audio(prepared, i, transform) for i in indices[start : start + batch]]
        predictions.extend(predictor.predict_audios(audios))
    truths = [prepared.rows[i]["label"] for i in indices]
    speakers = [prepared.rows[i]["speaker"] for i in indices]
    metrics = classification_metrics(
        truths, [p.top_label for p in predictions], predictor.labels, speakers
    )
    correct = [p.top_label == t for p, t in zip(predictions, truths, strict=True)]
    return Evaluation(
        split=split,
        labels=predictor.labels,
        n_clips=len(indices),
        ece=reliability([p.confidence for p in predictions], correct).ece,
        temperature=predictor.temperature,
        min_confidence=predictor.min_confidence,
        predictions=predictions,
        truths=truths,
        **metrics,
    )


def split_indices(predictor: Predictor, prepared: PreparedSet, split: str) -> list[int]:
    """The split's clips, refused when the bundle learned from them or cannot name them."""
    check_held_out(predictor.bundle.meta, prepared, split)
    indices = prepared.indices(split)
    if not indices:
        raise KndError(f"{prepared.root}: split '{split}' has no clips")
    unknown = {prepared.rows[i]["label"] for i in indices} - set(predictor.labels)
    if unknown:
        raise KndError(f"split '{split}' has labels the model does not know: {sorted(unknown)}")
    return indices


def check_held_out(meta: dict[str, Any], prepared: PreparedSet, split: str) -> None:
    """Refuse to report held-out figures on clips the bundle was trained on.

    A bundle refitted with `train.fit_splits` learned from its prepared set's val or test
    clips; scoring that split again would look like generalisation and be memory.
    """
    data = meta.get("data") or {}
    fitted = list(data.get("fit_splits", ["train"]))
    if split in fitted and is_recorded_set(meta, prepared):
        raise UsageError(
            f"bundle {meta.get('name', '')!r} was trained on the {split!r} split of "
            f"{prepared.root} (train.fit_splits={fitted}): its figures there are "
            "not held out; evaluate it on speakers it has not heard (--prepared DIR)"
        )


def is_recorded_set(meta: dict[str, Any], prepared: PreparedSet) -> bool:
    """Whether `prepared` is the set bundle.json says the model was trained on."""
    location = str((meta.get("data") or {}).get("prepared") or "")
    if "://" in location:
        return location.rstrip("/") == prepared.source.rstrip("/")
    return bool(location) and Path(location).resolve() == prepared.root.resolve()


def _audio(prepared: PreparedSet, index: int, transform: Transform | None = None) -> Audio:
    row = prepared.rows[index]
    samples = prepared.waveform(index)
    if transform is not None:
        samples = transform(samples, index, row["speaker"])
    return Audio(
        samples=samples,
        sample_rate=prepared.sample_rate,
        orig_sample_rate=int(row["orig_sample_rate"]),
        channels=int(row["channels"]),
        source=row["path"],
        peak=0.0,
        clipping_ratio=0.0,
    )


def save_evaluation(result: Evaluation, out_dir: Path) -> list[Path]:
    """Write `<split>_metrics.json`, the confusion matrix, reliability and coverage PNGs."""
    from kndcli.plots import plot_confusion, plot_coverage, plot_reliability

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{result.split}_metrics.json"
    json_path.write_text(json.dumps(result.summary(), indent=2))
    confusion = plot_confusion(
        np.array(result.confusion),
        result.labels,
        out_dir / f"{result.split}_confusion.png",
        title=f"{result.split}: accuracy {result.accuracy:.1%}, UAR {result.uar:.1%}",
    )
    bins = result.reliability()
    diagram = plot_reliability(
        bins,
        out_dir / f"{result.split}_reliability.png",
        title=f"{result.split}: ECE {bins.ece:.1%} (temperature {result.temperature:.2f})",
    )
    coverage = plot_coverage(
        coverage_curve(result.confidences, result.correct),
        out_dir / f"{result.split}_coverage.png",
        title=f"{result.split}: accuracy against coverage",
    )
    return [json_path, confusion, diagram, coverage]
