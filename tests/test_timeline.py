"""`knd predict --timeline`: long recordings of real RAVDESS speech, segmented and scored."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from bench.common import run_peak
from bench.recordings import Utterance, long_recording
from tests.conftest import ravdess_clips
from tests.test_predict import KND, knd

from kndcli.config import AudioConfig, TimelineConfig
from kndcli.inference.bundle import load_bundle
from kndcli.inference.predictor import Predictor
from kndcli.inference.timeline import Timeline, score_recording


@pytest.fixture(scope="module")
def recording(ravdess_root: Path, tmp_path_factory) -> tuple[Path, list[Utterance]]:
    """75 s (over audio.max_duration_s) of 48 kHz FLAC: two actors' clips with pauses."""
    clips = ravdess_clips(ravdess_root, [3, 4])[::5]
    path = tmp_path_factory.mktemp("timeline") / "meeting.flac"
    return path, long_recording(clips, 75.0, path, rate=48000, seed=1)


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def timeline_of(bundle: Path, path: Path, **cfg: float) -> Timeline:
    predictor = Predictor(load_bundle(bundle))
    return score_recording(predictor, path, TimelineConfig(**cfg), AudioConfig())


def test_the_detector_finds_every_utterance_and_no_pause(tiny_bundle, recording) -> None:
    path, truth = recording
    timeline = timeline_of(tiny_bundle, path)
    assert timeline.ok and timeline.duration == pytest.approx(75.0, abs=0.01)
    for u in truth:  # a sentence holds ~1.5 s of voice; its bounds include clicks and breath
        covered = sum(overlap((u.start, u.end), seg) for seg in timeline.speech)
        assert covered >= 1.2, (u, timeline.speech)
    for seg in timeline.speech:  # every segment holds speech, none is only a pause
        assert any(overlap(seg, (u.start, u.end)) > 0.2 for u in truth), seg
    assert timeline.speech == sorted(timeline.speech)
    assert all(a[1] <= b[0] + 1e-9 for a, b in itertools.pairwise(timeline.speech))


def test_spans_tile_each_segment_and_merge_equal_answers(tiny_bundle, recording) -> None:
    path, _ = recording
    # Segments cut at 4 s hold several 2 s windows, so there is something to merge.
    timeline = timeline_of(tiny_bundle, path, max_segment_s=4.0)
    assert len(timeline.spans) >= len(timeline.speech)
    for start, end in timeline.speech:
        spans = [s for s in timeline.spans if start <= s.start < end]
        assert spans[0].start == pytest.approx(start) and spans[-1].end == pytest.approx(end)
        for a, b in itertools.pairwise(spans):
            assert a.end == pytest.approx(b.start)  # no gap, no overlap inside a segment
            assert a.label != b.label  # equal neighbours were merged
    for span in timeline.spans:
        assert sum(span.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert span.confidence == pytest.approx(span.probabilities[span.label])
    assert timeline.label == max(timeline.probabilities, key=timeline.probabilities.get)


def test_below_min_confidence_spans_and_the_file_answer_uncertain(tiny_bundle, recording):
    path, _ = recording
    bundle = load_bundle(tiny_bundle)
    sure = score_recording(Predictor(bundle), path, TimelineConfig(), AudioConfig())
    unsure = score_recording(
        Predictor(bundle, min_confidence=0.99), path, TimelineConfig(), AudioConfig()
    )
    assert sure.label != "uncertain" and unsure.label == "uncertain"
    assert {s.label for s in unsure.spans} == {"uncertain"}
    assert unsure.probabilities == sure.probabilities  # the answer changes, not the scores


def test_knd_predict_timeline_outputs(tiny_bundle, recording, tmp_path) -> None:
    path, _ = recording
    out = tmp_path / "tl"
    result = knd("predict", "-m", tiny_bundle, "--timeline", "--json", "--timeline-dir", out, path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    (row,) = document["timelines"]
    segments = row["segments"]
    assert row["file"] == str(path) and row["duration"] == pytest.approx(75.0, abs=0.01)
    assert segments and row["speech"]
    assert set(row["probabilities"]) == set(segments[0]["probabilities"])

    as_csv = knd("predict", "-m", tiny_bundle, "--timeline", "--csv", path)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(float(r["start"]), r["label"]) for r in rows] == [
        (s["start"], s["label"]) for s in segments
    ]

    files = sorted(p.name for p in out.iterdir())
    assert files == [f"meeting{s}" for s in (".csv", ".json", ".png", ".srt", ".vtt")]
    assert json.loads((out / "meeting.json").read_text())["segments"] == segments
    vtt = (out / "meeting.vtt").read_text()
    assert vtt.startswith("WEBVTT\n")
    cue = r"(\d\d:\d\d:\d\d)[.,](\d{3}) --> (\d\d:\d\d:\d\d)[.,](\d{3})"
    assert len(re.findall(cue.replace("[.,]", r"\."), vtt)) == len(segments)
    srt = (out / "meeting.srt").read_text()
    assert len(re.findall(cue.replace("[.,]", ","), srt)) == len(segments)
    assert srt.startswith("1\n") and f"\n{len(segments)}\n" in srt
    assert (out / "meeting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = knd("predict", "-m", tiny_bundle, "--timeline", path)
    assert table.returncode == 0 and "speech" in table.stdout
    assert f"{segments[0]['start']:.1f}-{segments[0]['end']:.1f} s" in table.stdout


def test_a_long_recording_is_refused_without_timeline_and_told_how(tiny_bundle, recording):
    path, _ = recording
    result = knd("predict", "-m", tiny_bundle, "--json", path)
    assert result.returncode == 1
    error = json.loads(result.stdout)["predictions"][0]["error"]
    assert "75.0 s" in error and "audio.max_duration_s" in error and "--timeline" in error


def test_a_broken_file_keeps_its_spans_and_stops_no_other(tiny_bundle, recording, tmp_path):
    path, _ = recording
    cut = tmp_path / "cut.flac"
    cut.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    silent = tmp_path / "silent.wav"
    rng = np.random.default_rng(0)
    sf.write(silent, 1e-3 * rng.standard_normal(16000 * 8).astype(np.float32), 16000)
    result = knd("predict", "-m", tiny_bundle, "--timeline", "--jsonl", cut, silent, path)
    assert result.returncode == 1
    broken, quiet, whole = (json.loads(line) for line in result.stdout.splitlines())
    assert "truncated" in broken["error"] and f"error: {cut}" in result.stderr
    assert broken["segments"] and broken["duration"] < 0.7 * 75.0
    *before, last = broken["segments"]
    assert before == whole["segments"][: len(before)]
    # The utterance under way at the break is kept too, cut where the audio ends.
    assert last["start"] == whole["segments"][len(before)]["start"]
    assert last["end"] == pytest.approx(broken["duration"], abs=0.05)
    assert quiet["label"] is None and quiet["segments"] == [] and "error" not in quiet
    assert "error" not in whole
    assert "1 of 3 files failed" in result.stderr


def test_timeline_values_are_checked_with_their_key(tiny_bundle, recording) -> None:
    path, _ = recording
    result = knd("predict", "-m", tiny_bundle, "--timeline", "--set", "timeline.vad_mode=5", path)
    assert result.returncode == 2 and "timeline.vad_mode" in result.stderr
    result = knd(
        "predict", "-m", tiny_bundle, "--timeline", "--set", "timeline.max_duration_s=60", path
    )
    assert result.returncode == 1
    assert "timeline.max_duration_s" in result.stderr and "--timeline" not in result.stderr


@pytest.mark.slow
def test_an_hour_is_scored_in_bounded_memory(tiny_bundle, ravdess_root, tmp_path) -> None:
    """One hour of 16 kHz speech (230 MB as float32 samples) costs a few MB more than
    one clip, and is scored many times faster than real time."""
    hour = tmp_path / "hour.wav"
    truth = long_recording(ravdess_clips(ravdess_root, range(1, 17)), 3600.0, hour)
    short = tmp_path / "short.wav"
    long_recording(ravdess_clips(ravdess_root, [1])[:1], 5.0, short)

    def peak_rss_mb(path: Path) -> tuple[float, float, str]:
        cmd = [*KND, "predict", "-m", str(tiny_bundle), "--timeline", "--jsonl", str(path)]
        seconds, rss, out = run_peak(cmd)
        return rss, seconds, out

    base_rss, _, _ = peak_rss_mb(short)
    rss, seconds, out = peak_rss_mb(hour)
    timeline = json.loads(out)
    assert timeline["duration"] == pytest.approx(3600.0, abs=0.01)
    assert rss < base_rss + 100, (rss, base_rss)
    assert 3600.0 / seconds > 20, seconds  # a stated floor, well under what is measured
    found = sum(
        any(overlap((u.start, u.end), tuple(seg)) > 0 for seg in timeline["speech"]) for u in truth
    )
    assert found >= 0.95 * len(truth)
