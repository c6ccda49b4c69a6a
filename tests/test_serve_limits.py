"""Slow, idle and greedy clients against a real `knd serve` on 127.0.0.1 (issue 15).

One server with tight limits serves every test here; each test opens a bounded number of
loopback sockets and closes all of them.
"""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from tests.conftest import free_port, stop_process, wait_ready

KND = Path(sys.executable).parent / "knd"
LIMITS = {
    "serve.head_timeout_s": 1.0,
    "serve.body_timeout_s": 1.0,
    "serve.body_min_rate_kb_s": 8.0,
    "serve.max_body_mb": 1.0,
    "serve.max_buffered_mb": 2.0,
    "serve.max_connections": 6,
    "serve.scoring_processes": 0,
    "serve.metrics_need_token": "true",
    "audio.max_channels": 1,  # the whole audio: section reaches the service, not only seconds
}
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("limits") / "log.sqlite"
    sets = [a for k, v in {**LIMITS, "serve.log_sink": log}.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.Popen(
        [KND, "serve", "-m", tiny_bundle, "--port", str(port), *sets],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**__import__("os").environ, "KND_API_TOKEN": TOKEN},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        stop_process(proc)


def clip_bytes(seconds: float = 1.0, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(16000 * seconds)) / 16000
    x = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    sf.write(buf, np.repeat(x[:, None], channels, axis=1), 16000, format="WAV")
    return buf.getvalue()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while data := sock.recv(4096):
            if b"HTTP/1.1" in data:  # an answer is fine too, then the close must follow
                continue
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def raw_upload_head(length: int) -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: audio/wav\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(server):
    with connect(server) as sock:
        started = time.monotonic()
        for byte in b"GET /health HTTP/1.1\r\n":  # slowloris: never finishes the head
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)
            if time.monotonic() - started > 3:
                break
        assert closed_within(sock, 2.0)
        assert time.monotonic() - started < 4.0


def test_a_stalled_body_gets_408_and_the_connection_closes(server):
    with connect(server) as sock:
        sock.sendall(raw_upload_head(500_000) + b"RIFF" + b"\0" * 1000)
        started = time.monotonic()
        sock.settimeout(5)
        answer = b""
        while chunk := sock.recv(4096):  # the server closes after its answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"serve.body_timeout_s" in answer
        assert time.monotonic() - started < 3.0


def send_slowly(sock: socket.socket, data: bytes, chunk: int, every_s: float, for_s: float) -> None:
    """Send `data` in `chunk`-byte pieces `every_s` apart, stopping after `for_s` seconds or
    when the server stops reading."""
    started = time.monotonic()
    for at in range(0, len(data), chunk):
        try:
            sock.sendall(data[at : at + chunk])
        except OSError:
            return
        if time.monotonic() - started > for_s:
            return
        time.sleep(every_s)


def read_answer(sock: socket.socket, seconds: float) -> bytes:
    sock.settimeout(seconds)
    answer = b""
    try:
        while chunk := sock.recv(4096):
            answer += chunk
            if b"\r\n\r\n" in answer and b'"}' in answer:
                break
    except (TimeoutError, ConnectionResetError):
        pass
    return answer


def test_a_body_that_never_pauses_long_but_trickles_gets_408(server):
    """1 KiB every 0.25 s never pauses past serve.body_timeout_s (1 s) but averages 4 KB/s,
    half the 8 KB/s least rate: cut off after about 2 s, not held for the two minutes its
    500 kB would take."""
    with connect(server) as sock:
        sock.sendall(raw_upload_head(500_000))
        started = time.monotonic()
        send_slowly(sock, b"RIFF" + b"\0" * 499_996, 1024, 0.25, for_s=5.0)
        answer = read_answer(sock, 2.0)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"slower than 8 KB/s (serve.body_min_rate_kb_s)" in answer
        assert time.monotonic() - started < 4.0


def test_a_slow_steady_upload_longer_than_the_pause_limit_is_scored(server):
    """A 64 kB clip at 16 KB/s takes 4 s, four times serve.body_timeout_s, and keeps above
    the least rate: it is answered 200."""
    clip = clip_bytes(2.0)  # 16-bit PCM
    assert 60_000 < len(clip) < 70_000
    with connect(server) as sock:
        sock.sendall(raw_upload_head(len(clip)))
        started = time.monotonic()
        send_slowly(sock, clip, 4096, 0.25, for_s=10.0)
        answer = read_answer(sock, 10.0)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert time.monotonic() - started > 3.0


def guarded_upload(reads: list[tuple[float, int]], app_busy_s: float) -> int:
    """Bytes an app takes through BodyGuardMiddleware (1 s pause limit, 64 KB/s least
    rate) when it works `app_busy_s` after its first read; each read of the client's body takes
    (seconds, bytes), as uvicorn's receive() does: at once when bytes were buffered."""
    import asyncio

    from kndcli.serving.guards import BodyGuardMiddleware, UploadBudget

    taken = 0

    async def client() -> dict:
        delay, size = reads.pop(0)
        await asyncio.sleep(delay)
        return {"type": "http.request", "body": b"x" * size, "more_body": bool(reads)}

    async def app(scope: dict, receive, send) -> None:
        nonlocal taken
        taken += len((await receive())["body"])
        await asyncio.sleep(app_busy_s)  # the app's own work, e.g. spooling a part to disk
        while True:
            message = await receive()
            taken += len(message["body"])
            if not message["more_body"]:
                return

    guard = BodyGuardMiddleware(app, UploadBudget(2**20), body_timeout_s=1.0, min_rate=65536)
    asyncio.run(guard({"type": "http"}, client, None))
    return taken


def test_a_busy_app_is_not_charged_to_a_client_that_filled_the_read_buffer():
    """While the app works 3 s, uvicorn reads on until its 64 KiB high-water mark and
    stops: the next read comes back full, so those 3 s were the app's, not the link's,
    and the client (80 KB/s otherwise) is not cut off."""
    reads = [(0.1, 1024), (0.0, 65537), (0.1, 8192), (0.1, 8192)]
    assert guarded_upload(reads, app_busy_s=3.0) == 1024 + 65537 + 2 * 8192


def test_a_client_that_trickles_while_the_app_is_busy_is_still_cut_off():
    """Only 1 KiB came in during the app's 3 s: that time counts against the client, which
    is then too slow for the 64 KB/s least rate (and would not be, within the 1 s grace,
    if only its own reads were timed)."""
    from kndcli.serving.guards import BodyStalled

    reads = [(0.1, 1024), (0.0, 1024), (0.1, 1024), (0.1, 1024)]
    with pytest.raises(BodyStalled, match="slower than 64 KB/s"):
        guarded_upload(reads, app_busy_s=3.0)


def test_a_pipelined_request_may_take_longer_than_the_head_deadline(server):
    """Two requests sent back to back on one connection: the second's head is in before
    the first is answered, and its body then takes 4 s (above the least rate), four times
    serve.head_timeout_s. The head deadline armed by the first answer must not close it."""
    clip = clip_bytes(2.0)
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(health + raw_upload_head(len(clip)) + clip[:4096])
        send_slowly(sock, clip[4096:], 4096, 0.25, for_s=10.0)
        sock.settimeout(10)
        answer = b""
        while answer.count(b"HTTP/1.1 ") < 2 or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        assert re.findall(rb"HTTP/1\.1 (\d+)", answer) == [b"200", b"200"], answer
        assert b'"label"' in answer  # the second answer is the clip's prediction


def test_uploads_in_flight_share_one_byte_budget(server):
    """Two 0.9 MiB uploads that stall hold the 2 MiB budget; a third is refused at once
    with 503 and Retry-After, and after the stalls time out a good clip is scored."""
    chunk = b"\0" * 900_000
    with ExitStack() as stack:
        stalled = [stack.enter_context(connect(server)) for _ in range(2)]
        for sock in stalled:
            sock.sendall(raw_upload_head(1_000_000) + chunk)
        time.sleep(0.3)
        third = stack.enter_context(connect(server))
        third.sendall(raw_upload_head(1_000_000) + chunk)
        third.settimeout(5)
        answer = third.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 2" in answer.lower()
    time.sleep(1.5)  # the stalled bodies time out and give their bytes back
    good = httpx.post(
        server + "/predict",
        content=clip_bytes(),
        headers={"Content-Type": "audio/wav", "Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert good.status_code == 200, good.text


def test_connections_beyond_the_cap_are_answered_503(server):
    with ExitStack() as stack:
        idle = [
            stack.enter_context(connect(server)) for _ in range(LIMITS["serve.max_connections"])
        ]
        assert len(idle) == 6
        answer = httpx.get(server + "/health", timeout=5)
        assert answer.status_code == 503
    time.sleep(0.2)
    assert httpx.get(server + "/health", timeout=5).status_code == 200


def test_the_audio_section_bounds_what_the_service_decodes(server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    mono = httpx.post(
        server + "/predict", files={"file": ("mono.wav", clip_bytes())}, headers=auth, timeout=30
    )
    assert mono.status_code == 200, mono.text
    files = {"file": ("stereo.wav", clip_bytes(channels=2))}
    stereo = httpx.post(server + "/predict", files=files, headers=auth, timeout=30)
    assert stereo.status_code == 422
    assert "audio.max_channels" in stereo.json()["error"]


def test_metrics_can_be_put_behind_the_token(server):
    assert httpx.get(server + "/metrics", timeout=5).status_code == 401
    allowed = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert allowed.status_code == 200 and "knd_requests_total" in allowed.text


def test_serving_other_machines_without_a_token_is_refused(tiny_bundle, tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "KND_API_TOKEN"}
    proc = subprocess.run(
        [KND, "serve", "-m", tiny_bundle, "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "KND_API_TOKEN" in proc.stderr and "--insecure-no-token" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_insecure_no_token_is_an_explicit_choice():
    from kndcli.serving.settings import ServeSettings

    ServeSettings(host="0.0.0.0", allow_no_token=True, api_token="").check_exposure()
    ServeSettings(host="0.0.0.0", api_token="t").check_exposure()
    ServeSettings(host="127.0.0.1", api_token="").check_exposure()
    with pytest.raises(Exception, match="serve.host"):
        ServeSettings(host="0.0.0.0", api_token="").check_exposure()
