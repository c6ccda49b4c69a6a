"""After export: fit the bundle's temperature on the validation speakers."""

from __future__ import annotations

from typing import Any

import numpy as np

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


def fit_calibration(predictor: Predictor, prepared: PreparedSet, cfg: KndConfig) -> dict[str, Any]:
    """A temperature fitted on every validation clip, clean and once degraded.

    The degraded copy is drawn from the training conditions (its own seed), so the
    temperature is right for the audio the model will meet, not only for studio clips:
    a model tuned on clean speech alone stays over-confident on noisy calls.
    """
    indices = prepared.indices("val")
    chain = training_conditions(prepared, cfg.train)
    windows: list[np.ndarray] = []
    truths: list[int] = []
    label_index = {label: i for i, label in enumerate(predictor.labels)}
    copies = ("clean", "degraded") if chain is not None else ("clean",)
    for index in indices:
        row = prepared.rows[index]
        clean = prepared.waveform(index)
        for copy in copies:
            x = clean
            if copy == "degraded":
                rng = np.random.default_rng((cfg.train.seed, index, 7919))
                x = chain(clean, rng, row["speaker"])
            windows.append(predictor.prepare(x)[0])
            truths.append(label_index[row["label"]])
    probs = predictor.score_batches(windows)
    temperature = fit_temperature(probs, truths)
    y = np.asarray(truths)

    def measured(t: float) -> dict[str, float]:
        clip = clip_probabilities(probs, t)
        correct = clip.argmax(axis=1) == y
        return {
            "nll": negative_log_likelihood(clip, y),
            "ece": reliability(clip.max(axis=1), correct).ece,
        }

    return {
        "method": "temperature",
        "temperature": temperature,
        "fitted_on": {
            "split": "val",
            "speakers": sorted({prepared.rows[i]["speaker"] for i in indices}),
            "clips": len(indices),
            "copies": list(copies),
        },
        "before": measured(1.0),
        "after": measured(temperature),
    }
