"""`knd config`: show the resolved configuration."""

from __future__ import annotations

import typer

from kndcli.cli import options as opt

app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)


@app.command("show")
def show(
    ctx: typer.Context,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
) -> None:
    """Print the resolved configuration (defaults, files, environment, --set) as YAML.

    Every command also takes --print-config, which shows what that command, with its
    flags, would run with.
    """
    from kndcli.config import to_yaml

    typer.echo(to_yaml(opt.load(ctx)), nl=False)
