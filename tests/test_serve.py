"""`knd serve` through a real uvicorn on 127.0.0.1: routes, limits, auth, batching, the log."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from tests.conftest import free_port, stop_process, wait_ready

from kndcli.config import LABELS
from kndcli.monitoring.predlog import open_log
from kndcli.serving.app import create_app
from kndcli.serving.settings import ServeSettings
from test_predlog import gcs_emulator  # noqa: F401 - a fixture used below


def wav_bytes(
    seconds: float = 1.0,
    rate: int = 16000,
    freq: float = 220.0,
    fmt: str = "WAV",
    channels: int = 1,
) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    if channels > 1:
        x = np.repeat(x[:, None], channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt)
    return buf.getvalue()


class LiveServer:
    """A real uvicorn serving `create_app(settings)` in a thread, on a loopback port."""

    def __init__(self, settings: ServeSettings) -> None:
        import uvicorn

        self.settings = settings
        self.app = create_app(settings)
        self.url = f"http://127.0.0.1:{settings.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=settings.port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def settings(tiny_bundle: Path, tmp_path: Path) -> ServeSettings:
    return ServeSettings(
        model=str(tiny_bundle),
        port=free_port(),
        max_body_mb=1.0,
        max_duration_s=10.0,
        max_batch_files=4,
        max_wait_ms=5.0,
        log_sink=str(tmp_path / "predictions.sqlite"),
        api_token="",
    )


@pytest.fixture
def serve(settings: ServeSettings) -> Iterator[Callable[..., LiveServer]]:
    """Start a server with the default test settings plus overrides; stopped at teardown."""
    started: list[LiveServer] = []

    def start(**overrides: object) -> LiveServer:
        live = LiveServer(replace(settings, **overrides)).start()
        started.append(live)
        return live

    yield start
    for live in started:
        if live.thread.is_alive():
            live.stop()


@pytest.fixture
def server(serve: Callable[..., LiveServer]) -> LiveServer:
    return serve()


def post_file(url: str, data: bytes, name: str = "clip.wav", **kw: object) -> httpx.Response:
    return httpx.post(url + "/predict", files={"file": (name, data, "audio/wav")}, timeout=30, **kw)


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status
    for word in words:
        assert word in body["error"], body
    return body


# ----------------------------------------------------------------------------- routes


def test_health_ready_docs_metrics(server: LiveServer) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready").json()
    assert ready["status"] == "ready" and ready["labels"] == LABELS
    assert ready["model_version"].startswith("tiny@")
    docs = httpx.get(server.url + "/docs").text
    assets = re.findall(r"""(?:src|href)=["']([^"']+\.(?:js|css))["']""", docs)
    assert len(assets) >= 2, docs
    for asset in assets:  # offline: every script and style comes from this server
        assert asset.startswith("/"), asset
        served = httpx.get(server.url + asset)
        assert served.status_code == 200 and len(served.content) > 1000, asset
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/predict", "/predict/batch", "/health", "/ready", "/metrics"} <= set(spec["paths"])
    for path in spec["paths"].values():  # no route takes a path, URL or model name
        for op in path.values():
            assert [p["name"] for p in op.get("parameters", [])] in ([], ["timeline"])
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'knd_requests_total{route="/health",status="200"} 1.0' in metrics.text
    assert "knd_request_latency_seconds_bucket" in metrics.text


def test_predict_multipart_and_raw(server: LiveServer) -> None:
    response = post_file(server.url, wav_bytes(1.0))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] in LABELS and set(body["probabilities"]) == set(LABELS)
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["duration"] == pytest.approx(1.0, abs=0.01)
    assert body["model_version"] == server.app.state.bundle.version
    assert "windows" not in body
    raw = httpx.post(
        server.url + "/predict?timeline=true",
        content=wav_bytes(5.0, rate=44100),
        headers={"content-type": "audio/wav"},
        timeout=30,
    )
    assert raw.status_code == 200, raw.text
    assert len(raw.json()["windows"]) >= 3
    flac = httpx.post(
        server.url + "/predict",
        content=wav_bytes(1.0, fmt="FLAC", channels=2),
        headers={"content-type": "audio/flac"},
        timeout=30,
    )
    assert flac.status_code == 200, flac.text
    metrics = httpx.get(server.url + "/metrics").text
    assert 'knd_requests_total{route="/predict",status="200"} 3.0' in metrics
    assert (
        sum(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("knd_predictions_total{")
        )
        == 3
    )


def test_batch_route_scores_good_files_and_reports_bad_ones(server: LiveServer) -> None:
    files = [
        ("files", ("a.wav", wav_bytes(1.0, freq=200), "audio/wav")),
        ("files", ("junk.wav", b"definitely not audio" * 10, "audio/wav")),
        ("files", ("b.flac", wav_bytes(2.0, fmt="FLAC"), "audio/flac")),
    ]
    response = httpx.post(server.url + "/predict/batch", files=files, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scored"] == 2 and body["failed"] == 1
    a, junk, b = body["results"]
    assert a["label"] in LABELS and b["label"] in LABELS
    assert "not a readable audio file" in junk["error"] and "label" not in junk
    assert junk["status"] == 422 and "retry_after_s" not in junk  # the file's fault: no retry
    logged = {r["request_id"]: r for r in open_log(server.settings.log_sink).read()}
    assert set(logged) == {a["request_id"], b["request_id"]}
    assert logged[b["request_id"]]["filename"] == "b.flac"


def test_past_the_request_deadline_is_504_with_retry_after(
    serve: Callable[..., LiveServer],
) -> None:
    """No 9-second clip is scored within a millisecond: /predict and a batch of such clips
    are 504 with Retry-After (the server's fault: send again), not a 200 of failures."""
    server = serve(request_timeout_s=0.001)
    clip = wav_bytes(9.0)
    single = post_file(server.url, clip)
    assert_error(single, 504, "timed out")
    assert single.headers["retry-after"] == "2"
    files = [("files", (f"c{i}.wav", clip, "audio/wav")) for i in range(3)]
    whole = httpx.post(server.url + "/predict/batch", files=files, timeout=30)
    assert_error(whole, 504, "timed out")
    assert whole.headers["retry-after"] == "2"


def test_unknown_route_and_method_are_json(server: LiveServer) -> None:
    assert_error(httpx.get(server.url + "/nope"), 404, "Not Found")
    assert_error(httpx.get(server.url + "/predict"), 405)


# ----------------------------------------------------------------------------- limits


def test_oversized_body_with_content_length_is_413(server: LiveServer) -> None:
    big = wav_bytes(40.0)  # 1.28 MB of PCM over the 1 MB limit
    body = assert_error(post_file(server.url, big), 413, "1 MB limit")
    assert body["request_id"]
    raw = httpx.post(
        server.url + "/predict", content=big, headers={"content-type": "audio/wav"}, timeout=30
    )
    assert_error(raw, 413, "limit")


def test_oversized_chunked_body_without_length_is_413(server: LiveServer) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(64):  # 4 MB in 64 kB chunks, no Content-Length
            sent += 65536
            yield b"\0" * 65536

    response = httpx.post(
        server.url + "/predict", content=chunks(), headers={"content-type": "audio/wav"}, timeout=30
    )
    assert_error(response, 413, "limit")
    assert httpx.get(server.url + "/health").status_code == 200


def test_chunked_multipart_over_limit_is_413(server: LiveServer) -> None:
    boundary = b"knd-boundary"
    head = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; '
        b'filename="big.wav"\r\nContent-Type: audio/wav\r\n\r\n'
    )

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(40):
            yield b"\1" * 65536
        yield b"\r\n--" + boundary + b"--\r\n"

    response = httpx.post(
        server.url + "/predict",
        content=chunks(),
        timeout=30,
        headers={"content-type": "multipart/form-data; boundary=knd-boundary"},
    )
    assert_error(response, 413, "limit")


def test_wrong_content_type_is_415(server: LiveServer) -> None:
    assert_error(
        httpx.post(
            server.url + "/predict", content=b"hello", headers={"content-type": "text/plain"}
        ),
        415,
        "text/plain",
    )
    assert_error(
        httpx.post(server.url + "/predict", json={"path": "/etc/passwd"}), 415, "application/json"
    )
    assert_error(
        httpx.post(
            server.url + "/predict/batch",
            content=wav_bytes(),
            headers={"content-type": "audio/wav"},
        ),
        415,
        "multipart",
    )


def test_bad_audio_is_422(serve: Callable[..., LiveServer]) -> None:
    server = serve(max_duration_s=2.0)
    assert_error(post_file(server.url, wav_bytes(3.0)), 422, "too long")
    assert_error(
        post_file(server.url, b"GIF89a garbage bytes" * 50), 422, "not a readable audio file"
    )
    assert_error(post_file(server.url, b""), 422, "empty")
    assert_error(
        httpx.post(server.url + "/predict", content=b"", headers={"content-type": "audio/wav"}),
        422,
        "empty",
    )
    truncated = wav_bytes(1.0)[:5000]
    assert_error(post_file(server.url, truncated), 422, "truncated")
    no_file = httpx.post(
        server.url + "/predict",
        data={"note": "no file here"},
        files={"other": ("x.txt", b"", "text/plain")},
    )
    assert no_file.status_code in (200, 422)
    only_fields = httpx.post(
        server.url + "/predict",
        content=b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nv\r\n--b--\r\n',
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert_error(only_fields, 422, "no file")
    # The worker survived all of it.
    assert post_file(server.url, wav_bytes(1.0)).status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert 'knd_errors_total{reason="bad_input",route="/predict"}' in metrics


def test_too_many_files_in_a_batch(server: LiveServer) -> None:
    files = [("files", (f"{i}.wav", wav_bytes(0.5), "audio/wav")) for i in range(5)]
    assert_error(
        httpx.post(server.url + "/predict/batch", files=files, timeout=30), 413, "at most 4"
    )
    empty = httpx.post(
        server.url + "/predict/batch",
        data={"a": "b"},
        headers={"content-type": "multipart/form-data; boundary=x"},
        content=b"--x--\r\n",
    )
    assert empty.status_code in (413, 422)


# ----------------------------------------------------------------------------- auth, state


def test_bearer_token(serve: Callable[..., LiveServer]) -> None:
    server = serve(api_token="s3cret")
    clip = wav_bytes(0.5)
    assert_error(post_file(server.url, clip), 401, "bearer")
    assert_error(post_file(server.url, clip, headers={"authorization": "Bearer nope"}), 401)
    assert_error(post_file(server.url, clip, headers={"authorization": "Basic s3cret"}), 401)
    ok = post_file(server.url, clip, headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    batch = httpx.post(
        server.url + "/predict/batch", files=[("files", ("a.wav", clip, "audio/wav"))]
    )
    assert_error(batch, 401)
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no token
    assert httpx.get(server.url + "/ready").status_code == 200


def test_token_from_environment(
    serve: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KND_API_TOKEN", "from-env")
    server = serve(api_token=None)
    assert post_file(server.url, wav_bytes(0.5)).status_code == 401
    assert (
        post_file(
            server.url, wav_bytes(0.5), headers={"authorization": "Bearer from-env"}
        ).status_code
        == 200
    )


def test_a_tokenless_loopback_service_refuses_other_names_and_foreign_pages(
    serve: Callable[..., LiveServer],
) -> None:
    """Without a token, binding 127.0.0.1 must also keep out the web pages its user opens:
    a page renamed onto 127.0.0.1 (DNS rebinding: Host names its domain) or a form or
    WebSocket posted across origins (Origin names its site) is refused, and not logged."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from kndcli.serving.stream_client import _refusal

    server = serve()
    port = server.settings.port
    clip = wav_bytes(0.5)
    rebound = post_file(server.url, clip, headers={"host": f"evil.example:{port}"})
    assert_error(rebound, 403, "'evil.example:", "KND_API_TOKEN", "--insecure-no-token")
    cross = post_file(server.url, clip, headers={"origin": "https://evil.example"})
    assert_error(cross, 403, "'https://evil.example'")
    assert_error(post_file(server.url, clip, headers={"origin": "null"}), 403)
    ws_url = f"ws://127.0.0.1:{port}/stream"
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url, origin="https://evil.example", open_timeout=10)
    assert refused.value.response.status_code == 403
    # The refusal carries its reason, which `knd stream` prints.
    assert "a page from 'https://evil.example'" in _refusal(refused.value)
    # Loopback names, with or without a port or a loopback page, are the service's users.
    for headers in (
        {},
        {"host": f"localhost:{port}"},
        {"host": f"[::1]:{port}"},
        {"origin": f"http://localhost:{port}"},
    ):
        assert post_file(server.url, clip, headers=headers).status_code == 200, headers
    with connect(ws_url, origin=f"http://127.0.0.1:{port}", open_timeout=10):
        pass
    server.stop()  # the log is written by the time the server has stopped
    assert len(open_log(server.settings.log_sink).read()) == 4  # no refused request logged
    # A token, or --insecure-no-token for a proxy that rewrites Host, turns the check off.
    tokened = serve(api_token="s3cret", port=free_port())
    headers = {"host": "evil.example", "authorization": "Bearer s3cret"}
    assert post_file(tokened.url, clip, headers=headers).status_code == 200
    assert post_file(tokened.url, clip, headers={"host": "evil.example"}).status_code == 401
    proxied = serve(allow_no_token=True, port=free_port())
    assert post_file(proxied.url, clip, headers={"host": "emotion.internal"}).status_code == 200


def test_not_ready_is_503(server: LiveServer) -> None:
    server.app.state.service.ready = False  # as during shutdown
    assert_error(httpx.get(server.url + "/ready"), 503, "not loaded")
    assert_error(post_file(server.url, wav_bytes(0.5)), 503, "not loaded")
    assert httpx.get(server.url + "/health").status_code == 200
    server.app.state.service.ready = True
    assert post_file(server.url, wav_bytes(0.5)).status_code == 200


# ----------------------------------------------------------------------------- concurrency


async def fire(url: str, n: int, clip: bytes) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return list(
            await asyncio.gather(
                *(
                    client.post(url + "/predict", files={"file": (f"c{i}.wav", clip, "audio/wav")})
                    for i in range(n)
                )
            )
        )


def test_concurrent_requests_share_forward_passes(serve: Callable[..., LiveServer]) -> None:
    server = serve(max_wait_ms=50.0, max_batch_size=16)
    responses = asyncio.run(fire(server.url, 16, wav_bytes(3.0, rate=48000)))
    assert [r.status_code for r in responses] == [200] * 16
    batcher = server.app.state.batcher
    assert batcher.items == 16
    assert batcher.batches < 16
    assert batcher.largest_batch > 1
    metrics = httpx.get(server.url + "/metrics").text
    assert f"knd_batches_total {float(batcher.batches)}" in metrics


def test_log_reconciles_with_acknowledged_requests(server: LiveServer) -> None:
    responses = asyncio.run(fire(server.url, 24, wav_bytes(1.5)))
    assert all(r.status_code == 200 for r in responses)
    ids = [r.json()["request_id"] for r in responses]
    assert len(set(ids)) == 24
    rows = open_log(server.settings.log_sink).read()
    logged = [r["request_id"] for r in rows]
    assert sorted(logged) == sorted(ids)  # every acknowledged request exactly once
    row = rows[0]
    assert row["model_version"] == server.app.state.bundle.version
    assert row["filename"].startswith("c") and row["latency_ms"] > 0
    assert row["duration_s"] == pytest.approx(1.5, abs=0.01)
    assert row["rms_dbfs"] < 0 and row["sample_rate"] == 16000


def test_restart_keeps_the_log(serve: Callable[..., LiveServer]) -> None:
    first = serve()
    old = [post_file(first.url, wav_bytes(0.5)).json()["request_id"] for _ in range(3)]
    first.stop()
    second = serve(port=free_port())
    new = [post_file(second.url, wav_bytes(0.5)).json()["request_id"] for _ in range(2)]
    second.stop()
    logged = [r["request_id"] for r in open_log(first.settings.log_sink).read()]
    assert logged == old + new


def test_a_request_the_log_refuses_is_503_not_acknowledged(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """No 200 without a log record: a failed write is a 503 and the service recovers.

    The client is told why and to retry, but not where the log is; the server log has both.
    """
    import sqlite3

    ok = post_file(server.url, wav_bytes(0.5)).json()["request_id"]
    other = sqlite3.connect(server.settings.log_sink)  # e.g. an operator's tool, a full disk
    other.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON predictions "
        "BEGIN SELECT RAISE(ABORT, 'disk quota exceeded'); END"
    )
    other.commit()
    with caplog.at_level(logging.ERROR, logger="kndcli.serving.service"):
        body = assert_error(post_file(server.url, wav_bytes(0.5)), 503, "prediction log", "quota")
    assert str(server.settings.log_sink) not in str(body)
    assert "disk quota exceeded" in caplog.text and str(server.settings.log_sink) in caplog.text
    other.execute("DROP TRIGGER refuse")
    other.commit()
    other.close()
    again = post_file(server.url, wav_bytes(0.5))
    assert again.status_code == 200
    logged = [r["request_id"] for r in open_log(server.settings.log_sink).read()]
    assert logged == [ok, again.json()["request_id"]]
    assert body["request_id"] and body["request_id"] not in logged


@pytest.mark.usefixtures("gcs_emulator")
def test_gcs_log_is_flushed_at_shutdown(serve: Callable[..., LiveServer], tmp_path: Path) -> None:
    spool = str(tmp_path / "spool")
    server = serve(log_sink="gs://knd-logs/serve", log_flush_s=3600, log_spool=spool)
    ids = [post_file(server.url, wav_bytes(0.5)).json()["request_id"] for _ in range(3)]
    reader = open_log("gs://knd-logs/serve", flush_s=0, spool=tmp_path / "reader")
    assert reader.fs.find("knd-logs/serve") == []
    server.stop()
    rows = reader.read()
    assert sorted(r["request_id"] for r in rows) == sorted(ids)


# ----------------------------------------------------------------------------- the command


@contextmanager
def knd_serve(args: list[str], env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from kndcli.cli.main import main; main()", "serve", *args],
        env={**os.environ, **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        stop_process(proc)


@pytest.mark.parametrize("workers", [1, 2])
def test_knd_serve_command_honours_port_env(
    tiny_bundle: Path, tmp_path: Path, workers: int
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sink = tmp_path / "log.sqlite"
    args = [
        "--model",
        str(tiny_bundle),
        "--workers",
        str(workers),
        "--set",
        f"serve.log_sink={sink}",
    ]
    with knd_serve(args, {"PORT": str(port), "KND_API_TOKEN": ""}, tmp_path) as proc:
        wait_ready(url, proc)
        ids = [post_file(url, wav_bytes(0.5)).json()["request_id"] for _ in range(6)]
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stdout.read()
    assert sorted(r["request_id"] for r in open_log(sink).read()) == sorted(ids)


def test_a_token_given_in_code_guards_every_worker_process(tiny_bundle: Path, tmp_path: Path):
    """Python API: ServeSettings(api_token=..., workers=2) with no KND_API_TOKEN in the
    environment. The worker processes rebuild their settings from JSON, which never holds
    the token; each must still refuse a request without it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    code = (
        "from kndcli.serving.app import run_server\n"
        "from kndcli.serving.settings import ServeSettings\n"
        f"run_server(ServeSettings(model={str(tiny_bundle)!r}, port={port}, workers=2, "
        f"api_token='code-token', scoring_processes=0, log_sink={str(tmp_path / 'l.sqlite')!r}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "KND_API_TOKEN"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_ready(url, proc)
        with httpx.Client(timeout=30) as client:  # new connections reach both workers
            refused = [
                client.post(
                    url + "/predict",
                    content=wav_bytes(0.5),
                    headers={"Content-Type": "audio/wav", "Connection": "close"},
                )
                for _ in range(6)
            ]
            allowed = client.post(
                url + "/predict",
                content=wav_bytes(0.5),
                headers={"Content-Type": "audio/wav", "Authorization": "Bearer code-token"},
            )
        assert [r.status_code for r in refused] == [401] * 6
        assert allowed.status_code == 200, allowed.text
    finally:
        stop_process(proc)


def test_knd_serve_without_a_bundle_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from kndcli.cli.main import main; main()",
            "serve",
            "--port",
            str(free_port()),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no bundle at models/latest" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- batcher


def test_batcher_isolates_a_failing_item_and_refuses_work_after_close() -> None:
    from kndcli.serving.batcher import BatcherClosedError, MicroBatcher

    calls: list[list[int]] = []

    def square(items: list[int]) -> list[int]:
        calls.append(list(items))
        if 13 in items:
            raise ValueError("unlucky")
        return [i * i for i in items]

    batcher = MicroBatcher(square, max_batch_size=8, max_wait_ms=200)
    futures = [batcher.submit_future(i) for i in (2, 13, 3, 4)]
    assert futures[0].result(10) == 4 and futures[2].result(10) == 9
    with pytest.raises(ValueError, match="unlucky"):
        futures[1].result(10)
    assert calls[0] == [2, 13, 3, 4]  # gathered into one batch, then retried one by one
    assert batcher.items == 3 and batcher.largest_batch == 1
    batcher.close()
    with pytest.raises(BatcherClosedError):
        batcher.submit_future(5)


def test_batcher_respects_max_batch_size() -> None:
    from kndcli.serving.batcher import MicroBatcher

    sizes: list[int] = []
    gate = threading.Event()

    def run(items: list[int]) -> list[int]:
        gate.wait(10)
        sizes.append(len(items))
        return items

    batcher = MicroBatcher(run, max_batch_size=4, max_wait_ms=100)
    futures = [batcher.submit_future(i) for i in range(10)]
    gate.set()
    assert [f.result(10) for f in futures] == list(range(10))
    assert max(sizes) <= 4 and sum(sizes) == 10
    batcher.close()


def test_batcher_runs_batches_side_by_side() -> None:
    from kndcli.serving.batcher import MicroBatcher

    both_running = threading.Barrier(2, timeout=10)

    def run(items: list[int]) -> list[int]:
        both_running.wait()  # breaks (and fails the items) unless two batches overlap
        return items

    batcher = MicroBatcher(run, max_batch_size=1, max_wait_ms=0, concurrency=2)
    futures = [batcher.submit_future(i) for i in range(2)]
    assert [f.result(15) for f in futures] == [0, 1]
    batcher.close()
    assert not any(t.is_alive() for t in batcher._threads)


def test_batcher_takes_requests_in_turn() -> None:
    """A request's sixth clip does not wait for another request's five: owners alternate."""
    from kndcli.serving.batcher import MicroBatcher

    order: list[str] = []
    started = threading.Event()
    gate = threading.Event()

    def run(items: list[str]) -> list[str]:
        started.set()
        gate.wait(10)
        order.extend(items)
        return items

    batcher = MicroBatcher(run, max_batch_size=1, max_wait_ms=0)
    futures = [batcher.submit_future(f"a{i}", owner="a") for i in range(6)]
    assert started.wait(10)  # a0 is being scored, a1..a5 wait
    futures.append(batcher.submit_future("b0", owner="b"))
    gate.set()
    assert [f.result(10) for f in futures][-1] == "b0"
    assert order == ["a0", "a1", "b0", "a2", "a3", "a4", "a5"]  # FIFO would put b0 last
    batcher.close()


def test_a_single_clip_is_not_queued_behind_big_batches(serve: Callable[..., LiveServer]) -> None:
    """Two /predict/batch of 16 long clips, then one short clip once they are being
    scored: it is answered long before them (FIFO made it wait for all 32 clips)."""
    # One clip per forward pass: what is in flight when the clip arrives is one clip a worker.
    server = serve(max_batch_files=16, max_body_mb=40.0, max_duration_s=60.0, max_batch_size=1)
    long_clip = wav_bytes(20.0, rate=48000)
    files = [("files", (f"long{i}.wav", long_clip, "audio/wav")) for i in range(16)]
    batcher = server.app.state.batcher

    async def scenario() -> tuple[float, float]:
        async with httpx.AsyncClient(timeout=120) as client:
            began = time.perf_counter()

            async def finished(call) -> float:
                response = await call
                assert response.status_code == 200, response.text
                return time.perf_counter() - began

            big = [
                asyncio.create_task(
                    finished(client.post(server.url + "/predict/batch", files=files))
                )
                for _ in range(2)
            ]
            while batcher.items < 2:  # both batches uploaded and their clips being scored
                await asyncio.sleep(0.01)
            one = {"file": ("one.wav", wav_bytes(1.0), "audio/wav")}
            sent = time.perf_counter() - began
            single = await finished(client.post(server.url + "/predict", files=one)) - sent
            return single, min(await asyncio.gather(*big)) - sent

    # From the moment the clip is sent: its own wait against what the batches still had to do.
    single, batches_left = asyncio.run(scenario())
    assert single < 0.5 * batches_left, (single, batches_left)


# ----------------------------------------------------------------------------- scoring pool


def test_scoring_pool_survives_a_worker_crash(tiny_bundle: Path) -> None:
    """A clip that kills its worker is refused; the clips beside it are still scored."""
    from kndcli.serving.batcher import MicroBatcher
    from kndcli.serving.scoring import Clip, ScoringCrashedError, ScoringPool, WorkerSpec
    from scoring_tasks import crash_on_poison

    pool = ScoringPool(WorkerSpec(model=str(tiny_bundle)), 2, task=crash_on_poison)
    batcher = MicroBatcher(pool.run, max_batch_size=8, max_wait_ms=200, concurrency=3)
    try:
        good = wav_bytes(1.0)
        clips = [Clip(good, "a"), Clip(good, "poison"), Clip(b"not audio", "bad"), Clip(good, "b")]
        futures = [batcher.submit_future(c) for c in clips]
        with pytest.raises(ScoringCrashedError):
            futures[1].result(120)
        a, bad, b = (futures[i].result(120) for i in (0, 2, 3))
        assert a.label in LABELS and b.label in LABELS and a.features["duration_s"] == 1.0
        assert bad.error and "bad" in bad.error and bad.label is None
        assert pool.restarts >= 1
        assert pool.run([Clip(good, "after")])[0].label in LABELS  # the new pool works
    finally:
        batcher.close()
        pool.close()


def test_scoring_workers_import_no_torch(tiny_bundle: Path) -> None:
    from kndcli.serving.scoring import ScoringPool, WorkerSpec
    from scoring_tasks import heavy_modules

    pool = ScoringPool(WorkerSpec(model=str(tiny_bundle)), 1, task=heavy_modules)
    try:
        assert pool.run([]) == []
    finally:
        pool.close()


def test_in_process_scoring(serve: Callable[..., LiveServer]) -> None:
    server = serve(scoring_processes=0)
    assert server.app.state.service.pool.processes == 0
    response = post_file(server.url, wav_bytes(1.0))
    assert response.status_code == 200 and response.json()["label"] in LABELS
    assert_error(post_file(server.url, b"junk", name="junk.wav"), 422, "junk.wav")


@pytest.mark.parametrize("value", [-1, "many", 1.5])
def test_scoring_processes_must_be_auto_or_a_count(settings: ServeSettings, value: object) -> None:
    from kndcli.errors import ConfigError

    with pytest.raises(ConfigError, match="serve.scoring_processes"):
        replace(settings, scoring_processes=value).validate()
    assert replace(settings, scoring_processes="auto").processes == (os.cpu_count() or 1)


# ----------------------------------------------------------------------------- monitoring


def test_monitoring_needs_a_configured_token(server: LiveServer) -> None:
    response = httpx.get(server.url + "/monitoring", timeout=30)
    assert response.status_code == 404
    assert "KND_API_TOKEN" in response.json()["error"]


def test_monitoring_report_of_logged_requests(serve: Callable[..., LiveServer]) -> None:
    live = serve(api_token="s3cret")
    auth = {"authorization": "Bearer s3cret"}
    for i in range(5):
        assert post_file(live.url, wav_bytes(0.5 + 0.1 * i), headers=auth).status_code == 200
    assert httpx.get(live.url + "/monitoring", timeout=60).status_code == 401
    response = httpx.get(live.url + "/monitoring", headers=auth, timeout=120)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html" in response.text.lower()
    # Five requests are too few to judge: the page says so instead of inventing a verdict.
    assert "cannot" in response.text.lower()
