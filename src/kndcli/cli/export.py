"""`knd export`: re-export or quantize a bundle's model, with parity and accuracy checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kndcli.cli import options as opt
from kndcli.errors import UsageError


def export(
    ctx: typer.Context,
    model: opt.Model = None,
    fmt: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    quantize: Annotated[
        str | None, typer.Option(help="Quantize weights: int8 (dynamic).", show_default=False)
    ] = None,
    out: Annotated[
        Path | None, opt.out_option("New bundle directory (default: BUNDLE-onnx, BUNDLE-int8).")
    ] = None,
    prepared: opt.Prepared = None,
    split: opt.Split = "test",
    force: Annotated[
        bool,
        typer.Option("--force", help="Keep an int8 bundle that is less accurate or slower."),
    ] = False,
    json_out: opt.Json = False,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Re-export a bundle's ONNX graph from its weights, optionally quantized to int8.

    int8 is measured against the source on the bundle's prepared set (or --prepared):
    a bundle that is less accurate or slower is removed again unless --force (exit 1).
    """
    if fmt != "onnx":
        raise UsageError(f"--format {fmt}: only onnx is supported")
    if quantize not in (None, "int8"):
        raise UsageError(f"--quantize {quantize}: only int8 is supported")
    cfg = opt.load(ctx)
    from kndcli.inference.bundle import resolve_model
    from kndcli.training.export import export_bundle

    bundle = resolve_model(cfg.inference.model)
    target = out or bundle.with_name(bundle.name + ("-int8" if quantize else "-onnx"))
    report = export_bundle(
        bundle,
        target,
        quantize=quantize,
        data=opt.chosen_prepared(ctx, cfg),
        split=split,
        force=force,
    )
    if json_out:
        typer.echo(json.dumps({"source": str(bundle), "bundle": str(target), **report}))
    else:
        _print(report, bundle, target, split)
    if not report["kept"]:
        raise typer.Exit(1)


def _print(report: dict, bundle: Path, target: Path, split: str) -> None:
    from kndcli.cli.options import console

    con = console()
    verb = "[green]exported[/]" if report["kept"] else "[red]refused[/]"
    con.print(f"{verb} {bundle} -> {target}")
    con.print(f"  torch vs exported graph: max probability difference {report['parity']:.2e}")
    con.print(
        f"  model.onnx {report['size_before'] / 1e6:.2f} MB -> {report['size_after'] / 1e6:.2f} MB"
    )
    if "accuracy_before" in report:
        con.print(
            f"  {split} accuracy {report['accuracy_before']:.1%} -> "
            f"{report['accuracy_after']:.1%}; {report['ms_per_clip_before']:.2f} -> "
            f"{report['ms_per_clip_after']:.2f} ms per clip"
        )
    for reason in report.get("refused", []):
        con.print(f"  [red]{reason}[/]")
    if not report["kept"]:
        con.print("  the int8 bundle was removed; pass --force to keep it anyway")
