"""Options and helpers shared by the command modules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kndcli.config import KndConfig, load_config

ConfigOpt = Annotated[
    list[Path] | None,
    typer.Option("--config", "-c", help="Config file (repeatable; later files win)."),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides as key=value, e.g. train.max_epochs=5.", show_default=False),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Config override key=value (repeatable)."),
]
ModelOpt = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="Model bundle directory (default: inference.model)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def build_config(config: list[Path] | None, overrides: list[str] | None) -> KndConfig:
    """Default files first, then the user's files, then key=value overrides."""
    return load_config(list(config or []), list(overrides or []))


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)
