"""`knd data synth`: RAVDESS layout, determinism, decodable audio and real prosody cues."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kndcli.audio import audio_features, decode
from kndcli.config import LABELS
from kndcli.datasets.synth import clip_specs, synthesize
from kndcli.errors import KndError

RAVDESS_NAME = re.compile(
    r"^03-01-(?P<emotion>0[1-8])-(?P<intensity>0[12])-(?P<statement>0[12])"
    r"-(?P<repetition>0[12])-(?P<actor>\d\d)$"
)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("synth") / "new"  # does not exist yet: must be created
    return out, synthesize(out, actors=2, seed=0)


@pytest.fixture(scope="module")
def features(synth_dir) -> dict[tuple[str, str], dict[str, float]]:
    """Mean features per (actor, emotion) over that actor's clips."""
    grouped: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    for path in synth_dir[1]:
        match = RAVDESS_NAME.match(path.stem)
        assert match
        label = LABELS[int(match["emotion"]) - 1]
        grouped[(match["actor"], label)].append(audio_features(decode(path)))
    return {
        key: {name: float(np.mean([f[name] for f in clips])) for name in clips[0]}
        for key, clips in grouped.items()
    }


def test_names_parse_as_ravdess_with_the_corpus_counts(synth_dir) -> None:
    out, paths = synth_dir
    assert len(paths) == 120
    assert paths == sorted(paths)
    assert sorted(out.rglob("*.wav")) == paths
    per_actor: Counter[str] = Counter()
    per_emotion: Counter[tuple[str, str]] = Counter()
    for path in paths:
        match = RAVDESS_NAME.match(path.stem)
        assert match, path.name
        assert path.parent.name == f"Actor_{match['actor']}"
        if match["emotion"] == "01":
            assert match["intensity"] == "01"  # RAVDESS has no strong neutral
        per_actor[match["actor"]] += 1
        per_emotion[(match["actor"], match["emotion"])] += 1
    assert per_actor == {"01": 60, "02": 60}
    for (_, emotion), count in per_emotion.items():
        assert count == (4 if emotion == "01" else 8)
    assert len(per_emotion) == 16


def test_clip_specs_are_unique_and_cover_every_label() -> None:
    specs = clip_specs(3)
    assert len({s.filename for s in specs}) == 60
    assert {s.emotion for s in specs} == set(LABELS)
    assert [s.index for s in specs] == list(range(60))


def test_files_decode_as_mono_16k_speech_length_without_clipping(synth_dir) -> None:
    for path in synth_dir[1]:
        audio = decode(path)
        assert audio.sample_rate == audio.orig_sample_rate == 16000
        assert audio.channels == 1
        assert 2.0 <= audio.duration <= 5.0, path
        assert 0.01 < audio.peak <= 0.9 + 1e-4, path
        assert audio.clipping_ratio == 0.0
        # Leading silence is quiet room noise, not digital zero and not speech.
        lead = np.abs(audio.samples[: int(0.15 * 16000)])
        assert 0 < lead.max() < 0.01, path


def test_same_seed_same_bytes_different_seed_differs(synth_dir, tmp_path: Path) -> None:
    _, first = synth_dir
    again = synthesize(tmp_path / "again", actors=2, seed=0, workers=2)  # parallel-safe
    assert [p.name for p in again] == [p.name for p in first]
    for a, b in zip(first, again, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    other = synthesize(tmp_path / "other", actors=1, seed=1)
    assert other[0].read_bytes() != first[0].read_bytes()
    # Re-running into the same folder overwrites with the same content.
    rerun = synthesize(tmp_path / "other", actors=1, seed=1)
    assert [p.read_bytes() for p in rerun] == [p.read_bytes() for p in other]


def test_emotion_moves_pitch_energy_and_rate(features) -> None:
    for actor in ("01", "02"):
        angry, sad = features[(actor, "angry")], features[(actor, "sad")]
        fearful, happy = features[(actor, "fearful")], features[(actor, "happy")]
        assert angry["pitch_hz"] > sad["pitch_hz"] * 1.15
        assert angry["rms_dbfs"] > sad["rms_dbfs"] + 6
        assert angry["spectral_centroid_hz"] > sad["spectral_centroid_hz"]
        assert sad["duration_s"] > angry["duration_s"]
        assert sad["duration_s"] > fearful["duration_s"]
        assert happy["pitch_hz"] > features[(actor, "neutral")]["pitch_hz"]


def test_male_voices_are_lower_than_female(features) -> None:
    for label in LABELS:
        assert features[("01", label)]["pitch_hz"] < features[("02", label)]["pitch_hz"], label


def test_other_sample_rates_are_written_as_asked(tmp_path: Path) -> None:
    import soundfile as sf

    paths = synthesize(tmp_path, actors=1, seed=3, sample_rate=22050)
    info = sf.info(str(paths[0]))
    assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"actors": 0}, "--actors"),
        ({"actors": 100}, "--actors"),
        ({"seed": -1}, "--seed"),
        ({"sample_rate": 4000}, "--sample-rate"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path: Path, kwargs, message: str) -> None:
    with pytest.raises(KndError, match=message):
        synthesize(tmp_path, **kwargs)


def test_out_that_is_a_file_is_a_user_error(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(KndError, match="not a directory"):
        synthesize(target, actors=1)


def test_cli_writes_one_actor(tmp_path: Path) -> None:
    from kndcli.cli.main import app

    out = tmp_path / "synth"
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(out), "--actors", "1"])
    assert result.exit_code == 0, result.output
    assert "60 clips" in result.output
    files = sorted(out.glob("Actor_01/*.wav"))
    assert len(files) == 60
    assert all(RAVDESS_NAME.match(f.stem)["actor"] == "01" for f in files)
