"""Re-score a trained bundle under the robustness suite with two silence trims.

The bundle's own trim (the Predictor's: the one the bundle was trained with) and the
WebRTC-VAD trim (`inference.speech.vad_bounds`, what `train.trim_method=vad` trains with)
are applied to the same rendered clips of a prepared set's test split, so the two columns
differ by the trim alone. The suite is the default `robustness:` section, and conditions
the report would skip are skipped the same way. docs/quality.md ("Noisy clips keep their
silence", 2026-12-07) reports what it measured; `--families reverb --trims bundle`
re-scores only the reverberant rows, as that section's room comparison did.

    uv run python -m bench.rescore_trim RUN_DIR PREPARED_DIR OUT.json [--families ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from kndcli.config import RobustnessConfig
from kndcli.data.store import PreparedSet
from kndcli.inference.calibration import clip_probabilities, reliability
from kndcli.inference.evaluate import split_indices
from kndcli.inference.predictor import Predictor
from kndcli.inference.robustness import babble_source, skip_reason
from kndcli.inference.speech import trim_bounds
from kndcli.inference.windowing import make_windows
from kndcli.perturb.suite import ConditionRenderer, robustness_suite


def _windows(predictor: Predictor, trim: str, samples: np.ndarray) -> np.ndarray:
    if trim == "bundle":
        return predictor.prepare(samples)[0]
    start, stop = trim_bounds(samples, predictor.sample_rate, "vad")
    return make_windows(samples[start:stop], predictor.window, predictor.hop)[0]


TRIMS = ("bundle", "vad")


def rescore(bundle: str, prepared_dir: str, families: list[str], trims: list[str]) -> list[dict]:
    predictor = Predictor.from_config(bundle)
    prepared = PreparedSet.open(prepared_dir)
    rate = prepared.sample_rate
    indices = split_indices(predictor, prepared, "test")
    scored = {prepared.rows[i]["speaker"] for i in indices}
    others = [i for i, row in enumerate(prepared.rows) if row["speaker"] not in scored]
    cfg = RobustnessConfig()
    babble = babble_source(prepared, others)
    render = ConditionRenderer(cfg, rate, babble)
    label_index = {label: i for i, label in enumerate(predictor.labels)}
    truths = np.array([label_index[prepared.rows[i]["label"]] for i in indices])
    rows = []
    for condition in robustness_suite(cfg):
        if families and condition.family not in families:
            continue
        reason = skip_reason(condition, rate, babble, "test")
        if reason is not None:
            print(f"skipped {reason}", flush=True)
            continue
        clips = [
            render(
                prepared.waveform(i),
                condition,
                condition.rng(cfg.seed, i),
                prepared.rows[i]["speaker"],
            )
            for i in indices
        ]
        row: dict = {"condition": condition.name}
        for name in trims:
            windows = [_windows(predictor, name, x) for x in clips]
            probs = predictor.score_batches(windows)
            clip = clip_probabilities(probs, predictor.temperature)
            correct = clip.argmax(axis=1) == truths
            row[name] = {
                "accuracy": float(correct.mean()),
                "ece": float(reliability(clip.max(axis=1), correct).ece),
                "windows_per_clip": float(np.mean([len(w) for w in windows])),
            }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("prepared")
    parser.add_argument("out", type=Path)
    parser.add_argument("--families", nargs="*", default=[], help="default: every family")
    parser.add_argument("--trims", nargs="*", default=list(TRIMS), choices=TRIMS)
    args = parser.parse_args()
    rows = rescore(args.bundle, args.prepared, args.families, args.trims)
    args.out.write_text(json.dumps({"bundle": args.bundle, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
