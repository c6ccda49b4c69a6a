"""A loopback fake of the Google REST APIs knd calls, for tests with the real SDK clients.

It records every request (method, path, query, JSON body) and answers from routes the test
registers: a route is an HTTP method and a regex on the path, answered by a function that
returns (status, JSON body). Only 127.0.0.1 is ever bound.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Handler = Callable[["Request", re.Match[str]], tuple[int, dict[str, Any]]]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: dict[str, Any] | None


@dataclass
class FakeGoogle:
    """A threaded HTTP server on 127.0.0.1 with registered routes and a request log."""

    requests: list[Request] = field(default_factory=list)
    routes: list[tuple[str, re.Pattern[str], Handler]] = field(default_factory=list)

    def __post_init__(self) -> None:
        fake = self

        class _Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if "x-www-form-urlencoded" in self.headers.get("Content-Type", ""):
                    # OAuth token requests (google-auth) are forms, not JSON.
                    body = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                else:
                    body = json.loads(raw) if raw else None
                request = Request(self.command, parts.path, parse_qs(parts.query), body)
                fake.requests.append(request)
                status, payload = fake._answer(request)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeGoogle:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self.routes.append((method, re.compile(pattern), handler))

    def reply(self, method: str, pattern: str, status: int, body: dict[str, Any]) -> None:
        self.route(method, pattern, lambda _r, _m: (status, body))

    def calls(self, method: str, pattern: str) -> list[Request]:
        regex = re.compile(pattern)
        return [r for r in self.requests if r.method == method and regex.fullmatch(r.path)]

    def _answer(self, request: Request) -> tuple[int, dict[str, Any]]:
        # Later routes win, so a test can override a default answer.
        for method, regex, handler in reversed(self.routes):
            match = regex.fullmatch(request.path)
            if method == request.method and match:
                return handler(request, match)
        return 404, error_body(404, f"fake: no route for {request.method} {request.path}")


def error_body(code: int, message: str) -> dict[str, Any]:
    """The JSON error envelope Google APIs return, which google.api_core maps to exceptions."""
    status = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        409: "ALREADY_EXISTS",
        412: "FAILED_PRECONDITION",
        429: "RESOURCE_EXHAUSTED",
    }.get(code, "UNKNOWN")
    return {"error": {"code": code, "message": message, "status": status}}
