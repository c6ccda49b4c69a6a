"""`knd drift`: compare logged requests or a folder of audio with the training reference."""

from __future__ import annotations

import typer

from kndcli.errors import KndError

app = typer.Typer(help="Data and prediction drift against the bundle's reference.", no_args_is_help=True)


@app.command("report")
def report() -> None:
    """Write an HTML drift report and a JSON summary."""
    raise KndError("knd drift report is not yet available")


@app.command("check")
def check() -> None:
    """Exit 0 without drift, 1 with drift, 2 when it cannot judge."""
    raise KndError("knd drift check is not yet available")
