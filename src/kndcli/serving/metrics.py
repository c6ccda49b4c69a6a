"""Prometheus metrics, one registry per app, plus the middleware that stamps every request.

The middleware is plain ASGI (not BaseHTTPMiddleware, which costs a task per request): it
gives the request an id, times it, counts it by route and status, and sets X-Request-ID.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ROUTES = (
    "/predict",
    "/predict/batch",
    "/health",
    "/ready",
    "/metrics",
    "/docs",
    "/openapi.json",
    "/docs/oauth2-redirect",
    "/redoc",
)
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The service's metrics in their own registry (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "knd_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "knd_request_latency_seconds",
            "Request latency by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "knd_errors",
            "Refused or failed requests by route and reason.",
            ["route", "reason"],
            registry=r,
        )
        self.predictions = Counter("knd_predictions", "Predicted classes.", ["label"], registry=r)
        self.batches = Counter(
            "knd_batches", "Forward passes run by the micro-batcher.", registry=r
        )
        self.batch_size = Histogram(
            "knd_batch_size",
            "Clips per forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.inference = Histogram(
            "knd_inference_seconds",
            "Forward pass time per batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "knd_model_info", "The model being served.", ["version"], registry=r
        )
        self.ready = Gauge(
            "knd_ready", "1 when the model is loaded and a scoring worker can score.", registry=r
        )
        self.log_pending = Gauge(
            "knd_log_pending_bytes",
            "Prediction log records acknowledged but not yet in the gs:// sink (the spool).",
            registry=r,
        )
        self.streams = Gauge("knd_streams_active", "Open /stream sessions.", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batches.inc()
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method",
    413: "too_large",
    415: "unsupported_type",
    422: "bad_input",
    503: "unavailable",
    504: "timeout",
}


class RequestStampMiddleware:
    """Request id, timing and counting for every HTTP request."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["start"] = start = time.perf_counter()
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        status = 500
        header = (b"x-request-id", request_id.encode())

        async def stamped_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, stamped_send)
        finally:
            m = self.metrics
            m.requests.labels(route, str(status)).inc()
            m.latency.labels(route).observe(time.perf_counter() - start)
            if status >= 400:
                m.errors.labels(route, _REASONS.get(status, f"http_{status}")).inc()
