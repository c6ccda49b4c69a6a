"""`knd serve`: the HTTP service (the Cloud Run container's command)."""

from __future__ import annotations

from typing import Annotated

import typer

from kndcli.cli.common import ConfigOpt, ModelOpt, SetOpt


def serve(
    model: ModelOpt = None,
    host: Annotated[
        str | None, typer.Option(help="Bind address (default serve.host, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (default: $PORT, then serve.port).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes, each with its own model copy.")
    ] = None,
    backend: Annotated[str | None, typer.Option(help="onnx (default) or torch.")] = None,
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", help="Log every request.")
    ] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Serve a bundle over HTTP: /predict, /predict/batch, /health, /ready, /metrics, /docs."""
    from kndcli.cli.predict import cli_config
    from kndcli.inference.bundle import load_bundle, resolve_model
    from kndcli.serving.app import run_server
    from kndcli.serving.settings import ServeSettings

    cfg = cli_config(config, overrides)
    bundle = resolve_model(model, default=cfg.inference.model)
    load_bundle(bundle)  # fail here, in one line, rather than in every worker
    settings = ServeSettings.from_config(
        cfg, bundle, host=host, port=port, workers=workers, backend=backend
    )
    run_server(settings, access_log=access_log)
