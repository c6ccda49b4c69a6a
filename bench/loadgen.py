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


# ----------------------------------------------------------------------------- open loop


async def _stall(port: int, request: bytes, hold_s: float) -> str:
    """Send the head and half the body, then nothing: how the server ends it, or 'held'."""
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except OSError as exc:
        return f"connect failed ({type(exc).__name__})"
    try:
        writer.write(request[: len(request) // 2])
        await writer.drain()
        code, _ = await asyncio.wait_for(_read_response(reader), hold_s)
        return str(code)
    except TimeoutError:
        return "held"
    except (OSError, asyncio.IncompleteReadError, ConnectionError):
        return "closed"
    finally:
        writer.close()


async def _open_loop(
    port: int,
    good: list[bytes],
    hostile: list[tuple[str, bytes]],
    rate: float,
    duration_s: float,
    hostile_share: float,
    seed: int,
    timeout_s: float,
    keep_alive_s: float,
) -> dict[str, Any]:
    import random

    rng = random.Random(seed)
    # Idle keep-alive connections with the time each was last answered. A connection
    # idle for longer than the server's keep-alive has been closed by the server, and a
    # real client pool (urllib3, httpx) drops it rather than send into it.
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
    latencies: list[float] = []
    good_codes: dict[str, int] = {}
    hostile_outcomes: dict[str, dict[str, int]] = {}
    late: list[float] = []  # how far behind schedule the generator fired (its own lag)
    reused_failures = 0

    async def connection() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        while idle:
            reader, writer, since = idle.pop()
            if reader.at_eof() or time.perf_counter() - since > keep_alive_s * 0.8:
                writer.close()
                continue
            return reader, writer, True
        reader, writer = await asyncio.open_connection(HOST, port)
        return reader, writer, False

    async def send_good(request: bytes) -> None:
        nonlocal reused_failures
        start = time.perf_counter()
        reused = False
        try:
            reader, writer, reused = await connection()
            writer.write(request)
            await writer.drain()
            code, keep = await asyncio.wait_for(_read_response(reader), timeout_s)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            key = type(exc).__name__
            good_codes[key] = good_codes.get(key, 0) + 1
            reused_failures += reused
            return
        latencies.append(time.perf_counter() - start)
        good_codes[str(code)] = good_codes.get(str(code), 0) + 1
        if keep:
            idle.append((reader, writer, time.perf_counter()))
        else:
            writer.close()

    async def send_hostile(kind: str, request: bytes) -> None:
        if kind == "stalled upload":
            outcome = await _stall(port, request, hold_s=timeout_s)
        else:
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(request)
                await writer.drain()
                code, _ = await asyncio.wait_for(_read_response(reader), timeout_s)
                outcome = str(code)
                writer.close()
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                outcome = type(exc).__name__
        counts = hostile_outcomes.setdefault(kind, {})
        counts[outcome] = counts.get(outcome, 0) + 1

    tasks = []
    started = time.perf_counter()
    due = 0.0
    while True:
        due += rng.expovariate(rate)  # Poisson arrivals: exponential gaps at the mean rate
        if due >= duration_s:
            break
        delay = started + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        late.append(max(0.0, -delay))
        if hostile and rng.random() < hostile_share:
            kind, request = hostile[rng.randrange(len(hostile))]
            tasks.append(asyncio.create_task(send_hostile(kind, request)))
        else:
            tasks.append(asyncio.create_task(send_good(good[rng.randrange(len(good))])))
    await asyncio.gather(*tasks)
    for _, writer, _ in idle:
        writer.close()
    ok = good_codes.get("200", 0)
    sent = sum(good_codes.values())
    return {
        "offered_per_s": rate,
        "duration_s": duration_s,
        "good_requests": sent,
        "good_ok": ok,
        "good_errors": sent - ok,
        "good_status": good_codes,
        "good_errors_on_reused_connections": reused_failures,
        "hostile": hostile_outcomes,
        "p50_ms": _ms(percentile(latencies, 50)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "p999_ms": _ms(percentile(latencies, 99.9)),
        "max_ms": _ms(max(latencies) if latencies else None),
        "generator_lag_p99_ms": _ms(percentile(late, 99)),
    }


def run_open_loop(
    port: int,
    good: list[tuple[bytes, str]],
    *,
    rate: float,
    duration_s: float,
    hostile: list[tuple[str, bytes, str]] = (),
    hostile_share: float = 0.0,
    path: str = "/predict",
    seed: int = 0,
    timeout_s: float = 30.0,
    keep_alive_s: float = 5.0,
) -> dict[str, Any]:
    """Poisson arrivals at `rate` per second for `duration_s`, whatever the answers take.

    Unlike `run_load`, a slow answer does not slow the arrivals (open loop): latency is
    measured as a client population sees it. `hostile_share` of arrivals are drawn from
    `hostile` ((kind, body, content type); kind "stalled upload" sends half and stops);
    only the good requests' latencies are reported, the hostile ones by outcome.
    `keep_alive_s` is the server's idle keep-alive: older idle connections are not reused.
    """
    good_requests = [request_bytes(path, body, ctype) for body, ctype in good]
    hostile_requests = [(kind, request_bytes(path, body, ctype)) for kind, body, ctype in hostile]
    return asyncio.run(
        _open_loop(
            port,
            good_requests,
            hostile_requests,
            rate,
            duration_s,
            hostile_share,
            seed,
            timeout_s,
            keep_alive_s,
        )
    )
