"""`knd profile`: where the time goes in training and prediction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from kndcli.cli import options as opt
from kndcli.errors import UsageError

app = typer.Typer(help="Profile training or prediction.", no_args_is_help=True)

TraceOpt = Annotated[
    Path | None, typer.Option("--trace", help="Write a Chrome trace (chrome://tracing, Perfetto).")
]
TopOpt = Annotated[int, typer.Option("--top", help="How many operators to list.")]


@app.command("predict")
def profile_predict(
    ctx: typer.Context,
    paths: opt.Paths,
    model: opt.Model = None,
    backend: opt.Backend = None,
    json_out: opt.Json = False,
    trace: TraceOpt = None,
    top: TopOpt = 15,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Profile the prediction path stage by stage: decode, resample, frontend, backbone, post."""
    from kndcli.inference.bundle import resolve_model
    from kndcli.profiling import profile_predict as run

    cfg = opt.load(ctx)
    bundle = resolve_model(cfg.inference.model)
    result = run(bundle, paths, backend=cfg.inference.backend, trace=trace, top=top)
    if json_out:
        result.pop("predictions", None)
        typer.echo(json.dumps(result, indent=2))
        return
    _print_failures(result)
    _print_stages(result, f"predict ({result['backend']}, {result['device']})")
    if result.get("model_breakdown_ms"):
        parts = ", ".join(f"{k} {v:.1f} ms" for k, v in result["model_breakdown_ms"].items())
        _console().print(f"ONNX Runtime node time by part: {parts}")
    _print_operators(result["operators"])
    ok = result["files"] - len(result["failed"])
    _console().print(
        f"{ok} clips, {result['windows']} windows, {result['audio_s']:.1f} s of audio in "
        f"{result['total_s']:.3f} s ({result['clips_per_s']:.1f} clips/s)"
    )
    if result["trace"]:
        _console().print(f"trace: {result['trace']}")


@app.command("train")
def profile_train(
    ctx: typer.Context,
    prepared: opt.Prepared = None,
    steps: Annotated[int, typer.Option(help="Measured training steps.")] = 5,
    warmup: Annotated[int, typer.Option(help="Unmeasured steps first.")] = 1,
    json_out: opt.Json = False,
    trace: TraceOpt = None,
    top: TopOpt = 15,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Profile a few training steps: data-loader wait versus compute, samples/s, operators."""
    from kndcli.profiling import profile_train as run

    cfg = opt.load(ctx)
    result = run(cfg, steps=steps, warmup=warmup, trace=trace, top=top)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    stages = {"data wait": result["data_wait_s"], "compute": result["compute_s"]}
    _print_stages({"stages": stages, "total_s": sum(stages.values())}, "train steps")
    _print_operators(result["operators"])
    step = result["step_s"]
    _console().print(
        f"{result['model']} ({result['precision']}), batch {result['batch_size']}: "
        f"{result['steps']} steps, "
        f"{result['samples']} samples, {result['samples_per_s']:.1f} samples/s; step median "
        f"{step['median'] * 1000:.0f} ms (min {step['min'] * 1000:.0f}, "
        f"max {step['max'] * 1000:.0f}); data wait {result['data_fraction']:.0%} of the time"
    )
    if result["trace"]:
        _console().print(f"trace: {result['trace']}")


def _console():
    from kndcli.cli.options import console

    return console()


def _print_failures(result: dict[str, Any]) -> None:
    import sys

    for bad in result["failed"]:
        print(f"error: {bad['file']}: {bad['error']}", file=sys.stderr)
    if result["failed"] and len(result["failed"]) == result["files"]:
        raise UsageError("every file failed to decode: nothing was profiled")


def _print_stages(result: dict[str, Any], title: str) -> None:
    from rich.table import Table

    total = result["total_s"] or 1e-12
    table = Table(title=title, show_edge=False)
    table.add_column("stage")
    table.add_column("ms", justify="right")
    table.add_column("share", justify="right")
    for name, seconds in result["stages"].items():
        table.add_row(name, f"{seconds * 1000:.1f}", f"{seconds / total:.0%}")
    table.add_row("[bold]total[/]", f"[bold]{result['total_s'] * 1000:.1f}[/]", "")
    _console().print(table)


def _print_operators(operators: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="top operators by self time", show_edge=False)
    table.add_column("operator", overflow="fold")
    table.add_column("calls", justify="right")
    table.add_column("self ms", justify="right")
    table.add_column("total ms", justify="right")
    for op in operators:
        table.add_row(op["name"], str(op["calls"]), f"{op['self_ms']:.2f}", f"{op['total_ms']:.2f}")
    _console().print(table)
