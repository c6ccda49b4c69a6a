"""Typed dependencies: the loaded service, and the bearer token on prediction routes."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from kndcli.serving.errors import ApiError
from kndcli.serving.service import ServiceState


def get_service(request: Request) -> ServiceState:
    """The loaded model and its batcher and log; 503 while loading or shutting down."""
    service: ServiceState | None = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise ApiError(503, "model not loaded yet; retry shortly", {"Retry-After": "1"})
    return service


def bearer_ok(expected: str | None, authorization: str) -> bool:
    """Whether an `Authorization` header carries the token (constant-time); no token
    configured lets everyone in."""
    if not expected:
        return True
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), expected.encode()
    )


def require_token(request: Request) -> None:
    """When KND_API_TOKEN is set, prediction routes need `Authorization: Bearer <token>`."""
    expected: str | None = getattr(request.app.state, "api_token", None)
    if not bearer_ok(expected, request.headers.get("authorization", "")):
        raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


def request_id(request: Request) -> str:
    return request.scope["state"]["request_id"]


def request_start(request: Request) -> float:
    return request.scope["state"]["start"]


Service = Annotated[ServiceState, Depends(get_service)]
Authorized = Depends(require_token)
RequestId = Annotated[str, Depends(request_id)]
RequestStart = Annotated[float, Depends(request_start)]
