"""The FastAPI app factory. Importing this module does no work; the model loads in the lifespan.

`create_app(settings)` for one process (tests, `knd serve`); `create_app_from_env()` is the
zero-argument factory uvicorn calls in each worker process when `workers > 1`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, FastAPI
from fastapi_offline import FastAPIOffline

from kndcli.serving.errors import install_error_handlers
from kndcli.serving.guards import (
    BodyGuardMiddleware,
    GuardedProtocol,
    LoopbackOnlyMiddleware,
    UploadBudget,
)
from kndcli.serving.metrics import Metrics, RequestStampMiddleware
from kndcli.serving.settings import LOOPBACK, SETTINGS_ENV, TOKEN_ENV, ServeSettings

log = logging.getLogger(__name__)

# A hook entered after the model is loaded and exited before the log is closed, e.g. a
# periodic drift check: `def hook(app) -> AbstractAsyncContextManager`.
LifespanHook = Callable[[FastAPI], contextlib.AbstractAsyncContextManager[Any]]


def _load_service(settings: ServeSettings, metrics: Metrics) -> Any:
    """Bundle (sha256-checked), scoring workers, batcher and prediction log: the slow part."""
    from kndcli.inference.bundle import load_bundle
    from kndcli.monitoring.predlog import open_log
    from kndcli.serving.batcher import MicroBatcher
    from kndcli.serving.scoring import ScoringPool, ScoringUnavailableError, WorkerSpec
    from kndcli.serving.service import ServiceState

    # Checked here too, so a broken bundle stops the server with the bundle's own error
    # instead of a dead worker process.
    bundle = load_bundle(settings.model)
    processes = settings.processes
    spec = WorkerSpec(
        model=settings.model,
        inference=settings.inference,
        audio=settings.audio,
        # One ONNX Runtime thread per worker process; in-process, 0 means one per core.
        threads=settings.threads or (1 if processes else 0),
        max_duration_s=settings.max_duration_s,
        max_bytes=settings.max_body_bytes,
    )
    pool = ScoringPool(spec, processes, timeout_s=settings.scoring_timeout_s)
    plog = open_log(
        settings.log_sink,
        flush_s=settings.log_flush_s,
        timeout_s=settings.log_timeout_s,
        spool=settings.log_spool or None,
        spool_mb=settings.log_spool_mb,
    )
    if hasattr(plog, "pending_bytes"):  # a gs:// sink: how far the bucket lags, per scrape
        metrics.log_pending.set_function(lambda: plog.pending_bytes)
    batcher = MicroBatcher(
        pool.run,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        # One batch more than there are workers, so a worker that finishes finds the next
        # batch already gathered (250 instead of 233 requests/s on 2 cores, measured).
        concurrency=processes + 1 if processes else 1,
        on_batch=metrics.observe_batch,
        # A batch not scored in time is answered 503 at once: retried, it would wait again.
        final_errors=(ScoringUnavailableError,),
    )
    return ServiceState(
        settings=settings, bundle=bundle, pool=pool, batcher=batcher, log=plog, metrics=metrics
    )


def create_app(
    settings: ServeSettings,
    *,
    extra_routers: Sequence[APIRouter] = (),
    lifespan_hooks: Sequence[LifespanHook] = (),
) -> FastAPI:
    """A new app for `settings`. Cheap: nothing is loaded until the server starts it."""
    from kndcli.serving.monitoring import router as monitoring_router
    from kndcli.serving.routes import router
    from kndcli.serving.stream import StreamCounter
    from kndcli.serving.stream import router as stream_router

    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await anyio.to_thread.run_sync(_load_service, settings, metrics)
        app.state.service = service
        app.state.bundle = service.bundle
        app.state.log = service.log
        app.state.batcher = service.batcher
        metrics.model_info.labels(service.model_version).set(1)
        # Read at each scrape: 0 while no scoring worker can score (a pool restart), as /ready.
        metrics.ready.set_function(lambda: float(service.ready and service.pool.ready))
        log.info(
            "serving %s (%s) from %s",
            service.model_version,
            settings.inference.backend,
            settings.model,
        )
        try:
            async with contextlib.AsyncExitStack() as stack:
                for hook in lifespan_hooks:
                    await stack.enter_async_context(hook(app))
                yield
        finally:
            service.ready = False
            # uvicorn has finished in-flight requests by now: drain the batcher, then upload
            # every acknowledged request's log record before the slower pool shutdown (Cloud
            # Run kills an instance 10 s after SIGTERM, and its disk, the spool, with it).
            await anyio.to_thread.run_sync(service.batcher.close)
            await anyio.to_thread.run_sync(service.log.close)
            await anyio.to_thread.run_sync(service.pool.close)

    # /docs serves Swagger UI's assets from the package, not a CDN: it works offline.
    app = FastAPIOffline(
        title="knd",
        summary="Speech emotion recognition",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.api_token = settings.token()
    app.state.service = None
    app.state.streams = StreamCounter(settings.max_streams)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(monitoring_router)
    app.include_router(stream_router)
    for extra in extra_routers:
        app.include_router(extra)
    if settings.host in LOOPBACK and not settings.token() and not settings.allow_no_token:
        app.add_middleware(LoopbackOnlyMiddleware, loopback=LOOPBACK)
    app.add_middleware(
        BodyGuardMiddleware,
        budget=UploadBudget(int(settings.max_buffered_mb * 2**20)),
        body_timeout_s=settings.body_timeout_s,
        min_rate=settings.body_min_rate_kb_s * 1024,
    )
    app.add_middleware(RequestStampMiddleware, metrics=metrics)
    # uvicorn builds the protocol itself, in every worker process: the deadline travels as
    # a class attribute set by the factory that process runs.
    GuardedProtocol.head_timeout_s = settings.head_timeout_s
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn's factory in worker processes: settings come from KND_SERVE_SETTINGS."""
    text = os.environ.get(SETTINGS_ENV)
    if not text:
        raise RuntimeError(f"{SETTINGS_ENV} is not set: start the service with 'knd serve'")
    return create_app(ServeSettings.from_json(text))


def run_server(
    settings: ServeSettings, *, access_log: bool = False, log_level: str = "info"
) -> None:
    """Run uvicorn: the app object for one worker, an import string + factory for several."""
    import uvicorn

    settings.check_exposure()
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "access_log": access_log,
        "log_level": log_level,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
        "server_header": False,
        "http": "kndcli.serving.guards:GuardedProtocol",
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_s,
        # /stream: the sans-I/O protocol reads one message at a time and its sends wait
        # for the socket (the backpressure serving/stream.py relies on), named here so
        # another installed WebSocket library cannot change it; a message over the limit
        # closes the stream (1009).
        "ws": "websockets-sansio",
        "ws_max_size": settings.stream_max_message_kb * 1024,
    }
    if settings.workers > 1:
        os.environ[SETTINGS_ENV] = settings.to_json()
        if settings.api_token is not None:
            # The JSON blob never carries the token; worker processes read it from the
            # environment they inherit, so one given in code must be put there.
            os.environ[TOKEN_ENV] = settings.api_token
        uvicorn.run(
            "kndcli.serving.app:create_app_from_env",
            factory=True,
            workers=settings.workers,
            **common,
        )
    else:
        uvicorn.run(create_app(settings), **common)


def _version() -> str:
    from kndcli import __version__

    return __version__
