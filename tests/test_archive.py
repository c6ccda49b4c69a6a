"""Scoring an archive in shards (issue 17): `knd predict --shard I/N --out` as two replicas
against the GCS emulator, killed mid-shard and resumed, and the pieces underneath."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import gcs_emulator, ravdess_clips

from kndcli.errors import KndError, UsageError
from kndcli.gcs import gcs_filesystem
from kndcli.inference.archive import Shard, list_sources, shard_from_env

KND = Path(sys.executable).parent / "knd"


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch):
    """The GCS emulator with the bucket `archive`, through gcsfs."""
    with gcs_emulator(monkeypatch, "archive"):
        yield gcs_filesystem("the test")


def knd_predict(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [KND, "predict", *args, "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def rows(fs, prefix: str, kind: str = "part") -> list[dict]:
    found = []
    for name in sorted(fs.find(prefix)):
        if Path(name).name.startswith(f"{kind}-"):
            found += [json.loads(line) for line in fs.cat_file(name).decode().splitlines()]
    return found


def test_two_replicas_score_every_file_once_even_after_one_is_killed(
    bucket, ravdess_root: Path, tiny_bundle: Path
) -> None:
    clips = ravdess_clips(ravdess_root, [1, 2])[:30]
    for clip in clips:
        bucket.pipe_file(f"archive/in/{clip.parent.name}/{clip.name}", clip.read_bytes())
    bucket.pipe_file("archive/in/broken/not-audio.wav", b"RIFF\x00\x00junk")  # one bad file
    common = ["gs://archive/in", "--out", "gs://archive/out", "--part-size", "2"]
    common += ["-m", str(tiny_bundle), "--json"]

    victim = knd_predict(*common, "--shard", "1/2")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        Path(n).name.startswith("part-00001") for n in bucket.find("archive/out")
    ):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # preempted after its first part
    victim.wait(30)

    first = knd_predict(*common, "--shard", "0/2")
    resumed = knd_predict(*common, "--shard", "1/2")
    outputs = [p.communicate(timeout=300) for p in (first, resumed)]
    codes = [first.returncode, resumed.returncode]
    summaries = [json.loads(out) for out, _ in outputs]
    assert sorted(codes) == [0, 1], outputs  # the shard with the bad file says so
    assert summaries[1]["parts_skipped"] >= 1  # the part written before the kill is kept

    scored = [row["file"] for row in rows(bucket, "archive/out")]
    expected = sorted(f"gs://archive/in/{c.parent.name}/{c.name}" for c in clips)
    assert sorted(scored) == expected  # every good file exactly once, over both shards
    [error] = rows(bucket, "archive/out", "errors")
    assert error["file"] == "gs://archive/in/broken/not-audio.wav" and error["error"]
    done = [n for n in bucket.find("archive/out") if Path(n).name.startswith("_DONE-")]
    assert len(done) == 2


def test_a_rerun_on_a_changed_listing_is_refused(
    tmp_path: Path, ravdess_root: Path, tiny_bundle: Path
) -> None:
    archive = tmp_path / "in"
    archive.mkdir()
    for clip in ravdess_clips(ravdess_root, [1])[:3]:
        (archive / clip.name).symlink_to(clip)
    args = [str(archive), "--out", str(tmp_path / "out"), "-m", str(tiny_bundle)]
    done = subprocess.run([KND, "predict", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    again = subprocess.run([KND, "predict", *args], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "1 parts (1 done before)" in again.stdout

    extra = ravdess_clips(ravdess_root, [1])[3]
    (archive / extra.name).symlink_to(extra)
    changed = subprocess.run([KND, "predict", *args], capture_output=True, text=True, timeout=120)
    assert changed.returncode == 3
    assert "another listing" in changed.stderr and "new --out" in changed.stderr


def test_shards_are_disjoint_and_cover_every_name() -> None:
    names = [f"gs://b/clip{i}.wav" for i in range(300)]
    shards = [Shard(i, 3) for i in range(3)]
    owners = [[s for s in shards if s.owns(name)] for name in names]
    assert all(len(o) == 1 for o in owners)
    sizes = [sum(1 for o in owners if o[0] == s) for s in shards]
    assert min(sizes) > 60  # spread, not all in one


def test_sub_shards_split_a_shard_exactly() -> None:
    names = [f"gs://b/clip{i}.wav" for i in range(500)]
    for shard in (Shard(0, 1), Shard(1, 3), Shard(2, 3)):
        mine = {n for n in names if shard.owns(n)}
        for n in (1, 2, 5):
            parts = [{name for name in names if sub.owns(name)} for sub in shard.split(n)]
            assert set().union(*parts) == mine
            assert sum(len(p) for p in parts) == len(mine)  # disjoint


def test_processes_score_every_file_once_and_a_rerun_keeps_the_count(
    tmp_path: Path, ravdess_root: Path, tiny_bundle: Path
) -> None:
    archive = tmp_path / "in"
    archive.mkdir()
    clips = ravdess_clips(ravdess_root, [2])[:12]
    for clip in clips:
        (archive / clip.name).symlink_to(clip)
    out = tmp_path / "out"
    args = [str(archive), "--out", str(out), "-m", str(tiny_bundle), "--part-size", "4"]
    run = [KND, "predict", *args, "--processes", "2", "--json"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["scored"] == 12
    scored = [json.loads(line)["file"] for p in out.glob("part-*") for line in p.open()]
    assert sorted(scored) == sorted(str(archive / c.name) for c in clips)
    assert len(list(out.glob("_DONE-*"))) == 3  # two sub-shards and the replica's shard
    again = subprocess.run(run, capture_output=True, text=True, timeout=180)
    assert json.loads(again.stdout)["scored"] == 0  # every part was there
    other = subprocess.run([KND, "predict", *args], capture_output=True, text=True, timeout=60)
    assert other.returncode == 2 and "started with --processes 2" in other.stderr


def test_shard_auto_is_this_vertex_replica() -> None:
    spec = {
        "cluster": {"workerpool0": ["h0:2222"], "workerpool1": ["h1:2222", "h2:2222"]},
        "task": {"type": "workerpool1", "index": 1},
    }
    assert shard_from_env({"CLUSTER_SPEC": json.dumps(spec)}) == Shard(2, 3)
    assert shard_from_env({}) == Shard(0, 1)
    assert Shard.parse("2/5") == Shard(2, 5)
    for bad in ("5/5", "x", "1-2", "-1/2"):
        with pytest.raises(UsageError, match="--shard"):
            Shard.parse(bad)


def test_listing_finds_audio_under_local_and_gs_prefixes(bucket, tmp_path: Path) -> None:
    bucket.pipe_file("archive/a/x.wav", b"1")
    bucket.pipe_file("archive/a/notes.txt", b"2")
    (tmp_path / "y.flac").write_bytes(b"3")
    assert list_sources(["gs://archive/a", str(tmp_path)]) == sorted(
        ["gs://archive/a/x.wav", str(tmp_path / "y.flac")]
    )


def test_an_object_over_the_size_limit_is_refused_without_being_downloaded(bucket) -> None:
    """The ranged read stops one byte past audio.max_file_mb: the file is an error row,
    and a file under the limit reads whole."""
    from kndcli.audio import AudioError
    from kndcli.inference.archive import source_reader

    small, big = b"s" * 1000, b"b" * 30_000
    bucket.pipe_file("archive/ok.wav", small)
    bucket.pipe_file("archive/huge.wav", big)
    read = source_reader(["gs://archive/ok.wav", "gs://archive/huge.wav"], max_file_mb=0.01)
    assert read("gs://archive/ok.wav") == small
    with pytest.raises(AudioError, match=r"over the 0.01 MB limit \(audio.max_file_mb\)"):
        read("gs://archive/huge.wav")
    assert read("local/clip.wav") == "local/clip.wav"


@contextlib.contextmanager
def failing_gcs(monkeypatch: pytest.MonkeyPatch, status: int, message: str) -> Iterator[None]:
    """A loopback stand-in for GCS that answers every request with `status` and a JSON
    error body, as the real service does; gcsfs is pointed at it like at the emulator."""

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"error": {"code": status, "message": message}}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def test_an_object_only_it_cannot_read_is_its_own_error_and_auth_stops_the_shard(
    monkeypatch: pytest.MonkeyPatch, tiny_bundle: Path
) -> None:
    """A 400 for one object (a CMEK key its reader may not use) is that file's error row,
    as a 404 is; a 401 or 403 would fail every file after it, so it stops the shard with
    one line saying how to resume, instead of writing the rest as error rows."""
    from kndcli.inference.archive import source_reader
    from kndcli.inference.predictor import Predictor

    predictor = Predictor.from_config(tiny_bundle)
    cmek = "The object uses a Cloud KMS key that is disabled"
    gone = "No such object"
    invalid = "Key invalid for this object"  # gcsfs raises a ValueError, without a code
    for status, message, shown in (
        (400, cmek, cmek),
        (400, invalid, invalid),
        (404, gone, "x.wav"),
    ):
        with failing_gcs(monkeypatch, status, message):
            read = source_reader(["gs://b/x.wav"], 10)
            [row] = predictor.predict_paths(["gs://b/x.wav"], read=read)
        assert row.source == "gs://b/x.wav" and shown in row.error, row.error
    for status, message in ((401, "Login Required"), (403, "has no storage.objects.get")):
        with failing_gcs(monkeypatch, status, message):
            read = source_reader(["gs://b/x.wav"], 10)
            with pytest.raises(KndError, match=f"gs://b/x.wav: cannot read .*{message}"):
                list(predictor.predict_paths(["gs://b/x.wav"], read=read))


def test_a_read_that_stops_the_run_does_not_wait_for_the_reads_queued_behind_it(
    tiny_bundle: Path,
) -> None:
    """Sixty reads are queued ahead of the scorer; when the first stops the run (a bucket
    refusing every read), the error arrives at once, not after each queued read has
    spent its own retries."""
    from kndcli.inference.predictor import Predictor

    started: list[str] = []

    def read(source: str) -> bytes:
        started.append(source)
        if source == "gs://b/0.wav":
            raise KndError("gs://b/0.wav: cannot read (refused); stopped this shard")
        time.sleep(1.0)  # a read in gcsfs' retries
        raise FileNotFoundError(source)

    names = [f"gs://b/{i}.wav" for i in range(60)]
    began = time.perf_counter()
    with pytest.raises(KndError, match="stopped this shard"):
        list(Predictor.from_config(tiny_bundle).predict_paths(names, read=read, workers=2))
    assert time.perf_counter() - began < 5.0
    assert len(started) < 10


def test_shard_needs_out() -> None:
    done = subprocess.run(
        [KND, "predict", "x.wav", "--shard", "0/2"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert done.returncode == 2 and "--shard and --processes need --out" in done.stderr


def test_a_shard_started_before_splits_were_recorded_resumes_as_one_process(
    tmp_path: Path, ravdess_root: Path, tiny_bundle: Path
) -> None:
    archive = tmp_path / "in"
    archive.mkdir()
    for clip in ravdess_clips(ravdess_root, [3])[:3]:
        (archive / clip.name).symlink_to(clip)
    out = tmp_path / "out"
    args = [str(archive), "--out", str(out), "-m", str(tiny_bundle)]
    assert subprocess.run([KND, "predict", *args], capture_output=True, timeout=120).returncode == 0
    (out / "_SPLIT-00000-of-00001.json").unlink()  # as an older knd left it
    split = subprocess.run(
        [KND, "predict", *args, "--processes", "2"], capture_output=True, text=True, timeout=120
    )
    assert split.returncode == 2 and "started with --processes 1" in split.stderr
