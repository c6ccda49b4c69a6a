"""Drift: do the requests the model answers still look like the audio it was trained on?

What `knd drift report|check` do, end to end: read the bundle's reference and the current
data (`inputs`), judge them (`verdict`, column tests in `drift_stats`) and write the HTML
report (`report`) with the JSON summary beside it. `knd serve` shows the same report
through `report_cache`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from kndcli.config import DriftConfig, KndConfig
from kndcli.monitoring.inputs import bundle_reference, read_log, score_audio
from kndcli.monitoring.report import report_html
from kndcli.monitoring.verdict import DriftInputError, DriftResult, analyze_drift, drift_settings


def run_drift(
    bundle: str | Path,
    cfg: KndConfig | DriftConfig,
    *,
    log: str | Path | None = None,
    audio: str | Path | None = None,
    since: str | datetime | None = None,
    last: int | None = None,
) -> DriftResult:
    """What `knd drift report|check` do: load reference and current data, then analyze."""
    if log is not None and audio is not None:
        raise DriftInputError("pass either --log-sink or --audio, not both")
    reference = bundle_reference(bundle)
    errors: list[str] = []
    if audio is not None:
        if since is not None or last is not None:
            raise DriftInputError("--since and --last select a log window; not with --audio")
        scored = score_audio(
            bundle, audio, getattr(cfg, "inference", None), audio=getattr(cfg, "audio", None)
        )
        current, errors = scored.frame, scored.errors
        source = f"audio folder {audio}"
    else:
        sink = log if log is not None else _default_sink(cfg)
        current = read_log(sink, since=since, last=last)
        window = " ".join(
            part
            for part in (f"since {since}" if since else "", f"last {last}" if last else "")
            if part
        )
        source = f"prediction log {sink}" + (f" ({window})" if window else "")
    result = analyze_drift(reference, current, cfg, source=source)
    if errors:
        result.reason += f"; {len(errors)} unreadable file(s) skipped, first: {errors[0]}"
    return result


def _default_sink(cfg: KndConfig | DriftConfig) -> str:
    return cfg.serve.log_sink if isinstance(cfg, KndConfig) else "predictions.sqlite"


def write_report(
    result: DriftResult,
    html_path: str | Path | None,
    json_path: str | Path | None,
    cfg: DriftConfig | KndConfig | None = None,
) -> dict[str, Path]:
    """Save the Evidently HTML report (self-contained) and the JSON summary beside it.

    When the verdict is cannot-judge there is nothing to plot: the HTML says why instead.
    Without `cfg` the result's own thresholds are used.
    """
    drift_cfg = DriftConfig(**result.thresholds) if cfg is None else drift_settings(cfg)
    written: dict[str, Path] = {}
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        written["json"] = json_path
    if html_path is not None:
        html_path = Path(html_path)
        html_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = html_path.with_name(html_path.name + ".tmp")
        tmp.write_text(report_html(result, drift_cfg), encoding="utf-8")
        tmp.replace(html_path)
        written["html"] = html_path
    return written
