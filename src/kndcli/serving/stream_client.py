"""The client side of `/stream`: send audio in real time (or faster), receive events.

`knd stream` is a thin CLI over `stream_audio`; the bench and the tests drive the same
protocol. One thread sends chunks paced to `speed` x real time while the caller's thread
receives and hands each event to `on_event`, so events arrive while audio is still being
sent, as they would from a microphone.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from kndcli.errors import KndError, UsageError


class StreamError(KndError):
    """The server refused or ended the stream: its close code and reason."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"the server closed the stream ({code}): {reason}")
        self.code = code
        self.reason = reason


@dataclass
class StreamResult:
    events: int
    summary: dict[str, Any] | None


def stream_url(server: str) -> str:
    """`http://host:port` (or ws://) to the /stream WebSocket URL."""
    parts = urlsplit(server if "://" in server else f"http://{server}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise UsageError(f"--server {server!r}: give http://HOST:PORT or https://HOST")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/stream", "", ""))


def pcm16_chunks(blocks: Iterable[np.ndarray], rate: int, chunk_s: float) -> Iterator[bytes]:
    """Float blocks as PCM16 messages of `chunk_s` seconds each."""
    size = max(1, int(rate * chunk_s)) * 2
    pending = b""
    for block in blocks:
        # x 32768, as the server divides: 16-bit audio crosses the socket unchanged.
        pending += np.clip(np.round(block * 32768), -32768, 32767).astype("<i2").tobytes()
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


def _refusal(exc: Exception) -> str:
    """The server's JSON reason for refusing the handshake (knd's 403s carry one)."""
    body = getattr(getattr(exc, "response", None), "body", None) or b""
    try:
        return f" ({json.loads(body)['error']})"
    except (ValueError, KeyError, TypeError):
        return ""


def stream_audio(
    url: str,
    chunks: Iterable[bytes],
    *,
    sample_rate: int,
    speed: float = 1.0,
    token: str | None = None,
    id_token: str | None = None,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
    open_timeout_s: float = 10.0,
) -> StreamResult:
    """Stream PCM16 `chunks` to `url`; every event goes to `on_event` as it arrives.

    `speed` 1 sends in real time, 4 four times faster, 0 as fast as the server reads.
    Raises StreamError when the server closes with anything but 1000. `id_token` (a
    Google ID token) opens a private Cloud Run service.
    """
    from websockets.exceptions import ConnectionClosed, InvalidHandshake
    from websockets.sync.client import connect

    from kndcli.cloud.invoke import invoke_headers

    # A private Cloud Run service: its ID token beside knd's (cloud/invoke.py).
    headers = invoke_headers(id_token, token) or None
    try:
        ws = connect(url, additional_headers=headers, open_timeout=open_timeout_s)
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        raise KndError(f"cannot open {url}: {exc}{_refusal(exc)}") from None
    with ws:
        failed: list[Exception] = []  # what stopped the sender (a file that breaks off)
        sender = threading.Thread(
            target=_send_paced, args=(ws, chunks, sample_rate, speed, failed), daemon=True
        )
        events, summary = 0, None
        try:
            ws.send(json.dumps({"type": "start", "sample_rate": sample_rate, "encoding": "pcm16"}))
            ready = json.loads(ws.recv())
            on_event(ready)
            sender.start()
            while True:
                event = json.loads(ws.recv())
                events += event.get("type") == "window"
                if event.get("type") == "summary":
                    summary = event
                on_event(event)
        except ConnectionClosed as exc:
            if failed:
                raise failed[0] from None
            close = exc.rcvd
            if close is None or close.code != 1000:
                code = close.code if close else None
                reason = close.reason if close else "connection lost"
                raise StreamError(code, reason) from None
    return StreamResult(events, summary)


def _send_paced(
    ws: Any, chunks: Iterable[bytes], rate: int, speed: float, failed: list[Exception]
) -> None:
    """Send `chunks` paced to `speed`, then the end message; an error reading the audio
    goes to `failed` and closes the socket, so the receiving thread stops and raises it."""
    from websockets.exceptions import ConnectionClosed

    start, sent = time.perf_counter(), 0.0
    try:
        for chunk in chunks:
            sent += len(chunk) / 2 / rate
            if speed > 0:  # a chunk leaves when its last sample would have been spoken
                delay = start + sent / speed - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            ws.send(chunk)
        ws.send(json.dumps({"type": "end"}))
    except ConnectionClosed:  # the server ended the stream: the receiver reports why
        pass
    except Exception as exc:
        failed.append(exc)
        ws.close(1001, "the client's audio source failed")
