"""Typed dependencies: the loaded service, and the bearer token on prediction routes."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
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


# Where a caller may put knd's token when `Authorization` carries something else: behind
# Cloud Run IAM, `Authorization: Bearer <Google ID token>` is what IAM reads.
TOKEN_HEADER = "x-knd-token"


def token_ok(expected: str | None, headers: Mapping[str, str]) -> bool:
    """Whether the request carries the token, as `Authorization: Bearer <token>` or
    `X-KND-Token: <token>` (compared in constant time); no token configured lets
    everyone in."""
    if not expected:
        return True
    scheme, _, given = headers.get("authorization", "").partition(" ")
    bearer = given.strip() if scheme.lower() == "bearer" else ""
    header = headers.get(TOKEN_HEADER, "").strip()
    return any(
        hmac.compare_digest(candidate.encode(), expected.encode())
        for candidate in (bearer, header)
        if candidate
    )


def require_token(request: Request) -> None:
    """When KND_API_TOKEN is set, prediction routes need the token (`token_ok`)."""
    expected: str | None = getattr(request.app.state, "api_token", None)
    if not token_ok(expected, request.headers):
        raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


def request_id(request: Request) -> str:
    return request.scope["state"]["request_id"]


def request_start(request: Request) -> float:
    return request.scope["state"]["start"]


Service = Annotated[ServiceState, Depends(get_service)]
Authorized = Depends(require_token)
RequestId = Annotated[str, Depends(request_id)]
RequestStart = Annotated[float, Depends(request_start)]
