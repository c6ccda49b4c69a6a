"""A small loopback HTTP load generator: N concurrent keep-alive clients posting audio.

Raw asyncio streams and pre-built request bytes keep the generator's own CPU cost low,
which matters when it shares two cores with the server it measures. 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from bench.common import percentile

HOST = "127.0.0.1"


def request_bytes(path: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Status code, and whether the server keeps the connection open."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    version, code = status_line.split()[:2]
    length, keep = 0, version == b"HTTP/1.1"
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            keep = value == b"keep-alive" or (keep and value != b"close")
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readline()).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return int(code), keep


async def _load(
    port: int,
    requests: list[bytes],
    clients: int,
    duration_s: float | None,
    max_requests: int | None,
    timeout_s: float,
) -> dict[str, Any]:
    counter = itertools.count()
    deadline = None if duration_s is None else time.perf_counter() + duration_s
    latencies: list[float] = []
    codes: dict[str, int] = {}
    errors: list[str] = []
    failed_io: list[float] = []

    def more() -> int | None:
        if deadline is not None and time.perf_counter() >= deadline:
            return None
        n = next(counter)
        return None if max_requests is not None and n >= max_requests else n

    async def client() -> None:
        reader = writer = None
        while (n := more()) is not None:
            start = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(requests[n % len(requests)])
                await writer.drain()
                code, keep = await asyncio.wait_for(_read_response(reader), timeout_s)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                failed_io.append(time.perf_counter() - start)
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            latencies.append(time.perf_counter() - start)
            codes[str(code)] = codes.get(str(code), 0) + 1
            if code != 200:
                errors.append(f"HTTP {code}")
            if not keep:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    ok = codes.get("200", 0)
    return {
        "clients": clients,
        "elapsed_s": elapsed,
        "requests": len(latencies) + len(failed_io),
        "ok": ok,
        "errors": len(errors),
        "error_samples": errors[:5],
        "status_codes": codes,
        "requests_per_s": ok / elapsed if elapsed > 0 else 0.0,
        "p50_ms": _ms(percentile(latencies, 50)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "max_ms": _ms(max(latencies) if latencies else None),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def run_load(
    port: int,
    bodies: list[tuple[bytes, str]],
    *,
    path: str = "/predict",
    clients: int = 16,
    duration_s: float | None = 10.0,
    max_requests: int | None = None,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Post `bodies` round-robin from `clients` connections until the time or count is up."""
    requests = [request_bytes(path, body, ctype) for body, ctype in bodies]
    return asyncio.run(_load(port, requests, clients, duration_s, max_requests, timeout_s))
