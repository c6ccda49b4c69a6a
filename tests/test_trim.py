"""The silence trim under noise: the WebRTC-VAD trim (`train.trim_method=vad`) finds the
speech of a noisy clip where the energy trim keeps it whole, and a run trained with it
trims with it in the Predictor (docs/quality.md, "Noisy clips keep their silence")."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tests.conftest import ravdess_clips, tone
from tests.test_training import _noisy_datamodule

from kndcli.audio import decode, speech_bounds
from kndcli.config import AudioConfig, TimelineConfig
from kndcli.data.store import PreparedSet
from kndcli.inference.bundle import BundleError, load_bundle, schema_version
from kndcli.inference.predictor import Predictor
from kndcli.inference.speech import SpeechSegmenter, vad_bounds
from kndcli.inference.windowing import center_fit
from kndcli.perturb.noise import colored_noise, mix_at_snr
from kndcli.training.data import _stretch

RATE = 16000


def overlap_over_union(a: tuple[int, int], b: tuple[int, int]) -> float:
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))


def noisy(x: np.ndarray, snr: float, seed: int) -> np.ndarray:
    return mix_at_snr(x, colored_noise(len(x), "white", np.random.default_rng(seed)), snr)


def test_the_vad_trim_finds_the_speech_that_noise_hides_from_the_energy_trim(ravdess_root):
    """Six real clips with white noise at 20 and 10 dB SNR; the clean clip's energy trim
    is the speech span to find."""
    overlaps = []
    for k, path in enumerate(ravdess_clips(ravdess_root, [2])[::10]):
        clean = decode(path, audio=AudioConfig(), sample_rate=RATE).samples
        speech = speech_bounds(clean, RATE)
        assert speech[1] - speech[0] < 0.8 * len(clean)  # a second of silence around it
        for snr in (20.0, 10.0):
            x = noisy(clean, snr, seed=k)
            assert speech_bounds(x, RATE) == (0, len(x)), path.name  # noise fills the silence
            start, stop = vad_bounds(x, RATE)
            assert stop - start < 0.8 * len(x), (path.name, snr)
            overlaps.append(overlap_over_union(speech, (start, stop)))
    assert min(overlaps) > 0.6 and np.mean(overlaps) > 0.75, overlaps


def test_vad_bounds_are_in_the_clip_s_own_samples_at_any_rate(ravdess_root):
    """At 22.05 kHz (resampled for the VAD, which takes 8/16/32/48 kHz) the span is the
    one found at 16 kHz, within a VAD frame, in 22.05 kHz samples."""
    import soxr

    path = ravdess_clips(ravdess_root, [2])[0]
    x = noisy(decode(path, audio=AudioConfig(), sample_rate=RATE).samples, 10.0, seed=1)
    at_16k = np.array(vad_bounds(x, RATE)) / RATE
    at_22k = np.array(vad_bounds(soxr.resample(x, RATE, 22050), 22050)) / 22050
    assert at_16k[0] > 0.5
    np.testing.assert_allclose(at_22k, at_16k, atol=0.035)


def test_speech_that_runs_to_the_end_ends_there_at_any_rate(ravdess_root):
    """A recording cut mid-sentence: its last segment ends at the end of the audio at
    11.025 and 22.05 kHz as at 16 kHz, so the resampler's held-back tail is judged too
    (it used to end 0.09 s early at 11.025 kHz)."""
    import soxr

    path = ravdess_clips(ravdess_root, [1])[10]
    clean = decode(path, audio=AudioConfig(), sample_rate=RATE).samples
    cut = clean[: int(0.55 * len(clean))]
    rules = TimelineConfig(vad_mode=2, min_silence_s=0.3, min_speech_s=0.3, pad_s=0.0)
    for rate in (RATE, 11025, 22050):
        x = soxr.resample(cut, RATE, rate).astype(np.float32)
        segmenter = SpeechSegmenter(rate, rules)
        segments = [seg for i in range(0, len(x), 1000) for seg in segmenter.push(x[i : i + 1000])]
        segments += segmenter.finish()
        assert segments[-1][1] == pytest.approx(len(cut) / RATE, abs=0.031), rate


def test_vad_bounds_keeps_a_clip_without_speech_whole():
    silence = np.zeros(RATE, np.float32)
    assert vad_bounds(silence, RATE) == (0, RATE)


def test_training_cuts_each_rendered_copy_at_its_vad_span_found_once(synth_prepared):
    """Trim on, one rendered copy at 0 dB SNR, no speed or gain: a training item is the
    centre of that copy's VAD span, and the span is looked up, not found again, in the
    next epoch."""
    module, prepared = _noisy_datamodule(
        synth_prepared,
        "train.trim_silence=true",
        "train.trim_method=vad",
        "train.augment.random_crop=false",
        "train.augment.conditions.variants=1",
    )
    rendered = module.rendered  # every copy's span is found with the copies
    assert set(module.spans.spans) == {(index, 0) for index in rendered.copies}
    dataset = module.dataset("train")
    index = dataset.indices[0]
    copy = rendered.copies[index][0].astype(np.float32)
    start, stop = vad_bounds(copy, prepared.sample_rate)
    assert stop - start < 0.8 * len(copy)  # the trim cut something
    expected = center_fit(copy[start:stop], dataset.length)
    np.testing.assert_array_equal(dataset[0][0].numpy(), expected)
    assert module.spans.spans[(index, 0)] == (start, stop)

    module.spans.spans[(index, 0)] = (0, len(copy))  # a looked-up span is used as is
    later = module.dataset("train")
    later.epoch = 1
    np.testing.assert_array_equal(later[0][0].numpy(), center_fit(copy, dataset.length))


def test_the_predictor_trims_as_its_bundle_says(synth_prepared, tiny_bundle, tmp_path):
    """A bundle trained with the VAD trim is written as schema version 2 (a knd that
    knows only the energy trim refuses it) and its Predictor cuts a noisy clip at the
    speech; a bundle from before `trim_method` existed trims by energy, which keeps it."""
    from bench.cases import untrained_bundle

    from kndcli.config import ModelConfig

    prepared = PreparedSet.open(synth_prepared)
    x = noisy(prepared.waveform(prepared.indices("test")[0]), 10.0, seed=0)
    rng = np.random.default_rng(0)
    window = [tone(2.0, freq=f) + 0.01 * rng.standard_normal(2 * RATE) for f in (150, 250)] * 2
    vad = untrained_bundle(
        tmp_path / "vad", model=ModelConfig(channels=8), clips=window, trim_method="vad"
    )
    meta = json.loads((vad / "bundle.json").read_text())
    assert (meta["schema_version"], meta["trim_method"]) == (2, "vad")
    start = vad_bounds(x, RATE)[0]
    assert start > 0.2 * RATE
    assert Predictor(load_bundle(vad)).prepare(x)[2] == start

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    meta = json.loads((old / "bundle.json").read_text())
    assert meta["schema_version"] == 1
    del meta["trim_method"]
    (old / "bundle.json").write_text(json.dumps(meta))
    assert Predictor(load_bundle(old)).prepare(x)[2] == speech_bounds(x, RATE)[0] == 0


def test_the_energy_trim_cuts_the_sped_copy_as_before(synth_prepared):
    """The default trim is found on the sped-up copy, the cut earlier runs trained on, not
    on the copy before the speed (which would cut within a frame or two of it)."""
    module, prepared = _noisy_datamodule(
        synth_prepared,
        "train.trim_silence=true",
        "train.augment.speeds=[1.1]",
        "train.augment.random_crop=false",
        "train.augment.conditions.variants=1",
        "train.augment.conditions.snr_db=[60,60]",  # quiet enough for the energy trim
    )
    dataset = module.dataset("train")
    copy = module.rendered.copies[dataset.indices[0]][0].astype(np.float32)
    fast = _stretch(copy, 1.1)
    start, stop = speech_bounds(fast, prepared.sample_rate)
    assert stop - start < 0.8 * len(fast)  # the trim cut the silence
    expected = center_fit(fast[start:stop], dataset.length)
    start, stop = speech_bounds(copy, prepared.sample_rate)
    trimmed_first = center_fit(_stretch(copy[start:stop], 1.1), dataset.length)
    assert not np.array_equal(expected, trimmed_first)
    np.testing.assert_array_equal(dataset[0][0].numpy(), expected)
    assert not module.spans.spans  # nothing looked up


def test_a_bundle_with_an_unknown_trim_method_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    meta_path = copy / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta["trim_method"] = "silero"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        BundleError, match=r"bundle.json: trim_method 'silero' is not energy or vad"
    ):
        load_bundle(copy)


def test_a_bundle_of_a_later_schema_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    meta_path = copy / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta["schema_version"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"schema_version 3 is not one this knd reads \(1, 2\)"):
        load_bundle(copy)


def test_only_a_bundle_that_trims_by_the_vad_needs_version_2():
    """A VAD run with `train.trim_silence: false` trims nothing, so a knd that knows only
    schema version 1 reads its bundle correctly and must not be refused it."""
    assert schema_version({"trim_silence": True, "trim_method": "vad"}) == 2
    assert schema_version({"trim_silence": False, "trim_method": "vad"}) == 1
    assert schema_version({"trim_silence": True}) == 1
