"""`knd data prepare` and `knd data split-report` on real RAVDESS files and generated audio."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kndcli.audio import decode
from kndcli.cli.main import app
from kndcli.config import load_config
from kndcli.data.prepare import prepare_dataset
from kndcli.data.store import PreparedSet
from kndcli.errors import KndError

runner = CliRunner()
KND = Path(sys.executable).parent / "knd"  # the installed console script


def _cfg(raw: Path, out: Path, *extra: str):
    return load_config(
        overrides=["data.dataset=ravdess", f"data.raw={raw}", f"data.prepared={out}", *extra]
    )


@pytest.fixture
def two_actor_copy(ravdess_two_actors: Path, tmp_path: Path) -> Path:
    """A writable copy (of the links) so a test can add or touch files."""
    root = tmp_path / "raw"
    shutil.copytree(ravdess_two_actors, root, symlinks=True)
    return root


def test_prepares_real_ravdess_with_stereo_and_flac(ravdess_two_actors, tmp_path):
    out = tmp_path / "prep"
    result = prepare_dataset(_cfg(ravdess_two_actors, out, "data.split.test_speakers=['05']"))
    assert result.n_clips == 120
    assert result.failures == []
    ps = PreparedSet.open(out)
    assert ps.sample_rate == 16000
    assert {r["split"] for r in ps.rows if r["speaker"] == "05"} == {"test"}
    assert {r["split"] for r in ps.rows if r["speaker"] == "01"} == {"train"}
    stereo = {Path(r["path"]).name for r in ps.rows if r["channels"] == "2"}
    assert stereo == {
        "03-01-02-01-01-02-01.wav",
        "03-01-08-01-02-02-01.wav",
        "03-01-02-01-02-02-05.flac",
    }
    assert {r["orig_sample_rate"] for r in ps.rows} == {"48000"}
    # The stored waveform is what the shared audio path decodes (to int16 precision).
    i = next(i for i, r in enumerate(ps.rows) if r["path"].endswith(".flac"))
    expected = decode(ps.rows[i]["path"]).samples
    assert np.abs(ps.waveform(i) - expected).max() < 1e-4
    assert len(ps.features()) == 120


def test_bad_file_is_reported_and_skipped(two_actor_copy, tmp_path):
    bad = two_actor_copy / "Actor_01" / "03-01-05-02-02-02-01.wav"
    bad.unlink()
    bad.write_bytes(b"RIFF....WAVEjunk")
    result = prepare_dataset(_cfg(two_actor_copy, tmp_path / "prep"))
    assert result.n_clips == 119
    assert len(result.failures) == 1
    assert "03-01-05-02-02-02-01.wav" in result.failures[0]
    with pytest.raises(KndError, match="03-01-05-02-02-02-01.wav"):
        prepare_dataset(_cfg(two_actor_copy, tmp_path / "strict"), strict=True)


def test_a_split_whose_every_clip_was_bad_is_named(two_actor_copy, tmp_path):
    """All of the test speaker's files are bad: the split is empty, and the output says
    which split and which speakers instead of leaving a 0 in a table."""
    for path in (two_actor_copy / "Actor_05").iterdir():
        path.unlink()
        path.write_bytes(b"RIFF....WAVEjunk")
    args = ["data", "prepare", "--dataset", "ravdess", "--raw", str(two_actor_copy)]
    args += ["--prepared", str(tmp_path / "prep"), "--set", "data.split.test_speakers=['05']"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "split 'test' is empty: every clip of its speakers (05) was bad" in result.output
    assert "skipped 60 bad files" in result.output


def test_a_set_left_half_replaced_is_refused_not_misread(ravdess_two_actors, tmp_path):
    """prepare replaces its four files one by one: a set whose waveforms and manifest come
    from different runs would hand every clip someone else's samples. It is refused with
    what to do; a hand-edited split column, which changes no count, still opens."""
    out = tmp_path / "prep"
    prepare_dataset(_cfg(ravdess_two_actors, out))
    manifest, waveforms = out / "manifest.csv", out / "waveforms.bin"
    rows = list(csv.DictReader(manifest.open(newline="")))
    for row in rows[:60]:
        row["split"] = "val"
    _write_rows(manifest, rows)
    assert {r["split"] for r in PreparedSet.open(out).rows} == {"train", "val"}

    _write_rows(manifest, rows[:-1])
    with pytest.raises(KndError, match=r"manifest.csv lists 119 clips, prepare.json says 120"):
        PreparedSet.open(out)
    _write_rows(manifest, rows)
    data = waveforms.read_bytes()
    waveforms.write_bytes(data[: len(data) // 2])
    with pytest.raises(KndError, match=r"waveforms.bin holds .* run it again"):
        PreparedSet.open(out)
    waveforms.write_bytes(data)


def test_a_damaged_prepared_set_names_its_folder_not_a_traceback(ravdess_two_actors, tmp_path):
    out = tmp_path / "prep"
    prepare_dataset(_cfg(ravdess_two_actors, out))
    manifest, info = out / "manifest.csv", out / "prepare.json"
    rows = list(csv.DictReader(manifest.open(newline="")))
    for row in rows:
        del row["offset"]
    _write_rows(manifest, rows)
    with pytest.raises(KndError, match=r"prep: damaged prepared set \(KeyError: 'offset'\)"):
        PreparedSet.open(out)
    manifest.unlink()
    with pytest.raises(KndError, match=r"damaged prepared set \(FileNotFoundError"):
        PreparedSet.open(out)
    info.write_text(info.read_text()[:40])
    proc = subprocess.run(
        [KND, "data", "split-report", "--prepared", out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3 and "damaged prepared set (JSONDecodeError" in proc.stderr
    assert "Traceback" not in proc.stderr and "run 'knd data prepare' again" in proc.stderr


def _write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_rerun_reuses_unchanged_clips(two_actor_copy, tmp_path):
    cfg = _cfg(two_actor_copy, tmp_path / "prep")
    first = prepare_dataset(cfg)
    assert first.n_reused == 0
    again = prepare_dataset(cfg)
    assert again.n_reused == 120
    link = next((two_actor_copy / "Actor_05").iterdir())
    target = link.resolve()
    link.unlink()
    shutil.copy(target, link)  # a new file at the same path: different size/mtime key
    os.utime(link, ns=(1, 1))
    third = prepare_dataset(cfg)
    assert third.n_reused == 119
    ps = PreparedSet.open(tmp_path / "prep")
    assert len(ps.rows) == 120
    assert ps.info["total_samples"] == sum(int(r["length"]) for r in ps.rows)


def test_changed_sample_rate_reprocesses_everything(two_actor_copy, tmp_path):
    prepare_dataset(_cfg(two_actor_copy, tmp_path / "prep"))
    result = prepare_dataset(_cfg(two_actor_copy, tmp_path / "prep", "audio.sample_rate=8000"))
    assert result.n_reused == 0
    assert PreparedSet.open(tmp_path / "prep").sample_rate == 8000


def test_a_tighter_audio_limit_on_a_rerun_applies_to_every_clip(two_actor_copy, tmp_path):
    """A rerun must prepare what a fresh folder would: clips admitted under the old
    limits are not reused once a limit they break is set."""
    prepare_dataset(_cfg(two_actor_copy, tmp_path / "prep"))
    tight = _cfg(two_actor_copy, tmp_path / "prep", "audio.max_file_mb=0.001")
    with pytest.raises(KndError, match="none of the .* clips could be read") as refused:
        prepare_dataset(tight)
    assert "audio.max_file_mb" in str(refused.value)


def test_a_rerun_that_reads_no_clip_keeps_the_set_it_would_replace(two_actor_copy, tmp_path):
    """A typo'd limit or a stale mount fails every file: the good set must survive it."""
    first = prepare_dataset(_cfg(two_actor_copy, tmp_path / "prep"))
    before = {f.name: f.read_bytes() for f in (tmp_path / "prep").iterdir()}
    result = subprocess.run(
        [
            KND,
            "data",
            "prepare",
            "--raw",
            two_actor_copy,
            "--prepared",
            tmp_path / "prep",
            "--set",
            "audio.max_duration_s=0.5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 3, result.stderr  # a runtime failure: nothing was done
    assert "none of the 120 clips could be read" in result.stderr
    assert "left as it was" in result.stderr and "audio.max_duration_s" in result.stderr
    assert "Traceback" not in result.stderr
    assert {f.name: f.read_bytes() for f in (tmp_path / "prep").iterdir()} == before
    assert len(PreparedSet.open(tmp_path / "prep").indices()) == first.n_clips


def test_cli_prepare_and_split_report(ravdess_two_actors, tmp_path):
    out = tmp_path / "prep"
    result = runner.invoke(
        app,
        [
            "data",
            "prepare",
            "--dataset",
            "ravdess",
            "--raw",
            str(ravdess_two_actors),
            "--prepared",
            str(out),
            "--set",
            "data.split.test_speakers=['01']",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "prepared 120 clips" in result.output
    report = runner.invoke(app, ["data", "split-report", "--prepared", str(out)])
    assert report.exit_code == 0
    assert "no speaker appears in more than one split" in report.output


def test_split_report_fails_on_a_leaked_speaker(ravdess_two_actors, tmp_path):
    out = tmp_path / "prep"
    prepare_dataset(_cfg(ravdess_two_actors, out, "data.split.test_speakers=['01']"))
    manifest = out / "manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    rows[0]["split"] = "test" if rows[0]["split"] == "train" else "train"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = runner.invoke(app, ["data", "split-report", "--prepared", str(out)])
    assert report.exit_code == 1
    assert "appears in" in report.output


def test_split_lists_naming_unknown_speakers_fail(ravdess_two_actors, tmp_path):
    with pytest.raises(KndError, match=r"speakers \['77'\] are not in the dataset"):
        prepare_dataset(_cfg(ravdess_two_actors, tmp_path / "p", "data.split.test_speakers=['77']"))


def test_synth_prepared_has_disjoint_speaker_splits(synth_prepared):
    ps = PreparedSet.open(synth_prepared)
    by_split = {
        s: {r["speaker"] for r in ps.rows if r["split"] == s} for s in ("train", "val", "test")
    }
    assert by_split == {"train": {"01", "04"}, "val": {"02"}, "test": {"03"}}
    assert len(ps.rows) == 240


def test_remote_prepared_set_is_fetched_once(synth_prepared, tmp_path, monkeypatch):
    """Downloaded once per version of the remote set: the same URL prepared and uploaded
    again is fetched again, not read stale from the cache; a copy whose files disagree
    says which folder to delete."""
    from kndcli.data.store import local_prepared

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    remote = tmp_path / "bucket" / "prep"
    shutil.copytree(synth_prepared, remote)
    url, cache = f"file://{remote}", tmp_path / "home" / ".cache" / "knd" / "prepared"
    local = local_prepared(url, cache=cache)
    assert local.parent == cache
    assert PreparedSet.open(local).rows == PreparedSet.open(synth_prepared).rows
    assert local_prepared(url, cache=cache) == local
    with pytest.raises(KndError, match="no prepared set at file://"):
        local_prepared(f"file://{tmp_path}/nothing", cache=cache)

    rows = list(csv.DictReader((remote / "manifest.csv").open(newline="")))
    rows[0]["split"] = "test" if rows[0]["split"] != "test" else "train"
    _write_rows(remote / "manifest.csv", rows)
    info = remote / "prepare.json"
    info.write_text(info.read_text())  # uploaded again: prepare.json last
    os.utime(info, ns=(info.stat().st_mtime_ns + 10**9,) * 2)
    again = local_prepared(url, cache=cache)
    assert again != local and PreparedSet.open(url).rows[0]["split"] == rows[0]["split"]
    assert not local.exists()  # one copy per URL: the earlier version is removed

    # Offline or without credentials, the copy already here is used, with a warning.
    import fsspec.implementations.local as fs_local

    def unreachable(*args, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(fs_local.LocalFileSystem, "info", unreachable)
    assert local_prepared(url, cache=cache) == again
    monkeypatch.undo()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    waveforms = again / "waveforms.bin"
    waveforms.write_bytes(waveforms.read_bytes()[:-64])
    with pytest.raises(KndError, match=f"the copy of {url}: .* delete {again}"):
        PreparedSet.open(url)
