"""Temperature scaling, calibration error and coverage, and how the Predictor applies them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kndcli.config import InferenceConfig
from kndcli.inference.bundle import BUNDLE_JSON, load_bundle, update_bundle
from kndcli.inference.calibration import (
    apply_temperature,
    coverage_curve,
    fit_temperature,
    reliability,
    selective,
)
from kndcli.inference.predictor import UNCERTAIN, Predictor


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_temperature_on_probabilities_equals_softmax_of_scaled_logits():
    logits = np.random.default_rng(0).normal(size=(5, 8)) * 3
    np.testing.assert_allclose(
        apply_temperature(softmax(logits), 2.5), softmax(logits / 2.5), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_fit_recovers_the_temperature_that_generated_the_labels(true_temperature):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4000, 8)) * 2
    # Labels drawn from softmax(logits / T): the model's softmax(logits) is off by T.
    truth_probs = softmax(logits / true_temperature)
    truths = [int(rng.choice(8, p=p)) for p in truth_probs]
    windows = [softmax(z)[None] for z in logits]
    assert fit_temperature(windows, truths) == pytest.approx(true_temperature, rel=0.1)


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_not():
    rng = np.random.default_rng(2)
    confidence = rng.uniform(0.2, 1.0, 20000)
    calibrated = rng.uniform(size=confidence.size) < confidence
    assert reliability(confidence, calibrated).ece < 0.02
    overconfident = rng.uniform(size=confidence.size) < confidence - 0.2
    assert reliability(confidence, overconfident).ece == pytest.approx(0.2, abs=0.02)


def test_calibrated_ece_is_what_a_calibrated_model_measures_at_that_clip_count():
    """A calibrated model's ECE on 960 clips scatters around calibrated_ece(), not zero,
    and shrinks with more clips; a miscalibrated model's stands far above it."""
    rng = np.random.default_rng(3)
    confidence = rng.uniform(0.3, 0.9, 960)
    measured = [reliability(confidence, rng.uniform(size=960) < confidence).ece for _ in range(300)]
    floor = reliability(confidence, confidence > 0.5).calibrated_ece()
    assert 0.025 < floor < 0.05
    assert np.mean(measured) == pytest.approx(floor, rel=0.1)
    many = rng.uniform(0.3, 0.9, 96000)
    assert reliability(many, many > 0.5).calibrated_ece() < floor / 5
    overconfident = rng.uniform(size=960) < confidence - 0.15
    assert reliability(confidence, overconfident).ece > 2 * floor


def test_coverage_curve_answers_the_most_confident_first():
    confidence = [0.9, 0.2, 0.8, 0.4]
    correct = [True, False, True, False]
    curve = coverage_curve(confidence, correct)
    assert [c["coverage"] for c in curve] == [0.25, 0.5, 0.75, 1.0]
    assert [c["accuracy"] for c in curve] == [1.0, 1.0, pytest.approx(2 / 3), 0.5]
    assert selective(confidence, correct, 0.5) == {
        "threshold": 0.5,
        "coverage": 0.5,
        "accuracy": 1.0,
    }


@pytest.fixture
def calibrated_bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    root = tmp_path / "calibrated"
    shutil.copytree(tiny_bundle, root)
    update_bundle(root, {"calibration": {"method": "temperature", "temperature": 0.25}})
    return root


def test_predictor_applies_the_bundle_temperature(tiny_bundle, calibrated_bundle, wav_factory):
    clip = wav_factory("a.wav", seconds=2.5, freq=180)
    raw = next(Predictor.from_config(tiny_bundle).predict_paths([clip]))
    sharp = next(Predictor.from_config(calibrated_bundle).predict_paths([clip]))
    labels = list(raw.probabilities)
    expected = apply_temperature(np.array([[raw.probabilities[k] for k in labels]]), 0.25)[0]
    got = np.array([sharp.probabilities[k] for k in labels])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert sharp.label == raw.label and sharp.confidence > raw.confidence


def test_below_min_confidence_the_answer_is_uncertain(tiny_bundle, wav_factory):
    clip = wav_factory("b.wav", seconds=5.0, freq=240)
    bundle = load_bundle(tiny_bundle)
    sure = Predictor(bundle, min_confidence=0.0).predict_paths([clip], timeline=True)
    unsure = Predictor(bundle, min_confidence=0.99).predict_paths([clip], timeline=True)
    sure, unsure = next(sure), next(unsure)
    assert sure.label in bundle.labels
    assert unsure.label == UNCERTAIN and unsure.top_label == sure.label
    assert unsure.probabilities == sure.probabilities
    assert {w["label"] for w in unsure.windows} == {UNCERTAIN}


def test_min_confidence_out_of_range_is_refused(tiny_bundle):
    from kndcli.errors import KndError

    with pytest.raises(KndError, match="inference.min_confidence"):
        Predictor.from_config(tiny_bundle, InferenceConfig(min_confidence=1.5))


def test_knd_predict_answers_uncertain_below_the_threshold(calibrated_bundle, wav_factory):
    clip = wav_factory("c.wav", seconds=2.0, freq=300)
    run = [sys.executable, "-m", "kndcli", "predict", "-m", str(calibrated_bundle), str(clip)]
    loose = subprocess.run([*run, "--json"], capture_output=True, text=True, check=True)
    strict = subprocess.run(
        [*run, "--json", "--set", "inference.min_confidence=0.999"],
        capture_output=True,
        text=True,
        check=True,
    )
    answer, refused = (json.loads(p.stdout)["predictions"][0] for p in (loose, strict))
    assert answer["label"] != UNCERTAIN
    assert refused["label"] == UNCERTAIN
    assert refused["probabilities"] == answer["probabilities"]


def test_bundle_without_calibration_is_uncalibrated(tiny_bundle):
    meta = json.loads((tiny_bundle / BUNDLE_JSON).read_text())
    assert "calibration" not in meta
    assert load_bundle(tiny_bundle).temperature == 1.0


def test_a_clip_shorter_than_a_window_has_its_window_end_with_it(tiny_bundle, wav_factory):
    clip = wav_factory("short.wav", seconds=1.2, freq=200)
    predictor = Predictor.from_config(tiny_bundle)
    assert predictor.window / predictor.sample_rate > 1.2
    result = next(predictor.predict_paths([clip], timeline=True))
    assert len(result.windows) == 1
    assert result.windows[0]["end"] == pytest.approx(1.2, abs=0.01)


def test_a_saved_evaluation_prints_the_calibrated_ece_it_recorded(capsys):
    """`knd demo` prints its figures from test_metrics.json, which keeps no per-clip
    results: the ECE a calibrated model would measure must come from the file."""
    from kndcli.cli.train import print_evaluation
    from kndcli.inference.evaluate import Evaluation
    from kndcli.inference.predictor import Prediction

    rng = np.random.default_rng(4)
    labels = ["angry", "calm"]
    truths = [labels[i] for i in rng.integers(0, 2, 200)]
    predictions = [
        Prediction(
            source=f"{i}.wav",
            label="angry",
            confidence=c,
            probabilities={"angry": c, "calm": 1 - c},
        )
        for i, c in enumerate(rng.uniform(0.5, 1.0, 200))
    ]
    result = Evaluation(
        split="test",
        labels=labels,
        n_clips=200,
        accuracy=0.5,
        macro_f1=0.4,
        uar=0.5,
        per_class={},
        per_speaker={},
        confusion=[[0, 0], [0, 0]],
        ece=0.25,
        min_confidence=0.8,
        predictions=predictions,
        truths=truths,
    )
    summary = result.summary()
    floor = summary["calibration"]["ece_if_calibrated"]
    coverage = summary["selective"]["coverage"]
    assert floor > 0.01 and 0 < coverage < 1
    print_evaluation(json.loads(json.dumps(summary)))
    out = capsys.readouterr().out
    assert f"would measure about {floor:.1%}" in out
    assert f"answers {coverage:.0%} of clips" in out
