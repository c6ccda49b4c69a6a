"""`knd serve`: the HTTP service (the Cloud Run container's command)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from kndcli.cli import options as opt
from kndcli.serving.settings import LOOPBACK


def serve(
    ctx: typer.Context,
    model: opt.Model = None,
    host: Annotated[str | None, opt.keyed("serve.host", "--host", help="Bind address.")] = None,
    port: Annotated[
        int | None, opt.keyed("serve.port", "--port", help="Port (Cloud Run's PORT also sets it).")
    ] = None,
    workers: Annotated[
        int | None,
        opt.keyed("serve.workers", "--workers", help="uvicorn worker processes."),
    ] = None,
    backend: opt.Backend = None,
    insecure_no_token: Annotated[
        bool | None,
        opt.keyed(
            "serve.allow_no_token",
            "--insecure-no-token",
            help="Serve a non-loopback address without KND_API_TOKEN.",
        ),
    ] = None,
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", help="Log every request.")
    ] = False,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Serve a bundle over HTTP: /predict, /predict/batch, /stream (WebSocket), /health,
    /ready, /metrics, /docs."""
    from kndcli.inference.bundle import load_bundle, resolve_model
    from kndcli.serving.app import run_server
    from kndcli.serving.settings import ServeSettings

    cfg = opt.load(ctx)
    path = resolve_model(cfg.inference.model)
    bundle = load_bundle(path)  # fail here, in one line, rather than in every worker
    settings = ServeSettings.from_config(cfg, path)
    settings.check_exposure()  # before the banner: a refusal is one line
    _announce(settings, bundle)
    run_server(settings, access_log=access_log)


def _announce(settings, bundle) -> None:
    """What a person starting the service needs to see before the first request."""
    inf = settings.inference
    token = "none: every route is open"
    if settings.host in LOOPBACK and not settings.allow_no_token:
        token += " to requests for a loopback name, from no web page or a loopback one"
    if settings.token():
        open_routes = "/health, /ready, /docs, /openapi.json"
        if not settings.metrics_need_token:
            open_routes += ", /metrics"
        token = f"required (KND_API_TOKEN), except on {open_routes}"
    lines = [
        f"model    {bundle.version} ({len(bundle.labels)} labels, {inf.backend}) "
        f"from {bundle.root}",
        f"listen   http://{settings.host}:{settings.port}  (docs at /docs)",
        f"scoring  {settings.processes or 'in-process'} worker(s), batches of "
        f"{settings.max_batch_size}, clips up to {settings.max_duration_s:g} s",
        f"log      {settings.log_sink}",
        f"token    {token}",
    ]
    if inf.min_confidence > 0:
        lines.append(f"answers  'uncertain' below confidence {inf.min_confidence:g}")
    if settings.host not in LOOPBACK and not settings.token():
        lines.append(
            f"warning  bound to {settings.host} without a token (--insecure-no-token): "
            "only what stands in front of it checks callers"
        )
    print("\n".join(lines), file=sys.stderr, flush=True)
