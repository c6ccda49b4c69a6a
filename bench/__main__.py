"""Run the bench suite: `uv run python -m bench [--quick] [--only NAME ...]`.

Each benchmark measures a knd figure and its course-project baseline in the same run and
writes `bench/results/<name>.json`; `docs/benchmarks.md` is then regenerated from every
result file present, so `--only` refreshes some rows and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from bench.cases import BENCHMARKS, Context
from bench.common import DOCS, RESULTS, WORK, machine
from bench.report import write_docs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny subsets, one repetition: a CI smoke run, numbers not judged",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"run only these ({', '.join(BENCHMARKS)})",
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions per measurement (default 3, quick 1)"
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="bundle to benchmark (default models/latest, else train one)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where JSON goes")
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="markdown table to write (default docs/benchmarks.md with the "
        "default --results, else RESULTS/benchmarks.md)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=WORK,
        help="cache for prepared data, bundle and the course checkpoint",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.only or list(BENCHMARKS)
    ctx = Context(quick=args.quick, reps=args.reps, model=args.model, work=args.work)
    args.results.mkdir(parents=True, exist_ok=True)
    host = machine()
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            result = BENCHMARKS[name](ctx)
        except Exception:
            failed.append(name)
            traceback.print_exc()
            continue
        doc = {
            "name": name,
            "quick": args.quick,
            "repetitions": ctx.reps,
            "seconds": round(time.perf_counter() - started, 2),
            "machine": host,
            "figures": [f.to_dict() for f in result.figures],
            "details": result.details,
            "notes": result.notes,
        }
        (args.results / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
        for fig in doc["figures"]:
            ratio = f"x{fig['ratio']:.1f}" if fig["ratio"] else "-"
            print(
                f"   {fig['figure']}: {fig['value']['median']:.4g} {fig['unit']} "
                f"(baseline {_median(fig['baseline'])}, {ratio}, met={fig['met']})",
                flush=True,
            )
    docs = args.docs or (
        DOCS if args.results.resolve() == RESULTS.resolve() else args.results / "benchmarks.md"
    )
    write_docs(args.results, docs)
    print(f"results in {args.results}, table in {docs}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _median(stats: dict | None) -> str:
    return "-" if not stats or stats.get("median") is None else f"{stats['median']:.4g}"


if __name__ == "__main__":
    sys.exit(main())
