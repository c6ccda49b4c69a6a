"""Shared pieces of the bench suite: paths, statistics, figures, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def shared_ravdess() -> Path:
    """shared/data/ravdess beside this checkout, or beside the local repository it was
    cloned from (a CI clone in a temporary directory)."""
    import subprocess

    beside = REPO.parent / "shared" / "data" / "ravdess"
    origin = subprocess.run(
        ["git", "-C", str(REPO), "config", "--get", "remote.origin.url"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if beside.is_dir() or not origin or "://" in origin:
        return beside
    return Path(origin).resolve().parent / "shared" / "data" / "ravdess"


RAVDESS = shared_ravdess()
WORK = REPO / "bench" / "work"  # git-ignored: prepared data, bundles, the course checkpoint
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs" / "benchmarks.md"


def stats(values: list[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements (min/max and, from 4 values, the IQR)."""
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None, "values": []}
    ordered = sorted(values)
    out: dict[str, Any] = {
        "n": len(values),
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "values": [round(v, 6) for v in values],
    }
    if len(values) >= 4:
        q = statistics.quantiles(ordered, n=4)
        out["iqr"] = [q[0], q[2]]
    return out


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: with few samples p99 is the slowest one, not an interpolation."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(-(-p * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Figure:
    """One benchmarked quantity, measured side by side with its baseline in the same run.

    `ratio` is always "times better than the baseline": baseline/value when lower is better,
    value/baseline when higher is better.
    """

    figure: str
    unit: str
    better: str  # "lower" or "higher"
    value: dict[str, Any]
    baseline: dict[str, Any] | None = None
    baseline_desc: str = ""
    target: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        v = self.value.get("median")
        b = (self.baseline or {}).get("median")
        ratio = None
        if v is not None and b is not None and v > 0 and b > 0:
            ratio = b / v if self.better == "lower" else v / b
        met = None
        if self.target is not None and v is not None:
            met = v < self.target if self.better == "lower" else v >= self.target
        return {
            "figure": self.figure,
            "unit": self.unit,
            "better": self.better,
            "value": self.value,
            "baseline": self.baseline,
            "baseline_desc": self.baseline_desc,
            "ratio": ratio,
            "target": None
            if self.target is None
            else f"{'<' if self.better == 'lower' else '>='} {self.target:g} {self.unit}",
            "target_value": self.target,
            "met": met,
            "note": self.note,
        }


@dataclass
class BenchResult:
    name: str
    figures: list[Figure]
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for module in ("torch", "torchaudio", "torchvision", "onnxruntime", "numpy", "soxr"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # a missing optional package is recorded, not fatal
            info[module] = None
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        info["gpu"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def knd_command() -> list[str]:
    """The installed `knd` console script, as a user runs it (no `uv run` on top)."""
    script = Path(sys.executable).with_name("knd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kndcli"]


def timed_run(cmd: list[str], *, timeout: float = 600, env: dict | None = None) -> float:
    """Wall seconds of a whole process; fails loudly with its stderr if it fails."""
    start = time.perf_counter()
    done = subprocess.run(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
        env=env,
        cwd=REPO,
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {done.returncode}: {tail}")
    return seconds


def bench_env() -> dict[str, str]:
    """Environment for subprocesses: the repo importable (for `python -m bench.course`)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("WANDB_MODE", "offline")
    return env


# Run through a small Python process: a child forked from a big one (torch loaded) would
# count its parent's pages in its own peak memory until it execs.
_PEAK = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL); "
    "s = time.perf_counter() - t; m = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
    "print(s, m / 1024); sys.stdout.write(r.stdout.decode())"
)


def run_peak(cmd: list[str], timeout: float = 600) -> tuple[float, float, str]:
    """Wall seconds, peak resident memory (MB) and stdout of one command."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, *cmd],
        capture_output=True,
        text=True,
        env=bench_env(),
        timeout=timeout,
    )
    head, _, out = done.stdout.partition("\n")
    seconds, peak = map(float, head.split())
    return seconds, peak, out
