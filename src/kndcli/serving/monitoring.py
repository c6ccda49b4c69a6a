"""`GET /monitoring`: the latest drift report of the logged requests, cached.

Only served when a bearer token is configured: the report shows what production audio
looks like, which is not for anonymous eyes. Needs the `monitor` extra (Evidently); the
slim serving image answers 501 instead.
"""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from kndcli.serving.deps import Authorized, Service
from kndcli.serving.errors import ApiError

router = APIRouter()


@router.get(
    "/monitoring",
    response_class=HTMLResponse,
    dependencies=[Authorized],
    summary="Drift report of recent requests against the training reference (token only)",
)
async def monitoring(request: Request, service: Service) -> HTMLResponse:
    if not request.app.state.api_token:
        raise ApiError(404, "monitoring is only served when KND_API_TOKEN is set")
    try:
        from kndcli.monitoring.report_cache import cached_report_html
    except ImportError:
        raise ApiError(501, "monitoring needs the 'monitor' extra (evidently)") from None
    settings = request.app.state.settings
    html = await anyio.to_thread.run_sync(
        lambda: cached_report_html(
            service.bundle, service.log, settings.drift, settings.monitoring_interval_s
        )
    )
    return HTMLResponse(html)
