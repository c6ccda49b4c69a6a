"""Benchmark: how long `knd drift report` takes for 10,000 logged requests.

The log is synthesised from real feature distributions: RAVDESS actors 01-10 are the
training reference, 11-12 the validation reference, and 10,000 records are drawn (with a
little jitter) from actors 13-16 and written to a real SQLite prediction log. Predicted
labels and confidences are synthetic (no trained model is needed to time the report).

    uv run python bench/drift_report.py [--records 10000] [--out bench/results/drift_report.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RAVDESS

REPO = Path(__file__).resolve().parents[1]


def _features(actors: range) -> list[dict[str, float]]:
    from kndcli.audio import audio_features, decode, find_audio_files

    paths = find_audio_files([RAVDESS / f"Actor_{a:02d}" for a in actors])
    return [audio_features(decode(p)) for p in paths]


def main(records: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Build the log, then time reading it, the analysis and the HTML/JSON report."""
    from kndcli.audio import FEATURE_NAMES
    from kndcli.config import LABELS, DriftConfig
    from kndcli.monitoring.predlog import open_log, prediction_record
    from kndcli.monitoring.reference import build_reference

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    train, val, pool = _features(range(1, 11)), _features(range(11, 13)), _features(range(13, 17))
    feature_s = time.perf_counter() - t0
    reference = build_reference(
        train,
        ["?"] * len(train),
        val,
        ["?"] * len(val),
        list(rng.choice(LABELS, len(val))),
        list(rng.beta(4, 3, len(val))),
    )
    start = datetime.now(UTC) - timedelta(hours=23)
    rows = []
    for i in range(records):
        base = pool[int(rng.integers(len(pool)))]
        jitter = {k: v * (1 + 0.01 * rng.standard_normal()) for k, v in base.items()}
        for exact in ("sample_rate", "channels", "clipping_ratio"):
            jitter[exact] = base[exact]
        rows.append(
            prediction_record(
                request_id=uuid.uuid4().hex,
                model_version="bench@0",
                label=str(rng.choice(LABELS)),
                confidence=float(rng.beta(4, 3)),
                latency_ms=float(rng.gamma(4, 5)),
                filename=f"clip{i}.wav",
                features={k: jitter[k] for k in FEATURE_NAMES},
                ts=(start + timedelta(seconds=8 * i)).isoformat(),
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "predictions.sqlite"
        t0 = time.perf_counter()
        with open_log(db) as log:
            log.write(rows)
        write_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        import evidently  # noqa: F401  (timed on its own: a cold import dominates one run)

        import_s = time.perf_counter() - t0
        from kndcli.monitoring.drift import write_report
        from kndcli.monitoring.inputs import read_log
        from kndcli.monitoring.verdict import analyze_drift

        cfg = DriftConfig()
        t0 = time.perf_counter()
        current = read_log(db, since="24h")
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = analyze_drift(reference, current, cfg, source=str(db))
        analyze_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        written = write_report(result, Path(tmp) / "drift.html", Path(tmp) / "drift.json", cfg)
        report_s = time.perf_counter() - t0
        html_mb = written["html"].stat().st_size / 1e6
    return {
        "records": len(current),
        "reference_rows": result.reference_rows,
        "verdict": result.verdict,
        "drifted_columns": result.drifted,
        "feature_extraction_s": round(feature_s, 2),
        "log_write_s": round(write_s, 3),
        "evidently_import_s": round(import_s, 2),
        "log_read_s": round(read_s, 3),
        "analyze_s": round(analyze_s, 3),
        "report_html_json_s": round(report_s, 2),
        "total_report_s": round(read_s + analyze_s + report_s, 2),
        "html_mb": round(html_mb, 2),
        "machine": f"{platform.machine()} {platform.python_version()}, shared 2-core CPU",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "drift_report.json"
    )
    args = parser.parse_args()
    figures = main(args.records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
