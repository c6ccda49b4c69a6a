"""Compare training configurations with the cross-validation of `bench.accuracy_cv`, in parallel.

Each (configuration, fold) pair trains in its own process, so a machine with many cores
or a GPU runs a whole comparison in the time of one fold. Results stream to a JSON-lines
file as folds finish, so a sweep cut short keeps what it measured.

    uv run python -m bench.accuracy_sweep --parallel 14 --accelerator gpu \\
        base global:model.normalize=global noval:val_actors=0 [--prepared DIR]

A configuration is NAME or NAME:key=value,key=value; `val_actors=0|2` sets its protocol
(default `--val-actors`). Figures from such a sweep rank configurations; the committed
accuracy figure is `bench.accuracy_cv` run on the CPU the issue names.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.accuracy_cv import REPO, WORK, prepare_base, run_fold

RESULTS = REPO / "bench" / "results" / "accuracy_sweep.json"


@dataclass
class Job:
    name: str
    fold: int
    val_actors: int
    overrides: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.name}-f{self.fold}"


def parse_config(spec: str, val_actors: int) -> tuple[str, int, list[str]]:
    """NAME[:key=value,...] -> (name, val_actors, overrides)."""
    name, _, rest = spec.partition(":")
    overrides = [item for item in rest.split(",") if item]
    for item in list(overrides):
        if item.startswith("val_actors="):
            val_actors = int(item.split("=", 1)[1])
            overrides.remove(item)
    if val_actors not in (0, 2):
        raise SystemExit(f"{spec}: val_actors must be 0 or 2")
    return name, val_actors, overrides


def run_jobs(
    jobs: list[Job], base: Path, out: Path, parallel: int, limit_s: float, device: list[str]
) -> None:
    """Run jobs `parallel` at a time; start none that the slowest so far says cannot finish."""
    started_at = time.time()
    logs = WORK / "sweep-logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    durations: list[float] = []
    pending = list(jobs)
    with out.open("a") as sink:
        while pending or running:
            now = time.time() - started_at
            for key, (proc, t0) in list(running.items()):
                if proc.poll() is None and now < limit_s:
                    continue
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                text = (logs / f"{key}.log").read_text(errors="replace")
                lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
                if lines:
                    row = json.loads(lines[-1][len("RESULT ") :])
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
                    durations.append(time.time() - t0)
                    print(f"{now:6.0f}s {key}: accuracy {row['accuracy']:.3f}", flush=True)
                else:
                    print(f"{now:6.0f}s {key} FAILED:\n{text[-2000:]}", flush=True)
                del running[key]
            expected = max(durations, default=0.0)
            while pending and len(running) < parallel and now + expected < limit_s:
                job = pending.pop(0)
                child = {
                    "name": job.name,
                    "fold": job.fold,
                    "val_actors": job.val_actors,
                    "overrides": device + job.overrides,
                    "base": str(base),
                }
                handle = (logs / f"{job.key}.log").open("w")
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bench.accuracy_sweep", "--child", json.dumps(child)],
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=REPO,
                )
                handle.close()
                running[job.key] = (proc, time.time())
            if pending and not running:
                print(f"stopped: {len(pending)} jobs would not finish in --limit-s", flush=True)
                return
            time.sleep(1)


def child(spec: str) -> None:
    job = json.loads(spec)
    row = run_fold(
        Path(job["base"]),
        job["fold"],
        WORK / "sweep",
        val_actors=job["val_actors"],
        budget_min=600.0,
        overrides=job["overrides"],
        name=f"{job['name']}-f",
    )
    row.update(name=job["name"], overrides=job["overrides"])
    print("RESULT " + json.dumps(row), flush=True)


def summarize(rows: list[dict], device: str) -> dict:
    """Mean and spread per configuration, over the folds that finished."""
    configs: dict[str, list[dict]] = {}
    for row in rows:
        configs.setdefault(row["name"], []).append(row)
    table = {}
    for name, folds in configs.items():
        folds.sort(key=lambda r: r["fold"])
        acc = [100 * r["accuracy"] for r in folds]
        table[name] = {
            "overrides": folds[0]["overrides"],
            "val_actors": len(folds[0]["val_actors"]),
            "folds": [r["fold"] for r in folds],
            "accuracy": [round(a, 1) for a in acc],
            "accuracy_mean": round(statistics.fmean(acc), 1),
            "macro_f1_mean": round(statistics.fmean(100 * r["macro_f1"] for r in folds), 1),
            "uar_mean": round(statistics.fmean(100 * r["uar"] for r in folds), 1),
        }
    return {"name": "accuracy_sweep", "device": device, "configs": table}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=["base"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folds", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--val-actors", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--limit-s", type=float, default=3600.0)
    parser.add_argument("--prepared", type=Path, help="an already prepared RAVDESS 01-16 set")
    parser.add_argument("--out", type=Path, default=WORK / "sweep.jsonl")
    parser.add_argument("--summary", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return
    device = [f"train.trainer.accelerator={args.accelerator}"]
    if args.accelerator == "gpu":
        # fp32 as on the CPU: the sweep ranks configurations for a CPU recipe.
        device += ["train.trainer.devices=1", "train.trainer.precision=32-true"]
    jobs = [
        Job(name, fold, val_actors, overrides)
        for name, val_actors, overrides in (
            parse_config(spec, args.val_actors) for spec in args.configs
        )
        for fold in args.folds
    ]
    base = args.prepared or prepare_base()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run_jobs(jobs, base, args.out, args.parallel, args.limit_s, device)
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    summary = summarize(rows, args.accelerator)
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2))
    for name, row in summary["configs"].items():
        print(f"{name:12s} {row['accuracy_mean']:5.1f} %  folds {row['accuracy']}")


if __name__ == "__main__":
    main()
