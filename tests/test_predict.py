"""`knd predict` end to end in a subprocess: formats, bad files, output modes, exit codes."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kndcli.config import LABELS

KND = [sys.executable, "-c", "from kndcli.cli.main import main; main()"]


def knd(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [*KND, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def predictions(text: str) -> list[dict]:
    """The predictions of `knd predict --json`'s one document."""
    return json.loads(text)["predictions"]


@pytest.fixture
def good_files(wav_factory: Callable[..., Path]) -> dict[str, Path]:
    """One clip of every readable format and shape the service accepts."""
    files = {
        "mono16k": wav_factory("good/mono16k.wav"),
        "stereo": wav_factory("good/stereo.wav", channels=2),
        "rate8k": wav_factory("good/rate8k.wav", rate=8000),
        "rate44k": wav_factory("good/rate44k.wav", rate=44100),
        "pcm24": wav_factory("good/pcm24.wav", rate=48000, subtype="PCM_24"),
        "float": wav_factory("good/float.wav", subtype="FLOAT"),
        "flac": wav_factory("good/clip.flac", rate=48000),
        "ogg": wav_factory("good/clip.ogg", fmt="OGG", subtype="VORBIS", seconds=1.5),
        "silent": wav_factory("good/silent.wav", amp=0.0),
        "long_window": wav_factory("good/five_s.wav", seconds=5.0),
    }
    try:
        files["mp3"] = wav_factory("good/clip.mp3", fmt="MP3", subtype="MPEG_LAYER_III")
    except (sf.LibsndfileError, TypeError, ValueError) as exc:  # pragma: no cover
        pytest.skip(f"libsndfile cannot write MP3 here: {exc}")
    return files


@pytest.fixture
def bad_files(tmp_path: Path, wav_factory: Callable[..., Path]) -> dict[str, Path]:
    """Files that must each fail with a reason, without stopping the others."""
    bad = tmp_path / "bad"
    bad.mkdir()
    text = bad / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    empty = bad / "empty.wav"
    empty.write_bytes(b"")
    full = wav_factory("bad/full.wav", seconds=1.0)
    truncated = bad / "truncated.wav"
    truncated.write_bytes(full.read_bytes()[: 44 + 4000])
    full.unlink()
    too_long = bad / "too_long.wav"
    sf.write(too_long, np.zeros(8000 * 61, np.float32), 8000)
    return {"text": text, "empty": empty, "truncated": truncated, "too_long": too_long}


def test_mix_of_good_and_bad_files_json(
    tiny_bundle: Path, good_files: dict[str, Path], bad_files: dict[str, Path]
) -> None:
    paths = [*good_files.values(), *bad_files.values()]
    result = knd("predict", "--model", tiny_bundle, "--json", *paths)
    assert result.returncode == 1, result.stderr
    rows = {Path(r["file"]).name: r for r in predictions(result.stdout)}
    assert len(rows) == len(paths)
    for name, path in good_files.items():
        row = rows[path.name]
        assert "error" not in row, (name, row)
        assert row["label"] in LABELS
        assert set(row["probabilities"]) == set(LABELS)
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-3
        assert row["confidence"] == max(row["probabilities"].values())
    assert rows["five_s.wav"]["duration"] == pytest.approx(5.0, abs=0.01)
    assert rows["rate8k.wav"]["duration"] == pytest.approx(1.0, abs=0.01)
    reasons = {name: rows[path.name]["error"] for name, path in bad_files.items()}
    assert "not a readable audio file" in reasons["text"]
    assert "empty" in reasons["empty"]
    assert "truncated" in reasons["truncated"]
    assert "too long" in reasons["too_long"]
    for path in bad_files.values():  # one error line per bad file, naming it, on stderr
        assert f"error: {path}: " in result.stderr
    assert f"{len(bad_files)} of {len(paths)} files failed" in result.stderr


def test_all_good_exits_zero_with_table(tiny_bundle: Path, good_files: dict[str, Path]) -> None:
    result = knd("predict", "-m", tiny_bundle, good_files["mono16k"], good_files["flac"])
    assert result.returncode == 0, result.stderr
    assert "mono16k.wav" in result.stdout and "clip.flac" in result.stdout
    assert "top-3" in result.stdout
    assert result.stderr == ""


def test_file_names_with_brackets_are_printed_as_they_are(
    tiny_bundle: Path, wav_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """The table prints names, not rich markup: `[remix]` stays and `[/b]` does not crash."""
    remix = wav_factory("song [remix].wav")
    odd = wav_factory("take [/b] two.wav")  # a folder "take [" holding "b] two.wav"
    broken = tmp_path / "[red]broken.wav"
    broken.write_bytes(b"not audio")
    result = knd("predict", "-m", tiny_bundle, remix, odd, broken)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    flat = result.stdout.replace("\n", "")
    assert "song [remix].wav" in flat and "take [/b] two.wav" in flat
    assert "[red]broken.wav" in flat


def test_directory_recursive_and_glob(
    tmp_path: Path, tiny_bundle: Path, wav_factory: Callable[..., Path]
) -> None:
    for i in range(3):
        wav_factory(f"corpus/a/{i}.wav", freq=200 + 50 * i)
    wav_factory("corpus/b/deep/x.flac")
    (tmp_path / "corpus" / "readme.txt").write_text("not audio, not picked up")
    result = knd("predict", "-m", tiny_bundle, "--json", tmp_path / "corpus")
    assert result.returncode == 0, result.stderr
    names = sorted(Path(r["file"]).name for r in predictions(result.stdout))
    assert names == ["0.wav", "1.wav", "2.wav", "x.flac"]
    globbed = knd("predict", "-m", tiny_bundle, "--json", str(tmp_path / "corpus" / "a" / "*.wav"))
    assert globbed.returncode == 0
    assert len(predictions(globbed.stdout)) == 3


def test_csv_output_parses(
    tiny_bundle: Path, good_files: dict[str, Path], bad_files: dict[str, Path]
) -> None:
    result = knd("predict", "-m", tiny_bundle, "--csv", good_files["stereo"], bad_files["text"])
    assert result.returncode == 1
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 2
    good, bad = rows
    assert good["label"] in LABELS and good["error"] == ""
    assert float(good["confidence"]) == pytest.approx(float(good[good["label"]]))
    assert sum(float(good[label]) for label in LABELS) == pytest.approx(1, abs=1e-3)
    assert bad["file"].endswith("notes.wav") and "not a readable audio file" in bad["error"]


def test_set_overrides_and_config_default_model(
    tmp_path: Path, tiny_bundle: Path, good_files: dict[str, Path]
) -> None:
    clip = good_files["mono16k"]
    result = knd(
        "predict",
        "--json",
        "--set",
        f"inference.model={tiny_bundle}",
        "--set",
        "audio.max_duration_s=0.5",
        clip,
    )
    assert result.returncode == 1
    assert "too long" in predictions(result.stdout)[0]["error"]
    config = tmp_path / "conf.yaml"
    config.write_text(f"inference:\n  model: {tiny_bundle}\n")
    assert knd("predict", "--json", "-c", config, clip).returncode == 0


def test_missing_model_and_no_files_are_one_line_errors(tmp_path: Path, tiny_bundle: Path) -> None:
    result = knd("predict", "--json", tmp_path / "nothing.wav", cwd=tmp_path)
    assert result.returncode == 2
    assert "no bundle at models/latest" in result.stderr
    assert "Traceback" not in result.stderr
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    result = knd("predict", "-m", tiny_bundle, empty)
    assert result.returncode == 2 and "no audio files found" in result.stderr
    both = knd("predict", "-m", tiny_bundle, "--json", "--csv", empty)
    assert both.returncode == 2 and "--json" in both.stderr


def test_missing_file_is_reported_and_others_scored(
    tiny_bundle: Path, good_files: dict[str, Path]
) -> None:
    result = knd("predict", "-m", tiny_bundle, "--json", "/no/such/clip.wav", good_files["mono16k"])
    assert result.returncode == 1
    rows = predictions(result.stdout)
    assert rows[0] == {"file": "/no/such/clip.wav", "error": "no such file"}
    assert rows[1]["label"] in LABELS


def test_torch_backend_agrees_with_onnx(tiny_bundle: Path, good_files: dict[str, Path]) -> None:
    clips = [good_files["stereo"], good_files["long_window"]]
    onnx = predictions(knd("predict", "-m", tiny_bundle, "--json", *clips).stdout)
    torch = knd("predict", "-m", tiny_bundle, "--json", "--backend", "torch", *clips)
    assert torch.returncode == 0, torch.stderr
    for a, b in zip(onnx, predictions(torch.stdout), strict=True):
        assert a["label"] == b["label"]
        for label in LABELS:
            assert a["probabilities"][label] == pytest.approx(b["probabilities"][label], abs=1e-4)
    bad = knd("predict", "-m", tiny_bundle, "--backend", "tf", clips[0])
    assert bad.returncode == 2 and "inference.backend" in bad.stderr


def test_forced_progress_keeps_stdout_clean(
    tiny_bundle: Path, wav_factory: Callable[..., Path]
) -> None:
    clips = [wav_factory(f"many/{i}.wav", seconds=0.3) for i in range(25)]
    result = knd("predict", "-m", tiny_bundle, "--json", "--progress", *clips)
    assert result.returncode == 0, result.stderr
    assert len(predictions(result.stdout)) == 25
