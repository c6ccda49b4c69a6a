"""`knd config`: show the resolved configuration."""

from __future__ import annotations

import typer

from kndcli.cli.common import ConfigOpt, OverridesArg, build_config

app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)


@app.command("show")
def show(config: ConfigOpt = None, overrides: OverridesArg = None) -> None:
    """Print the resolved configuration (defaults, then files, then overrides) as YAML."""
    from kndcli.config import to_yaml

    typer.echo(to_yaml(build_config(config, overrides)), nl=False)
