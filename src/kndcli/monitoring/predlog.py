"""The prediction log: one row per answered request, read back by `knd drift`.

Two sinks behind one interface. SQLite (default) is for a single machine: WAL mode and a
busy timeout make it safe for several uvicorn workers writing at once, the request id is
the primary key, so a retried write never logs a request twice, and one deadline covers
each whole write. `gs://bucket/prefix` is for Cloud Run, whose local disk dies with the
instance: records go to a local write-ahead spool first (fsynced; `monitoring/spool.py`)
and are uploaded as JSON-lines objects, one per flush, under `prefix/YYYY/MM/DD/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from kndcli.audio import FEATURE_NAMES
from kndcli.errors import KndError
from kndcli.gcs import gcs_filesystem
from kndcli.monitoring.spool import Spool, SpoolError, default_spool_dir, spool_size

log = logging.getLogger(__name__)

BASE_COLUMNS: tuple[str, ...] = (
    "request_id",
    "ts",
    "model_version",
    "label",
    "confidence",
    "latency_ms",
    "duration_s",
    "filename",
)
# duration_s is both a base field and a feature; it is stored once.
LOG_COLUMNS: tuple[str, ...] = BASE_COLUMNS + tuple(
    name for name in FEATURE_NAMES if name not in BASE_COLUMNS
)
_TEXT_COLUMNS = {"request_id", "ts", "model_version", "label", "filename"}
DEFAULT_SINK = "predictions.sqlite"


class PredictionLogError(KndError):
    """The prediction log cannot be opened, written or read.

    `reason` is the problem without where the log is (path, bucket, spool folder): what
    a client answered 503 may be told. None: nothing beyond "unavailable".
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


def utc_now() -> str:
    """The log's timestamp format: ISO-8601 UTC with microseconds, so text order is time order."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def safe_filename(name: str | None) -> str:
    """The last path component only: the log never stores a client's or server's paths."""
    if not name:
        return ""
    return PureWindowsPath(PurePosixPath(name).name).name[:255]


def prediction_record(
    *,
    request_id: str,
    model_version: str,
    label: str,
    confidence: float,
    latency_ms: float,
    filename: str | None,
    features: dict[str, float],
    ts: str | None = None,
) -> dict[str, Any]:
    """One log record in the LOG_COLUMNS layout (what `write` expects and `read` returns)."""
    record: dict[str, Any] = {
        "request_id": request_id,
        "ts": ts or utc_now(),
        "model_version": model_version,
        "label": label,
        "confidence": float(confidence),
        "latency_ms": float(latency_ms),
        "filename": safe_filename(filename),
    }
    for name in FEATURE_NAMES:
        value = features.get(name)
        record[name] = None if value is None else float(value)
    return _normalise(record)


def _normalise(record: dict[str, Any]) -> dict[str, Any]:
    """Exactly LOG_COLUMNS, with numbers as plain floats; a record needs a request id."""
    if not record.get("request_id"):
        raise PredictionLogError("prediction log record has no request_id")
    out: dict[str, Any] = {}
    for name in LOG_COLUMNS:
        value = record.get(name)
        if value is not None and name not in _TEXT_COLUMNS:
            value = float(value)
        elif value is not None:
            value = str(value)
        out[name] = value
    if out["ts"] is None:
        out["ts"] = utc_now()
    else:
        try:
            out["ts"] = _iso(datetime.fromisoformat(out["ts"]))
        except ValueError:
            raise PredictionLogError(
                f"prediction log record {out['request_id']}: ts {out['ts']!r} is not ISO-8601"
            ) from None
    out["filename"] = safe_filename(out["filename"])
    return out


class PredictionLog:
    """Where served predictions go. Subclasses: SQLitePredictionLog, GCSPredictionLog."""

    sink: str

    def write(self, records: list[dict[str, Any]]) -> None:
        """Store records; one already stored (same request_id) is ignored."""
        raise NotImplementedError

    def read(self, since: datetime | None = None, last: int | None = None) -> list[dict[str, Any]]:
        """Records oldest first: those at or after `since`, then only the newest `last`."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make buffered records durable (a no-op where writes are immediate)."""

    def close(self) -> None:
        """Flush and release the sink."""

    def __enter__(self) -> PredictionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_log(
    sink: str | os.PathLike | None = None,
    *,
    flush_s: float = 10.0,
    timeout_s: float = 30.0,
    spool: str | os.PathLike | None = None,
    spool_mb: float = 64.0,
) -> PredictionLog:
    """A SQLite file path (default `predictions.sqlite`) or `gs://bucket/prefix`.

    `timeout_s` bounds one SQLite write; `spool` and `spool_mb` are the gs:// sink's
    write-ahead spool (None: one per sink under the temporary directory).
    """
    text = str(sink or DEFAULT_SINK)
    if text.startswith("gs://"):
        return GCSPredictionLog(
            text, flush_s=flush_s, spool=spool, spool_bytes=int(spool_mb * 2**20)
        )
    if "://" in text:
        raise PredictionLogError(
            f"prediction log sink {text!r}: use a SQLite file path or gs://bucket/prefix"
        )
    return SQLitePredictionLog(text, timeout_s=timeout_s)


def _filter(
    records: list[dict[str, Any]], since: datetime | None, last: int | None
) -> list[dict[str, Any]]:
    if since is not None:
        cutoff = _iso(since)
        records = [r for r in records if r["ts"] >= cutoff]
    records.sort(key=lambda r: (r["ts"], r["request_id"]))
    if last is not None:
        records = records[-last:] if last > 0 else []
    return records


# ----------------------------------------------------------------------------- SQLite


class SQLitePredictionLog(PredictionLog):
    """One table, request_id primary key, WAL: concurrent writers wait instead of failing.

    A write waits at most `timeout_s` in all, for this process's other writers and for
    another process's lock together: requests queued behind a held lock each fail at their
    own deadline, instead of each waiting a full busy timeout after the one before.
    """

    TABLE = "predictions"

    def __init__(self, path: str | os.PathLike, timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.sink = str(self.path)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        try:
            if self.path.parent != Path(""):
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path,
                timeout=timeout_s,
                check_same_thread=False,
                isolation_level=None,
            )
            self._conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            columns = ", ".join(
                f"{name} TEXT" if name in _TEXT_COLUMNS else f"{name} REAL"
                for name in LOG_COLUMNS
                if name != "request_id"
            )
            self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.TABLE} (request_id TEXT PRIMARY KEY, {columns})"
            )
            self._conn.execute(f"CREATE INDEX IF NOT EXISTS {self.TABLE}_ts ON {self.TABLE}(ts)")
            self._check_columns()
        except sqlite3.Error as exc:
            raise PredictionLogError(f"{self.path}: cannot open prediction log ({exc})") from None

    def _check_columns(self) -> None:
        have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({self.TABLE})")}
        missing = [name for name in LOG_COLUMNS if name not in have]
        for name in missing:  # a log written by an older knd gains new feature columns
            kind = "TEXT" if name in _TEXT_COLUMNS else "REAL"
            self._conn.execute(f"ALTER TABLE {self.TABLE} ADD COLUMN {name} {kind}")

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        rows = [tuple(_normalise(r)[name] for name in LOG_COLUMNS) for r in records]
        marks = ", ".join("?" for _ in LOG_COLUMNS)
        sql = f"INSERT OR IGNORE INTO {self.TABLE} ({', '.join(LOG_COLUMNS)}) VALUES ({marks})"
        deadline = time.monotonic() + self.timeout_s
        if not self._lock.acquire(timeout=self.timeout_s):
            raise self._too_slow()
        try:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                raise self._too_slow()
            try:
                self._conn.execute(f"PRAGMA busy_timeout = {remaining_ms}")
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.executemany(sql, rows)
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                busy = isinstance(exc, sqlite3.OperationalError) and (
                    "locked" in str(exc) or "busy" in str(exc)
                )
                if busy:
                    raise self._too_slow() from None
                raise PredictionLogError(
                    f"{self.path}: cannot write prediction log ({exc})", f"cannot write ({exc})"
                ) from None
        finally:
            self._lock.release()

    def _too_slow(self) -> PredictionLogError:
        reason = (
            f"locked by another writer for more than {self.timeout_s:g} s (serve.log_timeout_s)"
        )
        return PredictionLogError(f"{self.path}: {reason}", reason)

    def read(self, since: datetime | None = None, last: int | None = None) -> list[dict[str, Any]]:
        where, params = "", []
        if since is not None:
            where, params = " WHERE ts >= ?", [_iso(since)]
        sql = f"SELECT {', '.join(LOG_COLUMNS)} FROM {self.TABLE}{where}"
        if last is not None:
            sql += " ORDER BY ts DESC, request_id DESC LIMIT ?"
            params.append(max(0, int(last)))
        with self._lock:
            try:
                rows = self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise PredictionLogError(
                    f"{self.path}: cannot read prediction log ({exc})"
                ) from None
        records = [dict(zip(LOG_COLUMNS, row, strict=True)) for row in rows]
        records.sort(key=lambda r: (r["ts"], r["request_id"]))
        return records

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute(f"SELECT COUNT(*) FROM {self.TABLE}").fetchone()[0])

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._conn.close()


# ----------------------------------------------------------------------------- GCS


class GCSPredictionLog(PredictionLog):
    """JSON-lines objects under gs://bucket/prefix/YYYY/MM/DD/, one per flush.

    `write` returns once the records are fsynced in the local spool; a background thread
    uploads the spool every `flush_s` (0: only on `flush` and `close`), starting at once,
    so segments a crashed process left behind are sent by the next one. An object written
    twice (a crash between upload and delete) is harmless: reads keep one record per id.
    """

    # One object holds at most this much; a long outage's backlog goes up in several.
    MAX_OBJECT_BYTES = 16 * 2**20

    def __init__(
        self,
        sink: str,
        *,
        flush_s: float = 10.0,
        fs: Any = None,
        spool: str | os.PathLike | None = None,
        spool_bytes: int = 64 * 2**20,
    ) -> None:
        if not sink.startswith("gs://") or not sink[5:].strip("/"):
            raise PredictionLogError(f"prediction log sink {sink!r}: expected gs://bucket/prefix")
        self.sink = sink.rstrip("/")
        self.root = self.sink[5:]
        self.flush_s = flush_s
        if fs is None:
            try:
                fs = gcs_filesystem("a gs:// prediction log")
            except KndError as exc:
                raise PredictionLogError(str(exc)) from None
        self.fs = fs
        try:
            self.spool = Spool(spool or default_spool_dir(self.sink), spool_bytes)
        except OSError as exc:
            raise PredictionLogError(f"{self.sink}: cannot open the local spool ({exc})") from None
        self._io_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if flush_s > 0:
            self._thread = threading.Thread(
                target=self._flush_loop, name="knd-predlog-flush", daemon=True
            )
            self._thread.start()

    def _flush_loop(self) -> None:
        while True:
            try:
                self.flush()
            except PredictionLogError as exc:
                log.warning("%s (will retry)", exc)
            if self._stop.wait(self.flush_s):
                return

    def write(self, records: list[dict[str, Any]]) -> None:
        normalised = [_normalise(r) for r in records]
        if not normalised:
            return
        try:
            self.spool.append(normalised)
        except SpoolError as exc:
            raise PredictionLogError(f"{self.sink}: {exc}", exc.reason) from None

    @property
    def pending_bytes(self) -> int:
        """Bytes in the spool not yet uploaded."""
        return self.spool.pending_bytes

    def flush(self) -> None:
        """Upload every spooled segment, oldest first; on failure they stay for a retry."""
        with self._io_lock, self.spool.exclusive():
            segments = self.spool.segments()
            while segments:
                batch, size = [], 0
                while segments and (not batch or size < self.MAX_OBJECT_BYTES):
                    path = segments.pop(0)
                    batch.append(path)
                    size += spool_size(path)
                self._upload(batch)

    def _upload(self, segments: list[Path]) -> None:
        records = self.spool.read(segments)
        if records:
            now = datetime.now(UTC)
            name = f"{now:%Y/%m/%d}/{now:%H%M%S%f}-{uuid.uuid4().hex}.jsonl"
            body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
            try:
                self.fs.pipe_file(f"{self.root}/{name}", body.encode())
            except Exception as exc:  # network, auth, bucket: the spool keeps them
                raise PredictionLogError(
                    f"{self.sink}: cannot write prediction log object ({exc}); "
                    f"{self.spool.pending_bytes / 2**20:.1f} MiB wait in {self.spool.directory}"
                ) from None
        self.spool.remove(segments)

    def read(self, since: datetime | None = None, last: int | None = None) -> list[dict[str, Any]]:
        self.flush()
        try:
            paths = [p for p in self.fs.find(self.root) if p.endswith(".jsonl")]
        except FileNotFoundError:
            paths = []
        except Exception as exc:
            raise PredictionLogError(f"{self.sink}: cannot list prediction log ({exc})") from None
        if since is not None:
            day = _iso(since)[:10].replace("-", "/")
            paths = [p for p in paths if p[len(self.root) + 1 :][:10] >= day]
        if not paths:
            return []
        try:
            blobs = self.fs.cat(paths)
        except Exception as exc:
            raise PredictionLogError(f"{self.sink}: cannot read prediction log ({exc})") from None
        seen: dict[str, dict[str, Any]] = {}
        for path in sorted(blobs):
            for line in blobs[path].decode().splitlines():
                if not line.strip():
                    continue
                try:
                    record = _normalise(json.loads(line))
                except (ValueError, PredictionLogError):
                    log.warning("%s: skipping a malformed prediction log line", path)
                    continue
                seen.setdefault(record["request_id"], record)
        return _filter(list(seen.values()), since, last)

    def close(self) -> None:
        """Stop the uploader and upload what is spooled; what fails stays for the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        try:
            self.flush()
        except PredictionLogError as exc:
            log.error("%s: the next start with this spool uploads them", exc)
