"""`knd demo`: the whole job on built-in synthetic data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from kndcli.cli import options as opt
from kndcli.cli.options import console


def demo(
    out: Annotated[Path, opt.out_option("Write everything under this directory.")] = Path(
        "knd-demo"
    ),
    actors: Annotated[int, typer.Option(min=3, help="Synthetic speakers (last two held out).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data.")] = 0,
    sets: opt.Sets = None,
) -> None:
    """Synthesize, prepare, train, evaluate and predict, offline, in minutes on a CPU."""
    from kndcli.cli.train import print_evaluation
    from kndcli.demo import run_demo

    con = console()
    started = time.perf_counter()
    result = run_demo(out, actors=actors, seed=seed, overrides=sets, say=con.print)
    print_evaluation(result.metrics)
    p = result.prediction
    top = sorted(p["probabilities"].items(), key=lambda kv: -kv[1])[:3]
    con.print(
        f"\n[bold]{result.heldout_clip.name}[/] -> [bold]{p['label']}[/] "
        f"({p['confidence']:.0%}); top-3: " + ", ".join(f"{k} {v:.0%}" for k, v in top)
    )
    con.print(f"\n[green]done in {time.perf_counter() - started:.0f} s[/]")
    con.print(f"  synthetic audio   {result.raw}")
    con.print(f"  prepared set      {result.prepared}")
    con.print(f"  model bundle      {result.bundle}")
    con.print(f"  confusion matrix  {result.bundle / 'eval' / 'test_confusion.png'}")
    con.print(f"  learning curve    {result.bundle / 'learning_curve.png'}")
    con.print("\nnext:")
    con.print(f"  knd predict -m {result.bundle} {result.raw}/Actor_{actors:02d}")
    con.print(f"  knd serve -m {result.bundle}")
    con.print(f"  knd drift report -m {result.bundle} --audio {result.raw}/Actor_{actors:02d}")
    con.print("  knd data download ravdess")
    con.print("  knd data prepare --dataset ravdess --raw data/raw/ravdess")
    con.print("  knd train --config configs/exp1.yaml")
