"""The drift report `knd serve` shows at `GET /monitoring`, cached per bundle and log.

Drawing a report takes seconds (Evidently), far too long for every request: the page is
built once, then answered from memory and rebuilt in one background thread when stale.
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kndcli.config import DriftConfig, KndConfig
from kndcli.errors import KndError
from kndcli.monitoring.inputs import bundle_reference, current_frame, parse_since, read_log
from kndcli.monitoring.report import plain_page, report_html
from kndcli.monitoring.verdict import analyze_drift, drift_settings


@dataclass
class _CacheEntry:
    html: str = ""
    built: float = 0.0
    building: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


_CACHE: dict[tuple[str, str], _CacheEntry] = {}
_CACHE_LOCK = threading.Lock()


def cached_report_html(
    bundle: Any,
    log: Any,
    cfg: KndConfig | DriftConfig,
    max_age_s: float,
    *,
    since: str | None = "24h",
    last: int | None = None,
) -> str:
    """The latest report for `GET /monitoring`, rebuilt in the background when stale.

    The first call builds it (the caller waits); later calls answer from the cache at once
    and, when it is older than `max_age_s`, start one background rebuild. `bundle` is a
    path or a loaded Bundle; `log` a sink or an open PredictionLog.
    """
    from kndcli.inference.bundle import Bundle

    bundle_path = str(bundle.root if isinstance(bundle, Bundle) else bundle)
    sink = str(log.sink if hasattr(log, "read") else log)
    with _CACHE_LOCK:
        entry = _CACHE.setdefault((bundle_path, sink), _CacheEntry())
    if not entry.html:
        with entry.lock:
            if not entry.html:
                entry.html = _build_html(bundle_path, log, cfg, since, last)
                entry.built = time.monotonic()
        return entry.html
    if time.monotonic() - entry.built >= max_age_s:
        with entry.lock:
            start = not entry.building
            entry.building = True
        if start:

            def rebuild() -> None:
                try:
                    entry.html = _build_html(bundle_path, log, cfg, since, last)
                    entry.built = time.monotonic()
                finally:
                    entry.building = False

            threading.Thread(target=rebuild, name="knd-drift-report", daemon=True).start()
    return entry.html


def _build_html(
    bundle: str, log: Any, cfg: KndConfig | DriftConfig, since: str | None, last: int | None
) -> str:
    drift_cfg = drift_settings(cfg)
    try:
        reference = bundle_reference(bundle)
        if hasattr(log, "read"):
            current = current_frame(log.read(since=parse_since(since), last=last))
            source = f"prediction log {log.sink}"
        else:
            current = read_log(log, since=since, last=last)
            source = f"prediction log {log}"
        window = f" (since {since})" if since else ""
        result = analyze_drift(reference, current, drift_cfg, source=source + window)
        return report_html(result, drift_cfg)
    except KndError as exc:
        return plain_page(
            "<div id='knd-verdict'>"
            f"<h2>knd drift: cannot-judge</h2><p>{html.escape(str(exc))}</p></div>"
        )


def clear_report_cache() -> None:
    """Forget cached reports (tests; a redeployed bundle)."""
    with _CACHE_LOCK:
        _CACHE.clear()
