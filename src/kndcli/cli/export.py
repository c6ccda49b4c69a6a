"""`knd export`: re-export or quantize a bundle's model, with parity and accuracy checks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kndcli.cli.common import console
from kndcli.errors import KndError


def export(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory to export from.")],
    fmt: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    quantize: Annotated[
        str | None, typer.Option(help="Quantize weights: int8 (dynamic).", show_default=False)
    ] = None,
    out: Annotated[Path | None, typer.Option(help="New bundle directory.")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Prepared set to compare accuracy and speed on.")
    ] = None,
    split: Annotated[str, typer.Option(help="Split of --data to compare on.")] = "test",
) -> None:
    """Re-export a bundle's ONNX graph from its weights, optionally quantized to int8."""
    from kndcli.training.export import export_bundle

    if fmt != "onnx":
        raise KndError(f"--format {fmt}: only onnx is supported")
    if quantize not in (None, "int8"):
        raise KndError(f"--quantize {quantize}: only int8 is supported")
    target = out or bundle.with_name(bundle.name + ("-int8" if quantize else "-onnx"))
    report = export_bundle(bundle, target, quantize=quantize, data=data, split=split)
    con = console()
    con.print(f"[green]exported[/] {bundle} -> {target}")
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
