"""What slow, idle and greedy clients may hold: time for a request head, pauses in a body
and its average rate, and bytes buffered across all uploads in flight.

uvicorn bounds connections (`limit_concurrency`) and idle keep-alive connections
(`timeout_keep_alive`) but has no deadline for a request head, so a client sending one
header byte every few seconds keeps its connection (and file descriptor) forever. The
protocol classes below are uvicorn's own with that one deadline added. Body pauses, the
body's least rate and the shared byte budget are an ASGI middleware around `receive`, the
one place every body byte passes; the body readers (`body.limited_stream`) turn its errors
into 408 and 503.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import anyio
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # uvicorn's default where httptools is installed
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is optional for uvicorn
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


class BodyStalled(Exception):
    """The client paused its body longer than the body timeout."""


class BufferFull(Exception):
    """Uploads in flight already hold the byte budget."""


class HeadDeadline:
    """Close a connection that has not sent a whole request head `head_timeout_s` after it
    opened or after its previous response. uvicorn makes a new `cycle` per request head,
    so an unchanged cycle at the deadline means no head arrived, unless that cycle is
    still being answered: a pipelined request whose head came before the previous
    response ended (both protocol classes make its cycle then) may run past the deadline.
    Each response re-arms the one timer, so a deadline counts from the latest response."""

    head_timeout_s: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        waiting_since = self.cycle  # type: ignore[attr-defined]
        self._head_timer = self.loop.call_later(  # type: ignore[attr-defined]
            self.head_timeout_s, self._head_deadline, waiting_since
        )

    def handle_websocket_upgrade(self, *args: Any) -> None:
        """The connection becomes a WebSocket (/stream), whose own limits apply from now
        on: no request head is coming, so the head deadline must not close it."""
        self._upgraded = True
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def _head_deadline(self, waiting_since: Any) -> None:
        transport = self.transport  # type: ignore[attr-defined]
        if getattr(self, "_upgraded", False):
            return
        cycle = self.cycle  # type: ignore[attr-defined]
        answered = cycle is None or cycle.response_complete
        if cycle is waiting_since and answered and not transport.is_closing():
            transport.close()


class GuardedProtocol(HeadDeadline, HttpToolsProtocol or H11Protocol):  # type: ignore[misc]
    """uvicorn's HTTP protocol (httptools when installed, else h11) with the head deadline.

    Named by import string in uvicorn's options, so worker processes can load it; each
    process's app factory sets `head_timeout_s` from its settings (`app.create_app`).
    """


class UploadBudget:
    """Bytes of request bodies held by the requests in flight, against one limit.

    One per process, used from its event loop only: no lock needed.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.held = 0

    def take(self, n: int) -> None:
        if self.held + n > self.limit:
            raise BufferFull(f"uploads in flight hold {self.held / 2**20:.0f} MiB already")
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n


class LoopbackOnlyMiddleware:
    """A service on loopback without a token answers only requests addressed to a loopback
    name, sent from no web page or from a page served by a loopback name.

    Binding 127.0.0.1 keeps other machines out but not the web pages its user opens: a
    page can rename itself onto 127.0.0.1 (DNS rebinding: the request's Host then names
    the page's domain), and any page can post a form or open a WebSocket across origins
    (its Origin names the page's site). Either would score audio and fill the prediction
    log. A token, or --insecure-no-token (for a proxy that rewrites Host), turns it off.
    """

    def __init__(self, app: Any, loopback: tuple[str, ...]) -> None:
        self.app = app
        self.loopback = loopback

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        problem = self._foreign(scope) if scope["type"] in ("http", "websocket") else None
        if problem is None:
            await self.app(scope, receive, send)
            return
        from starlette.requests import HTTPConnection

        from kndcli.serving.errors import error_response

        refusal = error_response(HTTPConnection(scope), 403, problem)  # type: ignore[arg-type]
        if scope["type"] == "http":
            await refusal(scope, receive, send)
        elif "websocket.http.response" in scope.get("extensions", {}):
            # A refused handshake answers with the same JSON error; a close before accept
            # would reach the client as a bare 403 with no reason.
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 403,
                    "headers": refusal.raw_headers,
                }
            )
            await send({"type": "websocket.http.response.body", "body": refusal.body})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": problem[:120]})

    def _foreign(self, scope: dict) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host"), headers.get("origin")
        if host is not None and _hostname("//" + host) not in self.loopback:
            what = f"Host {host!r}"
        elif origin is not None and _hostname(origin) not in self.loopback:
            what = f"a page from {origin!r}"
        else:
            return None
        return (
            f"this service has no token, so it answers only loopback names "
            f"({', '.join(self.loopback)}) and pages served by them, not {what}: set "
            "KND_API_TOKEN, or pass --insecure-no-token if a proxy in front rewrites Host"
        )


def _hostname(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:  # a malformed port or bracket
        return None


class BodyGuardMiddleware:
    """A body must keep coming: each chunk within `body_timeout_s` of the last, and the
    whole body at least `min_rate` bytes a second on average after a `body_timeout_s`
    grace (Apache's mod_reqtimeout `MinRate`). The pause limit alone would let a client
    that sends a byte every few seconds hold its connection and buffered bytes for hours.
    The rate is charged the time spent waiting for the client and the app's own time
    between reads, except when the next read comes back full: uvicorn reads on while the
    app works, up to its high-water mark, so a full buffer means the app, not the link,
    was the hold-up (and a client that trickles while the app is busy is still charged).
    Every chunk counts against the process's `UploadBudget` until its request is answered.
    """

    def __init__(
        self, app: Any, budget: UploadBudget, body_timeout_s: float, min_rate: float
    ) -> None:
        self.app = app
        self.budget = budget
        self.body_timeout_s = body_timeout_s
        self.min_rate = min_rate

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held = 0
        body_done = False
        charged = 0.0  # seconds of the body's time charged to the client so far
        last_read: float | None = None

        async def guarded() -> dict:
            nonlocal held, body_done, charged, last_read
            if body_done:  # after the body, receive only waits for a disconnect
                return await receive()
            asked = anyio.current_time()
            app_time = asked - last_read if last_read is not None else 0.0
            # The body's own deadline moves out by one second for every min_rate bytes.
            rate_left = self.body_timeout_s + held / self.min_rate - charged - app_time
            # A little time even past the deadline: a last message already buffered is taken.
            wait = max(min(self.body_timeout_s, rate_left), 0.01)
            try:
                with anyio.fail_after(wait):
                    message = await receive()
            except TimeoutError:
                raise BodyStalled(self._too_slow(rate_left)) from None
            last_read = anyio.current_time()
            size = len(message.get("body", b"")) if message["type"] == "http.request" else 0
            client_held_up = size < HIGH_WATER_LIMIT  # else uvicorn had stopped reading
            charged += last_read - asked + (app_time if client_held_up else 0.0)
            if message["type"] == "http.request":
                self.budget.take(size)
                held += size
                body_done = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, guarded, send)
        finally:
            self.budget.give(held)

    def _too_slow(self, rate_left: float) -> str:
        if rate_left < self.body_timeout_s:
            return f"body came slower than {self.min_rate / 1024:g} KB/s (serve.body_min_rate_kb_s)"
        return f"no body data for {self.body_timeout_s:g} s (serve.body_timeout_s)"
