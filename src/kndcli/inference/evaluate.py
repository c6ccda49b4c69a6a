"""`knd evaluate`: score a bundle on a prepared split through the real inference path."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kndcli.audio import Audio
from kndcli.data.store import PreparedSet
from kndcli.errors import KndError
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
    predictions: list[Prediction] = field(default_factory=list, repr=False)
    truths: list[str] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "n_clips": self.n_clips,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "uar": self.uar,
            "per_class": self.per_class,
            "per_speaker": self.per_speaker,
            "labels": self.labels,
            "confusion": self.confusion,
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


def evaluate_predictor(
    predictor: Predictor, prepared: PreparedSet, split: str = "test", batch: int = 64
) -> Evaluation:
    """Score every clip of `split` from the prepared store, windowed as in production."""
    check_held_out(predictor.bundle.meta, prepared, split)
    indices = prepared.indices(split)
    if not indices:
        raise KndError(f"{prepared.root}: split '{split}' has no clips")
    unknown = {prepared.rows[i]["label"] for i in indices} - set(predictor.labels)
    if unknown:
        raise KndError(f"split '{split}' has labels the model does not know: {sorted(unknown)}")
    predictions: list[Prediction] = []
    for start in range(0, len(indices), batch):
        audios = [_audio(prepared, i) for i in indices[start : start + batch]]
        predictions.extend(predictor.predict_audios(audios))
    truths = [prepared.rows[i]["label"] for i in indices]
    speakers = [prepared.rows[i]["speaker"] for i in indices]
    metrics = classification_metrics(
        truths, [p.label for p in predictions], predictor.labels, speakers
    )
    return Evaluation(
        split=split,
        labels=predictor.labels,
        n_clips=len(indices),
        predictions=predictions,
        truths=truths,
        **metrics,
    )


def check_held_out(meta: dict[str, Any], prepared: PreparedSet, split: str) -> None:
    """Refuse to report held-out figures on clips the bundle was trained on.

    A bundle refitted with `train.fit_splits` learned from its prepared set's val or test
    clips; scoring that split again would look like generalisation and be memory.
    """
    data = meta.get("data") or {}
    fitted = [s for s in data.get("fit_splits", ["train"]) if s != "train"]
    same_set = data.get("prepared") and Path(data["prepared"]).resolve() == prepared.root.resolve()
    if split in fitted and same_set:
        raise KndError(
            f"bundle {meta.get('name', '')!r} was trained on the {split!r} split of "
            f"{prepared.root} (train.fit_splits={data['fit_splits']}): its figures there are "
            "not held out; evaluate it on speakers it has not heard (--data DIR)"
        )


def _audio(prepared: PreparedSet, index: int) -> Audio:
    row = prepared.rows[index]
    return Audio(
        samples=prepared.waveform(index),
        sample_rate=prepared.sample_rate,
        orig_sample_rate=int(row["orig_sample_rate"]),
        channels=int(row["channels"]),
        source=row["path"],
        peak=0.0,
        clipping_ratio=0.0,
    )


def save_evaluation(result: Evaluation, out_dir: Path) -> tuple[Path, Path]:
    """Write `<split>_metrics.json` and `<split>_confusion.png` into `out_dir`."""
    from kndcli.plots import plot_confusion

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{result.split}_metrics.json"
    json_path.write_text(json.dumps(result.summary(), indent=2))
    png_path = plot_confusion(
        np.array(result.confusion),
        result.labels,
        out_dir / f"{result.split}_confusion.png",
        title=f"{result.split}: accuracy {result.accuracy:.1%}, UAR {result.uar:.1%}",
    )
    return json_path, png_path
