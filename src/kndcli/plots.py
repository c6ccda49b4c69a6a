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


def plot_reliability(bins, path: Path, title: str = "") -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with counts."""
    plt = _pyplot()
    edges = np.array(bins.edges)
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    counts = np.array(bins.count)
    filled = counts > 0
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    ax.bar(
        centres[filled],
        np.array(bins.accuracy)[filled],
        width=width * 0.9,
        color="tab:blue",
        alpha=0.8,
        label="accuracy",
    )
    ax.plot(
        np.array(bins.confidence)[filled],
        np.array(bins.accuracy)[filled],
        "o",
        color="tab:red",
        label="mean confidence",
    )
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(title)
    hist.bar(centres, counts, width=width * 0.9, color="tab:grey")
    hist.set_xlabel("confidence")
    hist.set_ylabel("clips")
    hist.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_coverage(curve: list[dict[str, float]], path: Path, title: str = "") -> Path:
    """Accuracy on the clips answered against the share answered (most confident first)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if curve:
        ax.plot([c["coverage"] for c in curve], [c["accuracy"] for c in curve], color="tab:blue")
        for share in (0.5, 0.8):
            point = min(curve, key=lambda c: abs(c["coverage"] - share))
            ax.annotate(
                f"conf ≥ {point['threshold']:.2f}: {point['accuracy']:.0%}",
                (point["coverage"], point["accuracy"]),
                textcoords="offset points",
                xytext=(5, 8),
                fontsize=8,
            )
    ax.set_xlabel("coverage (share of clips answered)")
    ax.set_ylabel("accuracy on answered clips")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_robustness(rows: list[dict], path: Path, title: str = "") -> Path:
    """Accuracy against each condition's level, one panel per family, clean as a line."""
    plt = _pyplot()
    clean = next((r["accuracy"] for r in rows if r["family"] == "clean"), None)
    families: dict[str, list[dict]] = {}
    for row in rows:
        if row["family"] != "clean":
            families.setdefault(row["family"], []).append(row)
    n = max(1, len(families))
    cols = min(4, n)
    lines = -(-n // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(3.6 * cols, 3.0 * lines), squeeze=False)
    for ax, (family, members) in zip(axes.flat, families.items(), strict=False):
        levels = [m["level"] for m in members]
        accuracy = [100 * m["accuracy"] for m in members]
        if all(isinstance(v, (int, float)) for v in levels):
            order = np.argsort(levels)
            ax.plot(np.array(levels)[order], np.array(accuracy)[order], "o-", color="tab:blue")
        else:
            ax.bar([str(v) for v in levels], accuracy, color="tab:blue")
        if clean is not None:
            ax.axhline(100 * clean, color="grey", linestyle="--", label="clean")
        ax.set_title(family)
        ax.set_xlabel(members[0].get("unit") or "")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(families) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_timeline(timeline, path: Path) -> Path:
    """A recording's emotion probabilities over time (one line per label, drawn inside
    speech spans only) above a band of the speech segments coloured by answer."""
    plt = _pyplot()
    labels = timeline.labels
    colours = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    colours["uncertain"] = (0.6, 0.6, 0.6, 1.0)
    width = min(40.0, 8.0 + timeline.duration / 120.0)
    fig, (ax, band) = plt.subplots(
        2, 1, figsize=(width, 4.5), sharex=True, gridspec_kw={"height_ratios": [4, 1]}
    )
    for label in labels:
        xs: list[float] = []
        ys: list[float] = []
        for span in timeline.spans:
            if xs and span.start > xs[-1] + 1e-6:  # a pause: break the line
                xs.append(np.nan)
                ys.append(np.nan)
            xs += [span.start, span.end]
            ys += [span.probabilities[label]] * 2
        ax.plot(xs, ys, color=colours[label], label=label, linewidth=1.2)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("probability")
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    ax.set_title(f"{Path(timeline.source).name}: {timeline.label or 'no speech'}")
    for start, end in timeline.speech:
        band.axvspan(start, end, ymin=0.55, ymax=1.0, color="0.85")
    for span in timeline.spans:
        band.axvspan(span.start, span.end, ymin=0.0, ymax=0.45, color=colours[span.label])
    band.set_yticks([0.25, 0.75], ["answer", "speech"])
    band.set_xlim(0, max(timeline.duration, 1e-3))
    band.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
