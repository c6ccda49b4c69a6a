"""After training: fit the bundle's temperature on speakers the model did not learn from.

Two sources of such speakers: the validation split (`fit_calibration`, through the
exported bundle), or, with `train.cross_fit_speakers`, each ensemble member's own
left-out training speakers (`fit_member_calibration`, through the members' own outputs).
Either way the temperature goes into the bundle and the Predictor applies it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kndcli.config import KndConfig
from kndcli.data.store import PreparedSet
from kndcli.inference.calibration import (
    clip_probabilities,
    fit_temperature,
    negative_log_likelihood,
    reliability,
)
from kndcli.inference.predictor import Predictor
from kndcli.training.data import training_conditions


def calibration_clips(
    prepared: PreparedSet, indices: list[int], cfg: KndConfig
) -> Iterator[tuple[int, str, np.ndarray]]:
    """(index, copy, waveform) for every clip, clean and once degraded.

    The degraded copy is drawn from the training conditions (its own seed), so the
    temperature is right for the audio the model will meet, not only for studio clips:
    a model tuned on clean speech alone stays over-confident on noisy calls.
    """
    chain = training_conditions(prepared, cfg.train)
    copies = ("clean", "degraded") if chain is not None else ("clean",)
    for index in indices:
        clean = prepared.waveform(index)
        for copy in copies:
            x = clean
            if copy == "degraded":
                rng = np.random.default_rng((cfg.train.seed, index, 7919))
                x = chain(clean, rng, prepared.rows[index]["speaker"])
            yield index, copy, x


def _record(
    probs: list[np.ndarray], truths: list[int], temperature: float, fitted_on: dict[str, Any]
) -> dict[str, Any]:
    """NLL and ECE before and after the temperature, on the clips it was fitted on."""
    y = np.asarray(truths)

    def measured(t: float) -> dict[str, float]:
        clip = clip_probabilities(probs, t)
        correct = clip.argmax(axis=1) == y
        return {
            "nll": negative_log_likelihood(clip, y),
            "ece": reliability(clip.max(axis=1), correct).ece,
        }

    return {"fitted_on": fitted_on, "before": measured(1.0), "after": measured(temperature)}


def fit_calibration(predictor: Predictor, prepared: PreparedSet, cfg: KndConfig) -> dict[str, Any]:
    """A temperature fitted on every validation clip, clean and once degraded, through
    the exported bundle; the Predictor applies it to the ensemble's probabilities."""
    indices = prepared.indices("val")
    label_index = {label: i for i, label in enumerate(predictor.labels)}
    windows, truths, copies = [], [], set()
    for index, copy, x in calibration_clips(prepared, indices, cfg):
        windows.append(predictor.prepare(x)[0])
        truths.append(label_index[prepared.rows[index]["label"]])
        copies.add(copy)
    probs = predictor.score_batches(windows)
    temperature = fit_temperature(probs, truths)
    fitted_on = {
        "split": "val",
        "speakers": sorted({prepared.rows[i]["speaker"] for i in indices}),
        "clips": len(indices),
        "copies": sorted(copies),
    }
    return {
        "method": "temperature",
        "temperature": temperature,
        **_record(probs, truths, temperature, fitted_on),
    }


def fit_member_calibration(
    model: torch.nn.Module,
    predictor: Predictor,
    prepared: PreparedSet,
    cfg: KndConfig,
    holdouts: list[list[str]],
) -> dict[str, Any]:
    """Cross-fitted temperature scaling: one temperature for the ensemble's output.

    Each member scores only its own left-out speakers' clips (clean and once degraded),
    cut into the Predictor's windows, and one temperature is fitted on all of
    them. The Predictor applies it to the ensemble's output, as it applies a temperature
    fitted on validation speakers; with `model.ensemble_mean=log` that is exactly the
    temperature applied to every member, the thing it was fitted on (docs/quality.md).
    """
    label_index = {label: i for i, label in enumerate(predictor.labels)}
    member_of = {speaker: m for m, held in enumerate(holdouts) for speaker in held}
    indices = [i for i in prepared.indices("train") if prepared.rows[i]["speaker"] in member_of]
    probs, truths, copies = [], [], set()
    with torch.inference_mode():
        for index, copy, x in calibration_clips(prepared, indices, cfg):
            windows = predictor.prepare(x)[0]
            member = member_of[prepared.rows[index]["speaker"]]
            logits = model.member_logits(torch.from_numpy(windows))[member]
            probs.append(torch.softmax(logits.float(), dim=-1).numpy())
            truths.append(label_index[prepared.rows[index]["label"]])
            copies.add(copy)
    temperature = fit_temperature(probs, truths)
    fitted_on = {
        "split": "train (each member's left-out speakers)",
        "speakers": sorted(member_of),
        "members": holdouts,
        "clips": len(indices),
        "copies": sorted(copies),
    }
    return {
        "method": "temperature, cross-fitted over ensemble members",
        "temperature": temperature,
        **_record(probs, truths, temperature, fitted_on),
    }
