"""PNG figures written next to runs and evaluations (matplotlib, headless)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion: np.ndarray, labels: list[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix with counts in each cell."""
    plt = _pyplot()
    rows = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(
                j,
                i,
                str(int(confusion[i, j])),
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(metrics_csv: Path, path: Path) -> Path | None:
    """Loss and validation accuracy/UAR per epoch from Lightning's CSV log."""
    if not metrics_csv.is_file():
        return None
    with metrics_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        if not row.get("epoch"):
            continue
        epoch = int(float(row["epoch"]))
        for key in ("train/loss", "val/loss", "train/acc", "val/acc", "val/uar"):
            if row.get(key):
                series.setdefault(key, {})[epoch] = float(row[key])
    if not series:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train/loss", "val/loss"):
        if key in series:
            left.plot(list(series[key]), list(series[key].values()), label=key)
    for key in ("train/acc", "val/acc", "val/uar"):
        if key in series:
            right.plot(list(series[key]), list(series[key].values()), label=key)
    left.set_xlabel("epoch")
    right.set_xlabel("epoch")
    left.legend()
    right.legend()
    right.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
