"""`knd profile`: where the time goes in training and prediction."""

from __future__ import annotations

import typer

from kndcli.errors import KndError

app = typer.Typer(help="Profile training or prediction.", no_args_is_help=True)


@app.command("predict")
def profile_predict() -> None:
    """Profile the prediction path stage by stage."""
    raise KndError("knd profile predict is not yet available")


@app.command("train")
def profile_train() -> None:
    """Profile a few training steps."""
    raise KndError("knd profile train is not yet available")
