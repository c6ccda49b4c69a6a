"""The robustness report: one bundle, one split, scored clean and under every condition.

Each condition degrades every clip of the split (the whole clip, before the Predictor
trims and windows it, as a real recording would arrive) and runs the same evaluation as
`knd evaluate`. Draws depend only on the seed, the clip and the condition, so the same
bundle, data and seed give the same table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kndcli.audio import speech_bounds
from kndcli.config import RobustnessConfig
from kndcli.data.store import PreparedSet
from kndcli.inference.evaluate import Evaluation, evaluate_predictor, split_indices
from kndcli.inference.predictor import Predictor
from kndcli.perturb import BabbleSource
from kndcli.perturb.suite import FAMILIES, Condition, ConditionRenderer, robustness_suite


@dataclass
class RobustnessReport:
    split: str
    seed: int
    n_clips: int
    rows: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        reference = [r for r in self.rows if r["reference"]]
        return {
            "split": self.split,
            "seed": self.seed,
            "n_clips": self.n_clips,
            "conditions": self.rows,
            "worst_reference_drop": max((r["drop"] for r in reference), default=0.0),
            "worst_ece": max((r["ece"] for r in self.rows), default=0.0),
            "skipped": self.skipped,
        }


def robustness_report(
    predictor: Predictor,
    prepared: PreparedSet,
    split: str,
    cfg: RobustnessConfig,
    progress: Any = None,
) -> RobustnessReport:
    """Evaluate clean and under each configured condition; `progress(name)` per condition."""
    indices = split_indices(predictor, prepared, split)
    scored = {prepared.rows[i]["speaker"] for i in indices}
    others = [i for i, row in enumerate(prepared.rows) if row["speaker"] not in scored]
    babble = babble_source(prepared, others)
    render = ConditionRenderer(cfg, prepared.sample_rate, babble)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    clean: Evaluation | None = None
    for condition in robustness_suite(cfg):
        reason = skip_reason(condition, prepared.sample_rate, babble, split)
        if reason is not None:
            skipped.append(reason)
            continue
        if progress is not None:
            progress(condition.name)
        result = evaluate_predictor(
            predictor, prepared, split, transform=_transform(render, condition, cfg.seed)
        )
        clean = clean or result
        rows.append(_row(condition, result, clean))
    return RobustnessReport(split, cfg.seed, len(indices), rows, skipped)


def skip_reason(
    condition: Condition, sample_rate: int, babble: BabbleSource | None, split: str
) -> str | None:
    """Why `condition` cannot be scored on these clips, or None when it can: babble needs
    other speakers, and a low-pass at or above the Nyquist frequency changes nothing."""
    if condition.family == "babble" and babble is None:
        return f"{condition.name}: no clips of speakers outside split '{split}'"
    nyquist = sample_rate / 2
    if condition.family == "lowpass" and float(condition.level) >= nyquist:
        return (
            f"{condition.name}: the {sample_rate} Hz clips hold nothing above "
            f"{nyquist:g} Hz, so it would change nothing"
        )
    return None


def _transform(render: ConditionRenderer, condition: Condition, seed: int):
    def apply(samples: np.ndarray, index: int, speaker: str) -> np.ndarray:
        return render(samples, condition, condition.rng(seed, index), speaker)

    return apply


def _row(condition: Condition, result: Evaluation, clean: Evaluation) -> dict[str, Any]:
    bins = result.reliability()
    return {
        "condition": condition.name,
        "family": condition.family,
        "level": condition.level,
        "unit": FAMILIES[condition.family][1] if condition.family in FAMILIES else "",
        "reference": condition.is_reference,
        "accuracy": result.accuracy,
        "macro_f1": result.macro_f1,
        "uar": result.uar,
        "ece": result.ece,
        "ece_if_calibrated": bins.calibrated_ece(),
        "drop": clean.accuracy - result.accuracy,
        # Per-bin sums, so ECE can be pooled exactly over folds or runs.
        "bins": {
            "count": bins.count,
            "confidence": bins.confidence,
            "accuracy": bins.accuracy,
        },
    }


def babble_source(
    prepared: PreparedSet, pool: list[int], min_speakers: int = 1
) -> BabbleSource | None:
    """Babble voices from these clips of the prepared set (silence trimmed), if enough talk.

    Training draws on its own speakers (two at least: a clip's babble never holds its
    own voice); the robustness report on the speakers it does not score.
    """
    speakers = [prepared.rows[i]["speaker"] for i in pool]
    if len(set(speakers)) < min_speakers:
        return None

    def clip(k: int) -> np.ndarray:
        x = prepared.waveform(pool[k])
        start, stop = speech_bounds(x, prepared.sample_rate)
        return x[start:stop]

    return BabbleSource(clip, speakers)


def save_report(report: RobustnessReport, out_dir: Path, title: str = "") -> list[Path]:
    """robustness.json and robustness.png (accuracy against level per family)."""
    from kndcli.plots import plot_robustness

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "robustness.json"
    json_path.write_text(json.dumps(report.summary(), indent=2))
    png = plot_robustness(report.rows, out_dir / "robustness.png", title=title)
    return [json_path, png]
