"""Scoring an archive in shards: disjoint, resumable, one part at a time.

N processes (N Vertex AI replicas, or N shells) each run `knd predict SOURCES --shard I/N
--out OUT`. Every process lists the same sources, keeps those whose name hashes to its
shard, and scores them in parts of `part_size` files. A part is one JSON-lines object
(`part-IIIII-of-NNNNN-PPPPP.jsonl`, one row per scored file) written in one atomic write
after its files are scored, beside an `errors-...jsonl` for the files that could not be
scored; its presence is what "done" means, so a replica killed or preempted mid-part
redoes only that part when it runs again. `_DONE-IIIII-of-NNNNN.json` marks a finished
shard with its counts. A plan file records the listing: a rerun against a listing that
changed is refused, since its parts would no longer hold the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kndcli.audio import AUDIO_EXTENSIONS, AudioError, find_audio_files
from kndcli.config import AudioConfig, InferenceConfig
from kndcli.errors import KndError, UsageError

if TYPE_CHECKING:
    from kndcli.inference.predictor import Predictor


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str, environ: Mapping[str, str] | None = None) -> Shard:
        """`I/N`, or `auto`: this Vertex AI replica's place among the job's replicas."""
        if text == "auto":
            return shard_from_env(os.environ if environ is None else environ)
        index, sep, count = text.partition("/")
        try:
            shard = cls(int(index), int(count))
        except ValueError:
            shard = None
        if not sep or shard is None or not 0 <= shard.index < shard.count:
            raise UsageError(f"--shard {text!r}: expected I/N with 0 <= I < N, or auto")
        return shard

    @property
    def tag(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"

    def split(self, n: int) -> list[Shard]:
        """`n` sub-shards whose union is this shard, for `n` processes on one replica:
        sub j is `index + count*j` of `count*n`, and h % (count*n) = index + count*j
        for some j exactly when h % count = index."""
        return [Shard(self.index + self.count * j, self.count * n) for j in range(n)]

    def owns(self, source: str) -> bool:
        """Stable across processes and machines: a hash of the name, not the position."""
        digest = hashlib.sha256(source.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index


def shard_from_env(environ: Mapping[str, str]) -> Shard:
    """Replica index and count from Vertex AI's CLUSTER_SPEC (pool 0 first); 0/1 elsewhere."""
    from kndcli.cloud.vertex_env import lightning_env, num_nodes_from_env

    count = num_nodes_from_env(environ)
    if count <= 1:
        return Shard()
    return Shard(int(lightning_env(environ)["NODE_RANK"]), count)


class Store:
    """A local directory or a gs:// prefix, written one whole object at a time."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.remote = root.startswith("gs://")
        if self.remote:
            from kndcli.gcs import gcs_filesystem

            self.fs = gcs_filesystem("writing results to gs://")
        else:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> str:
        return f"{self.root[5:]}/{name}" if self.remote else str(Path(self.root) / name)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._path(name)) if self.remote else Path(self._path(name)).exists()

    def read(self, name: str) -> bytes:
        if self.remote:
            return self.fs.cat_file(self._path(name))
        return Path(self._path(name)).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        """All or nothing: a reader never sees half a part (object write; rename locally)."""
        if self.remote:
            self.fs.pipe_file(self._path(name), data)
            return
        path = Path(self._path(name))
        partial = path.with_name(path.name + f".{os.getpid()}.partial")
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)


def list_sources(paths: Iterable[str]) -> list[str]:
    """Audio files under local paths (files, directories, globs) and gs:// prefixes, sorted."""
    local = [p for p in paths if not str(p).startswith("gs://")]
    remote = [str(p).rstrip("/") for p in paths if str(p).startswith("gs://")]
    sources = {str(p) for p in find_audio_files(local)}
    if remote:
        from kndcli.gcs import gcs_filesystem

        fs = gcs_filesystem("reading audio from gs://")
        for prefix in remote:
            found = fs.find(prefix[5:]) if not _is_audio(prefix) else [prefix[5:]]
            sources |= {f"gs://{name}" for name in found if _is_audio(name)}
    return sorted(sources)


def _is_audio(name: str) -> bool:
    return name.lower().endswith(AUDIO_EXTENSIONS)


def source_reader(sources: list[str], max_file_mb: float) -> Callable[[str], Any]:
    """What `Predictor.predict_paths(read=...)` opens: bytes for gs://, the path otherwise.

    An object is fetched with a ranged read that stops one byte past `max_file_mb`, so an
    hour-long WAV in the bucket is refused (that file only) without being held in memory;
    a local file's size is checked before it is opened by the decoder itself.
    """
    fs = None
    if any(s.startswith("gs://") for s in sources):
        from kndcli.gcs import gcs_filesystem

        fs = gcs_filesystem("reading audio from gs://")
    limit = int(max_file_mb * 1e6)

    def read(source: str) -> Any:
        if not source.startswith("gs://"):
            return source
        try:
            data = fs.cat_file(source[5:], start=0, end=limit + 1)
        except Exception as exc:
            why = " ".join(str(exc).split()) or type(exc).__name__
            if _this_object_only(exc):
                raise OSError(why) from exc
            # Not an OSError, which would make this file an error row: stop the shard
            # here; a rerun resumes at this part.
            raise KndError(
                f"{source}: cannot read ({type(exc).__name__}: {why}); "
                "stopped this shard, run the same command again to resume"
            ) from exc
        if len(data) > limit:
            raise AudioError(
                source, f"file is over the {max_file_mb:g} MB limit (audio.max_file_mb)"
            )
        return data

    return read


def _this_object_only(exc: Exception) -> bool:
    """Whether a failed read concerns its object alone: gone since it was listed (404), or
    a 4xx about that object such as 400 for a CMEK key it cannot use. Everything else
    would fail the reads to come as well and turn the rest of the archive into error
    rows: credentials (401), permission (403: with uniform bucket-level access, GCP's
    default, it is bucket-wide), 408, 429, a 5xx after gcsfs' retries, a bucket-wide
    "requester pays", or no network."""
    if isinstance(exc, FileNotFoundError):
        return True
    if isinstance(exc, ValueError) and str(exc).startswith("Bad Request:"):
        return True  # gcsfs' 400 whose message says "invalid" (no code attached)
    code = getattr(exc, "code", None)
    return isinstance(code, int) and 400 <= code < 500 and code not in (401, 403, 408, 429)


@dataclass
class ShardSummary:
    shard: str
    out: str
    files: int  # this shard's files, all parts
    parts: int
    parts_skipped: int  # done by an earlier run
    scored: int  # files scored in this run
    failed: int  # files that could not be scored in this run (in errors-*.jsonl)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_shard(
    predictor: Predictor,
    sources: list[str],
    out: str,
    shard: Shard,
    *,
    part_size: int = 1000,
    batch_size: int = 32,
    workers: int = 0,
    on_part: Callable[[int, int], None] | None = None,
) -> ShardSummary:
    """Score this shard's files part by part into `out`, skipping parts already there."""
    if part_size < 1:
        raise UsageError(f"--part-size must be at least 1, got {part_size}")
    store = Store(out)
    mine = [s for s in sources if shard.owns(s)]
    _check_plan(store, shard, mine, part_size)
    parts = [mine[i : i + part_size] for i in range(0, len(mine), part_size)]
    read = source_reader(mine, predictor.audio.max_file_mb)
    summary = ShardSummary(shard.tag, out, len(mine), len(parts), 0, 0, 0)
    for number, files in enumerate(parts):
        name = f"part-{shard.tag}-{number:05d}.jsonl"
        if store.exists(name):
            summary.parts_skipped += 1
            continue
        rows, errors = [], []
        predictions = predictor.predict_paths(
            files, batch_size=batch_size, workers=workers, read=read
        )
        for prediction in predictions:
            (rows if prediction.ok else errors).append(prediction.to_dict())
        if errors:
            store.write(f"errors-{shard.tag}-{number:05d}.jsonl", _jsonl(errors))
        store.write(name, _jsonl(rows))  # last: the part is done once this exists
        summary.scored += len(rows)
        summary.failed += len(errors)
        if on_part is not None:
            on_part(number, len(parts))
    store.write(f"_DONE-{shard.tag}.json", json.dumps(summary.to_dict(), indent=2).encode())
    return summary


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _check_plan(store: Store, shard: Shard, mine: list[str], part_size: int) -> None:
    """The first run records the shard's listing; a rerun must see the same one."""
    plan = {
        "files": len(mine),
        "part_size": part_size,
        "listing_sha256": hashlib.sha256("\n".join(mine).encode()).hexdigest(),
    }
    name = f"_PLAN-{shard.tag}.json"
    before = json.loads(store.read(name)) if store.exists(name) else None
    if before == plan:
        return
    if before is not None:
        raise KndError(
            f"{store.root}: shard {shard.tag} was started on another listing or part size "
            f"({before.get('files')} files, parts of {before.get('part_size')}; now "
            f"{plan['files']} files, parts of {part_size}): resuming would mix them; "
            "write to a new --out"
        )
    store.write(name, json.dumps(plan, indent=2).encode())


@dataclass(frozen=True)
class ShardJob:
    """What one process needs to score one (sub-)shard: crosses to spawned processes."""

    model: str
    inference: InferenceConfig
    audio: AudioConfig
    out: str
    part_size: int
    batch_size: int


def score_in_processes(
    job: ShardJob, sources: list[str], shard: Shard, processes: int
) -> ShardSummary:
    """Score `shard` with `processes` spawned processes, one sub-shard each (one ONNX
    thread and one decoder apiece), so a replica with many vCPUs uses them all: one
    process tops out at a few cores. A rerun must use the same count (`_SPLIT-*`), or
    its sub-shards would not match the parts already written."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import get_context

    store = Store(job.out)
    check_split(store, shard, processes)
    subs = shard.split(processes)
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(_score_sub, job, [s for s in sources if sub.owns(s)], sub) for sub in subs
        ]
        try:
            summaries = [future.result() for future in futures]
        except BrokenProcessPool:
            raise KndError(
                f"a scoring process died (out of memory, or killed); the parts written are "
                f"kept: rerun with --processes {processes} to finish the shard"
            ) from None
    total = ShardSummary(shard.tag, job.out, 0, 0, 0, 0, 0)
    for part in summaries:
        for key in ("files", "parts", "parts_skipped", "scored", "failed"):
            setattr(total, key, getattr(total, key) + getattr(part, key))
    store.write(f"_DONE-{shard.tag}.json", json.dumps(total.to_dict(), indent=2).encode())
    return total


def check_split(store: Store, shard: Shard, processes: int) -> None:
    """The first run of a shard records its process count; a rerun must use the same."""
    name = f"_SPLIT-{shard.tag}.json"
    before = json.loads(store.read(name)) if store.exists(name) else None
    if before is None and store.exists(f"_PLAN-{shard.tag}.json"):
        before = {"processes": 1}  # started before splits were recorded: one process
    if before is None:
        store.write(name, json.dumps({"processes": processes}).encode())
    elif before.get("processes") != processes:
        raise UsageError(
            f"{store.root}: shard {shard.tag} was started with --processes "
            f"{before.get('processes')}: pass the same count to resume it"
        )


def _score_sub(job: ShardJob, sources: list[str], sub: Shard) -> ShardSummary:
    from kndcli.inference.predictor import Predictor

    predictor = Predictor.from_config(job.model, job.inference, threads=1, audio=job.audio)
    # One decoder keeps a process on its one core; objects in a bucket spend most of
    # their time in flight, so a few reads overlap there.
    workers = 4 if any(s.startswith("gs://") for s in sources) else 1
    return score_shard(
        predictor, sources, job.out, sub, part_size=job.part_size,
        batch_size=job.batch_size, workers=workers,
    )  # fmt: skip
