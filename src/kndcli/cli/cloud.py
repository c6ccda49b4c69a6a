"""`knd cloud`: Vertex AI training jobs and Cloud Run services."""

from __future__ import annotations

import typer

from kndcli.errors import KndError

app = typer.Typer(help="Train on Vertex AI, serve on Cloud Run.", no_args_is_help=True)


@app.command("submit")
def submit() -> None:
    """Submit a Vertex AI CustomJob that runs `knd train`."""
    raise KndError("knd cloud submit is not yet available")


@app.command("deploy")
def deploy() -> None:
    """Create or update the Cloud Run service that runs `knd serve`."""
    raise KndError("knd cloud deploy is not yet available")


@app.command("status")
def status() -> None:
    """Show the state of a Vertex AI job or Cloud Run service."""
    raise KndError("knd cloud status is not yet available")
