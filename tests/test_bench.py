"""The bench suite: statistics, the docs table, the load generator, and quick runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from bench.common import Figure, percentile, stats
from bench.loadgen import run_load
from bench.report import load_results, render

REPO = Path(__file__).resolve().parents[1]


def test_stats_and_percentile() -> None:
    s = stats([3.0, 1.0, 2.0, 4.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["n"] == 4
    assert len(s["iqr"]) == 2
    assert stats([])["median"] is None
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([1.0, 2.0, 3.0], 99) == 3.0


def test_figure_ratio_and_target() -> None:
    lower = Figure("t", "s", "lower", stats([0.5]), stats([5.0]), target=0.6).to_dict()
    assert lower["ratio"] == pytest.approx(10.0) and lower["met"] is True
    assert lower["target"] == "< 0.6 s"
    higher = Figure("r", "req/s", "higher", stats([100.0]), stats([1.0]), target=200).to_dict()
    assert higher["ratio"] == pytest.approx(100.0) and higher["met"] is False
    alone = Figure("d", "s", "lower", stats([1.0])).to_dict()
    assert alone["ratio"] is None and alone["met"] is None


def test_render_table(tmp_path: Path) -> None:
    doc = {
        "name": "predict_cold",
        "quick": False,
        "repetitions": 3,
        "seconds": 1.0,
        "machine": {"cpu": "X", "cores": 2, "date": "today"},
        "figures": [
            Figure(
                "cold", "s", "lower", stats([0.4, 0.5, 0.6]), stats([6.0]), "vgg", target=0.6
            ).to_dict()
        ],
        "notes": ["a note"],
    }
    (tmp_path / "predict_cold.json").write_text(json.dumps(doc))
    (tmp_path / "drift_report.json").write_text(json.dumps({"records": 1}))
    results = load_results(tmp_path)
    assert [r["name"] for r in results] == ["predict_cold"]
    text = render(results)
    assert "| predict_cold | cold | 0.5 s [0.4-0.6] | 6 s | x12.0 | < 0.6 s | yes |" in text
    assert "a note" in text and "X, 2 cores" in text


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        code = 200 if self.path == "/ok" else 422
        body = b'{"ok": true}'
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_loadgen_counts_requests_and_errors() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        ok = run_load(
            port,
            [(b"x" * 1000, "audio/wav")],
            path="/ok",
            clients=4,
            duration_s=None,
            max_requests=20,
        )
        assert ok["ok"] == 20 and ok["errors"] == 0 and ok["requests"] == 20
        assert ok["p50_ms"] > 0 and ok["p99_ms"] >= ok["p50_ms"]
        bad = run_load(
            port, [(b"x", "audio/wav")], path="/bad", clients=2, duration_s=None, max_requests=4
        )
        assert bad["ok"] == 0 and bad["errors"] == 4 and bad["status_codes"] == {"422": 4}
    finally:
        server.shutdown()


def test_open_loop_arrivals_do_not_wait_for_answers() -> None:
    from bench.loadgen import run_open_loop

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        started = time.perf_counter()
        run = run_open_loop(
            port,
            [(b"x" * 1000, "audio/wav")],
            rate=60.0,
            duration_s=1.0,
            hostile=[("stalled upload", b"y" * 1000, "audio/wav")],
            hostile_share=0.2,
            path="/ok",
            timeout_s=1.0,
        )
        elapsed = time.perf_counter() - started
    finally:
        server.shutdown()
    total = run["good_requests"] + sum(run["hostile"]["stalled upload"].values())
    assert 30 <= total <= 100  # Poisson arrivals at 60/s for 1 s
    assert run["good_errors"] == 0 and run["good_ok"] == run["good_requests"] > 0
    # The echo server waits forever for a stalled body: the client gives up and says so.
    assert run["hostile"]["stalled upload"] == {"held": total - run["good_requests"]}
    assert run["p99_ms"] >= run["p50_ms"] > 0 and run["p999_ms"] >= run["p99_ms"]
    assert elapsed < 1.0 + 1.0 + 1.0  # the run, the last stalled hold, and slack


def _run_bench(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _check_result(path: Path, name: str) -> dict:
    doc = json.loads(path.read_text())
    assert doc["name"] == name and doc["quick"] is True
    assert {"cpu", "cores", "memory_gb", "python", "torch", "onnxruntime", "date"} <= set(
        doc["machine"]
    )
    for fig in doc["figures"]:
        assert fig["value"]["median"] is not None and fig["value"]["n"] >= 1
        assert {"baseline", "ratio", "target", "met", "unit", "better"} <= set(fig)
    return doc


def test_quick_prepare(ravdess_root: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    _run_bench(
        ["--only", "prepare", "--results", str(results), "--work", str(tmp_path / "w")], timeout=300
    )
    doc = _check_result(results / "prepare.json", "prepare")
    (fig,) = doc["figures"]
    assert fig["baseline"]["median"] > 0 and fig["ratio"] > 0
    assert fig["target"] == "< 20 s"
    table = (results / "benchmarks.md").read_text()
    assert "| prepare (quick) |" in table


@pytest.mark.slow
def test_quick_suite_end_to_end(ravdess_root: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """Every benchmark in quick mode (uses bench/work for the 560 MB course checkpoint)."""
    results = tmp_path / "results"
    _run_bench(["--model", str(tiny_bundle), "--results", str(results)], timeout=600)
    names = ("prepare", "train", "predict_cold", "predict_dir", "predict_archive", "serve", "drift")
    for name in names:
        _check_result(results / f"{name}.json", name)
    serve = json.loads((results / "serve.json").read_text())
    assert serve["details"]["rounds"][0]["ok"] > 0
    openloop = _check_result(results / "serve_openloop.json", "serve_openloop")
    hostile = openloop["details"]["runs"]["hostile 70%"]
    assert hostile["good_ok"] > 0
    refused = {k: v for k, v in hostile["hostile"].items() if k != "stalled upload"}
    assert all(set(codes) <= {"413", "415", "422"} for codes in refused.values()), refused


@pytest.mark.parametrize(("folds", "val_actors"), [(4, 0), (4, 2), (8, 0)])
def test_cross_validation_tests_every_actor_once(folds: int, val_actors: int) -> None:
    from bench.accuracy_cv import fold_speakers

    tested = []
    for fold in range(folds):
        test, val = fold_speakers(fold, folds, val_actors)
        assert len(val) == val_actors and not set(val) & set(test)
        assert sum(int(a) % 2 for a in test) == len(test) // 2  # as many men as women
        tested += test
    assert sorted(tested) == [f"{i:02d}" for i in range(1, 17)]


def test_sweep_configurations_and_summary() -> None:
    from bench.accuracy_sweep import parse_config, summarize

    assert parse_config("base", 2) == ("base", 2, [])
    assert parse_config("g:model.normalize=global,val_actors=0", 2) == (
        "g",
        0,
        ["model.normalize=global"],
    )
    with pytest.raises(SystemExit, match="val_actors"):
        parse_config("x:val_actors=3", 0)
    rows = [
        {
            "name": "g",
            "fold": f,
            "val_actors": [],
            "overrides": [],
            "accuracy": a,
            "macro_f1": a,
            "uar": a,
        }
        for f, a in [(1, 0.5), (0, 0.7)]
    ]
    summary = summarize(rows, "cpu")["configs"]["g"]
    assert summary["folds"] == [0, 1] and summary["accuracy"] == [70.0, 50.0]
    assert summary["accuracy_mean"] == 60.0 and summary["val_actors"] == 0


def test_robustness_summary_pools_ece_over_folds_and_judges_the_reference_drop():
    from bench.accuracy_cv import pooled_ece, summarize_robustness

    def row(condition, family, accuracy, count, confidence, hits, reference=False):
        return {
            "condition": condition, "family": family, "level": None, "reference": reference,
            "accuracy": accuracy, "macro_f1": accuracy, "uar": accuracy,
            "bins": {"count": count, "confidence": confidence, "accuracy": hits},
        }  # fmt: skip

    folds = [
        {"robustness": [row("clean", "clean", 0.7, [10, 0], [0.4, 0.0], [0.5, 0.0]),
                        row("white 10 dB SNR", "white", 0.6, [10, 0], [0.5, 0], [0.5, 0], True)]},
        {"robustness": [row("clean", "clean", 0.5, [0, 30], [0.0, 0.9], [0.0, 0.8]),
                        row("white 10 dB SNR", "white", 0.5, [0, 30], [0, 0.8], [0, 0.8], True)]},
    ]  # fmt: skip
    # Clean: |5 - 4| over the first fold's 10 clips, |24 - 27| over the second's 30.
    assert pooled_ece(folds[0]["robustness"][:1] + folds[1]["robustness"][:1]) == pytest.approx(
        4 / 40
    )
    summary = summarize_robustness(folds)
    white = summary["conditions"][1]
    assert white["drop"] == pytest.approx(0.6 - 0.55) and white["ece"] == 0.0

    def expected_gap(n, p):  # E|hits/n - p| for a calibrated bin, by enumeration
        chances = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
        return sum(c * abs(k / n - p) for k, c in enumerate(chances))

    # White is perfectly calibrated here, yet a calibrated model would measure this much.
    floor = (10 * expected_gap(10, 0.5) + 30 * expected_gap(30, 0.8)) / 40
    assert white["ece_if_calibrated"] == pytest.approx(floor) and floor > 0.05
    drop, clean_ece, worst_ece = summary["figures"]
    assert drop["met"] and not clean_ece["met"] and not worst_ece["met"]
