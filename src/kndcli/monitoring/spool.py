"""A write-ahead spool: prediction records on local disk until the bucket has them.

A service answers a request only once its record is durable. Writing each record to a
bucket before answering would put a network round trip (and the bucket's outages) on
every request, and buffering in memory loses what a crash or SIGKILL catches. So each
write becomes one small JSON-lines segment file, fsynced and renamed into the spool
directory; the uploader takes the segments, writes them as one object and deletes them.
A restart finds what the dead process had not uploaded and sends it. The spool is
bounded: when it holds `max_bytes` (the bucket has been unreachable for long), writes
are refused, and the service answers 503 instead of acknowledging what it cannot keep.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SEGMENT_SUFFIX = ".jsonl"
_PARTIAL_SUFFIX = ".part"
# A partial segment older than this was left by a process that died mid-write: it was
# never acknowledged, so it is removed.
_STALE_PARTIAL_S = 60.0


class SpoolError(OSError):
    """The spool cannot take a record: full, or its disk failed.

    `reason` says which without naming the spool's folder (see PredictionLogError).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def default_spool_dir(sink: str) -> Path:
    """One directory per sink under the system's temporary directory."""
    digest = hashlib.sha256(sink.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "knd-spool" / digest


class Spool:
    """Segments of JSON-lines records in `directory`, at most `max_bytes` of them."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._bytes = self._scan_bytes()

    def _scan_bytes(self) -> int:
        return sum(spool_size(path) for path in self.segments())

    @property
    def pending_bytes(self) -> int:
        """Bytes waiting for upload, as this process last counted them."""
        return self._bytes

    def append(self, records: list[dict[str, Any]]) -> None:
        """Make `records` durable as one segment (fsync, atomic rename), or raise SpoolError."""
        body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        with self._lock:
            if self._bytes + len(body) > self.max_bytes:
                # Other processes may have uploaded since this one last counted.
                self._bytes = self._scan_bytes()
            if self._bytes + len(body) > self.max_bytes:
                reason = (
                    f"the local spool is full ({self._bytes / 2**20:.1f} MiB waiting "
                    f"for upload, limit {self.max_bytes / 2**20:.1f} MiB)"
                )
                raise SpoolError(f"spool {self.directory}: {reason}", reason)
            name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            partial = self.directory / (name + _PARTIAL_SUFFIX)
            try:
                with open(partial, "wb") as handle:
                    handle.write(body)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(partial, self.directory / (name + SEGMENT_SUFFIX))
                _fsync_dir(self.directory)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    partial.unlink()
                raise SpoolError(
                    f"spool {self.directory}: cannot write ({exc})",
                    f"cannot write the local spool ({exc.strerror or type(exc).__name__})",
                ) from None
            self._bytes += len(body)

    def segments(self) -> list[Path]:
        """Complete segments, oldest first (names start with their write time)."""
        return sorted(self.directory.glob("*" + SEGMENT_SUFFIX))

    def read(self, paths: list[Path]) -> list[dict[str, Any]]:
        """The records of `paths`; a segment removed meanwhile (uploaded elsewhere) is skipped."""
        records: list[dict[str, Any]] = []
        for path in paths:
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            records += [json.loads(line) for line in text.splitlines() if line.strip()]
        return records

    def remove(self, paths: list[Path]) -> None:
        """Forget uploaded segments."""
        freed = 0
        for path in paths:
            size = spool_size(path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                freed += size
        with self._lock:
            self._bytes = max(0, self._bytes - freed)
        self._remove_stale_partials()

    def _remove_stale_partials(self) -> None:
        cutoff = time.time() - _STALE_PARTIAL_S
        for path in self.directory.glob("*" + _PARTIAL_SUFFIX):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held while uploading: processes sharing the spool upload one at a time."""
        with open(self.directory / ".upload.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def spool_size(path: Path) -> int:
    """A segment's bytes; 0 once another process uploaded and removed it."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_dir(directory: Path) -> None:
    """The rename itself survives a power cut only once the directory entry is synced."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
