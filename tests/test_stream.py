"""Live streams: `knd serve`'s /stream WebSocket and the `knd stream` client, on loopback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from bench.recordings import long_recording
from tests.conftest import free_port, ravdess_clips, wait_ready
from tests.test_predict import KND
from tests.test_serve import knd_serve
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from kndcli.errors import KndError, UsageError
from kndcli.monitoring.predlog import open_log
from kndcli.serving.stream_client import stream_audio, stream_url

TOKEN = "stream-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class StreamServer:
    url: str
    proc: subprocess.Popen
    log_sink: Path

    @property
    def ws(self) -> str:
        return stream_url(self.url)


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory) -> Iterator[StreamServer]:
    """A real `knd serve` with a token and small stream limits."""
    tmp = tmp_path_factory.mktemp("stream")
    port = free_port()
    sink = tmp / "log.sqlite"
    args = ["--model", str(tiny_bundle), "--port", str(port)]
    for key, value in {
        "serve.log_sink": sink,
        "serve.max_streams": 2,
        "serve.stream_idle_s": 1,
        "serve.stream_max_s": 600,
        "serve.stream_max_message_kb": 16,
        # Shorter than a real-time stream: the head deadline must not cut a WebSocket.
        "serve.head_timeout_s": 2,
        # Clients' files only as 16-bit WAV: the server's own float-WAV windows must pass.
        "audio.formats": "[WAV/PCM_16]",
    }.items():
        args += ["--set", f"{key}={value}"]
    with knd_serve(args, {"KND_API_TOKEN": TOKEN}, tmp) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        yield StreamServer(url, proc, sink)


@pytest.fixture(scope="module")
def recording(ravdess_root: Path, tmp_path_factory) -> Path:
    """8 s of real speech with pauses, 16-bit 16 kHz (what the client sends unchanged)."""
    path = tmp_path_factory.mktemp("rec") / "call.wav"
    long_recording(ravdess_clips(ravdess_root, [6])[::7], 8.0, path, seed=3)
    return path


def pcm16(path: Path) -> np.ndarray:
    return sf.read(path, dtype="int16")[0]


def chunks(samples: np.ndarray, size: int = 1600) -> list[bytes]:
    data = samples.astype("<i2").tobytes()
    return [data[i : i + 2 * size] for i in range(0, len(data), 2 * size)]


def close_of(ws, timeout: float = 15) -> tuple[int, str, list[dict]]:
    """Read until the server closes: its code, reason, and the events before."""
    events = []
    try:
        while True:
            events.append(json.loads(ws.recv(timeout=timeout)))
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, "closed without a close frame"
        return exc.rcvd.code, exc.rcvd.reason, events


def start(ws, **fields: object) -> None:
    """Send the start message; a server that refused the stream at once may have closed
    already (`close_of` then reads why)."""
    message = {"type": "start", "sample_rate": 16000, "encoding": "pcm16", **fields}
    with contextlib.suppress(ConnectionClosed):
        ws.send(json.dumps(message))


def test_windows_are_scored_like_predict_and_logged(server: StreamServer, recording: Path):
    seen: list[dict] = []
    result = stream_audio(
        server.ws, chunks(pcm16(recording)), sample_rate=16000, speed=0, token=TOKEN,
        on_event=seen.append,
    )  # fmt: skip
    ready, *windows, summary = seen
    assert ready["type"] == "ready" and summary == result.summary
    hop, window = ready["hop_s"], ready["window_s"]
    assert [w["start"] for w in windows] == pytest.approx([i * hop for i in range(len(windows))])
    assert all(w["end"] - w["start"] == pytest.approx(window) for w in windows)
    assert windows[-1]["end"] >= 8.0 - hop / 2 and result.events == len(windows)
    assert summary["windows"] == len(windows) and summary["duration"] == pytest.approx(8.0)
    mean = np.mean([list(w["probabilities"].values()) for w in windows], axis=0)
    assert list(summary["probabilities"].values()) == pytest.approx(mean, abs=1e-5)

    # The same samples uploaded to /predict get the same answer: one model, frontend,
    # calibration and audio path.
    samples = pcm16(recording)
    for w in windows[:3]:
        cut = samples[int(w["start"] * 16000) : int(w["end"] * 16000)]
        body = io.BytesIO()
        sf.write(body, cut, 16000, format="WAV", subtype="PCM_16")
        answer = httpx.post(
            server.url + "/predict", content=body.getvalue(),
            headers={**AUTH, "Content-Type": "audio/wav"}, timeout=30,
        ).json()  # fmt: skip
        assert answer["label"] == w["label"]
        for label, p in answer["probabilities"].items():
            assert w["probabilities"][label] == pytest.approx(p, abs=1e-5)
    logged = [r for r in open_log(server.log_sink).read() if r["filename"].startswith("stream-")]
    assert len(logged) >= len(windows)
    body = io.BytesIO()  # a client's float WAV is refused: audio.formats holds for files
    sf.write(body, cut, 16000, format="WAV", subtype="FLOAT")
    refused = httpx.post(
        server.url + "/predict", content=body.getvalue(),
        headers={**AUTH, "Content-Type": "audio/wav"}, timeout=30,
    )  # fmt: skip
    assert refused.status_code == 422 and "audio.formats" in refused.json()["error"]


def test_below_min_confidence_windows_and_summary_answer_uncertain(
    tiny_bundle: Path, recording: Path, tmp_path: Path
):
    """The threshold read from the environment alone, as a Cloud Run instance started by
    `knd cloud deploy` reads it (KND_MIN_CONFIDENCE, no --set): every window and the
    stream's summary answer "uncertain", and the probabilities still come."""
    port = free_port()
    args = ["--model", str(tiny_bundle), "--port", str(port)]
    env = {"KND_API_TOKEN": TOKEN, "KND_MIN_CONFIDENCE": "0.99"}
    with knd_serve(args, env, tmp_path) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        seen: list[dict] = []
        stream_audio(
            stream_url(url), chunks(pcm16(recording)), sample_rate=16000, speed=0,
            token=TOKEN, on_event=seen.append,
        )  # fmt: skip
    _, *windows, summary = seen
    assert windows and {w["label"] for w in windows} == {"uncertain"}
    assert summary["label"] == "uncertain"
    assert sum(summary["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_events_arrive_while_the_audio_is_still_coming(server: StreamServer, recording: Path):
    began = time.perf_counter()
    arrivals: list[tuple[float, dict]] = []

    def note(event: dict) -> None:
        arrivals.append((time.perf_counter() - began, event))

    stream_audio(
        server.ws, chunks(pcm16(recording)), sample_rate=16000, speed=1.0, token=TOKEN,
        on_event=note,
    )  # fmt: skip
    total = time.perf_counter() - began
    windows = [(t, e) for t, e in arrivals if e["type"] == "window"]
    assert total >= 7.5  # paced to real time
    for t, event in windows[:-1]:  # each event within a second of its audio's end
        assert event["end"] <= t < event["end"] + 1.0, (t, event)


def test_knd_stream_prints_events_and_reports_refusals(server: StreamServer, recording: Path):
    env = {**os.environ, "KND_API_TOKEN": TOKEN, "COLUMNS": "200"}
    cmd = [*KND, "stream", str(recording), "--server", server.url, "--speed", "0"]
    done = subprocess.run([*cmd, "--jsonl"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    kinds = [json.loads(line)["type"] for line in done.stdout.splitlines()]
    assert kinds[0] == "ready" and kinds[-1] == "summary" and kinds.count("window") >= 6
    table = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert table.returncode == 0 and "window" in table.stdout and "0.0-2.0 s" in table.stdout
    env.pop("KND_API_TOKEN")
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 3
    assert "(1008)" in refused.stderr and "bearer token" in refused.stderr
    raw = pcm16(recording).astype("<i2").tobytes()
    piped = subprocess.run(
        [*KND, "stream", "-", "--server", server.url, "--speed", "0", "--jsonl"],
        input=raw, capture_output=True, env={**env, "KND_API_TOKEN": TOKEN}, timeout=60,
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    lines = piped.stdout.decode().splitlines()
    assert [json.loads(line) for line in lines][-1]["duration"] == pytest.approx(8.0)


@pytest.mark.parametrize(
    ("start_fields", "code", "words"),
    [
        ({"encoding": "mp3"}, 1003, "encoding 'mp3'"),
        ({"sample_rate": 1}, 1003, "audio.min_sample_rate"),
        ({"type": "hello"}, 1003, '"start"'),
        ({"encoding": ["pcm16"]}, 1003, "encoding ['pcm16']"),
    ],
)
def test_a_bad_start_is_closed_with_a_reason(server, start_fields, code, words) -> None:
    with connect(server.ws, additional_headers=AUTH) as ws:
        start(ws, **start_fields)
        got, reason, _ = close_of(ws)
    assert got == code and words in reason


def test_idle_big_messages_and_too_many_streams_are_closed(server: StreamServer) -> None:
    with connect(server.ws, additional_headers=AUTH) as ws:
        start(ws)
        ws.recv(timeout=5)  # ready
        began = time.perf_counter()
        code, reason, _ = close_of(ws)
        assert code == 4408 and "serve.stream_idle_s" in reason
        assert 0.8 < time.perf_counter() - began < 5
    with connect(server.ws, additional_headers=AUTH) as ws:
        start(ws)
        ws.recv(timeout=5)
        ws.send(b"\0" * 32 * 1024)  # over serve.stream_max_message_kb=16
        code, _, _ = close_of(ws)
        assert code == 1009
    first = connect(server.ws, additional_headers=AUTH)
    second = connect(server.ws, additional_headers=AUTH)
    with first, second:
        for ws in (first, second):
            start(ws)
            assert json.loads(ws.recv(timeout=5))["type"] == "ready"
        with connect(server.ws, additional_headers=AUTH) as third:
            start(third)
            code, reason, _ = close_of(third)
        assert code == 1013 and "serve.max_streams" in reason


def test_empty_messages_do_not_keep_a_stream_open(server: StreamServer) -> None:
    """Empty messages add no audio, so they would hold a slot for ever without reaching
    serve.stream_max_s: only audio resets serve.stream_idle_s (1 s here)."""
    with connect(server.ws, additional_headers=AUTH) as ws:
        start(ws)
        ws.recv(timeout=5)  # ready
        began = time.perf_counter()
        with contextlib.suppress(ConnectionClosed):
            while time.perf_counter() - began < 6:
                ws.send(b"")
                time.sleep(0.2)
        code, reason, _ = close_of(ws)
    assert code == 4408 and reason == "no audio for 1 s (serve.stream_idle_s)"
    assert time.perf_counter() - began < 3


def test_a_stream_that_trickles_bytes_is_closed_when_its_audio_time_is_up(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """A byte now and then never reaches serve.stream_max_s of audio nor lets
    serve.stream_idle_s pass: the wall-clock bound frees the slot."""
    port = free_port()
    args = ["--model", str(tiny_bundle), "--port", str(port)]
    for key, value in {"serve.stream_max_s": 2, "serve.stream_idle_s": 1}.items():
        args += ["--set", f"{key}={value}"]
    with knd_serve(args, {"KND_API_TOKEN": TOKEN}, tmp_path) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        with connect(stream_url(url), additional_headers=AUTH) as ws:
            start(ws)
            ws.recv(timeout=5)  # ready
            began = time.perf_counter()
            closed = None
            while closed is None and time.perf_counter() - began < 15:
                try:
                    ws.send(b"\0\0")  # one sample: 1/16000 s of audio
                    ws.recv(timeout=0.3)  # no window is ever complete: nothing comes
                except TimeoutError:
                    continue
                except ConnectionClosed as exc:
                    closed = exc.rcvd
            open_s = time.perf_counter() - began
    assert closed is not None and closed.code == 4413, closed
    assert "audio came slower than it plays" in closed.reason
    assert 2.9 < open_s < 6  # 2 s of audio allowed + 1 s idle, then at most one message


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_fast_sender_that_never_reads_is_held_back_then_cut_off(server: StreamServer):
    """700 s of audio as fast as possible, no event read: the server's memory stays
    flat (it reads only as fast as it scores) and the stream ends at serve.stream_max_s."""
    before = rss_mb(server.proc.pid)
    samples = (np.random.default_rng(0).standard_normal(16000 * 700) * 3000).astype("<i2")
    peak = before
    with connect(server.ws, additional_headers=AUTH) as ws:
        start(ws)
        ws.recv(timeout=5)
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, rss_mb(server.proc.pid))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for chunk in chunks(samples, size=8000):
                ws.send(chunk)
        except ConnectionClosed:
            pass
        finally:
            stop.set()
            watcher.join()
        code, reason, events = close_of(ws)
    assert code == 4413 and "serve.stream_max_s" in reason
    assert len([e for e in events if e["type"] == "window"]) >= 500
    # 700 s of PCM16 is 22 MB: a server that queued what it was sent would pass 10 MB
    # (4 MB measured, most of it the log and the window buffers).
    assert peak - before < 10, (before, peak)


def test_stream_url_and_refused_connections() -> None:
    assert stream_url("http://127.0.0.1:8080") == "ws://127.0.0.1:8080/stream"
    assert stream_url("https://knd.example.run.app/") == "wss://knd.example.run.app/stream"
    port = free_port()
    with pytest.raises(KndError, match="cannot open ws://127.0.0.1"):
        stream_audio(f"ws://127.0.0.1:{port}/stream", [], sample_rate=16000)
    with pytest.raises(UsageError, match="--server"):
        stream_url("ftp://host")


def test_no_stream_route_without_the_token_on_a_private_server(server: StreamServer) -> None:
    with connect(server.ws) as ws:
        start(ws)
        code, reason, events = close_of(ws)
    assert code == 1008 and "bearer token" in reason and events == []


def test_a_close_the_client_never_takes_gives_the_stream_slot_back(monkeypatch) -> None:
    """A client that stopped reading leaves the socket unwritable, so the close frame can
    wait for ever (uvicorn waits for the socket to drain first). Filling loopback buffers
    to that point takes far more events than a bounded test sends, so a socket whose close
    never returns stands in for it: the close gives up and the session ends."""
    import asyncio

    from kndcli.serving import stream

    class Unwritable:
        async def close(self, code: int, reason: str) -> None:
            await asyncio.Event().wait()

    monkeypatch.setattr(stream, "CLOSE_TIMEOUT_S", 0.2)
    began = time.perf_counter()
    asyncio.run(stream._close(Unwritable(), stream.CLOSE_IDLE, "events not read"))
    assert time.perf_counter() - began < 2
