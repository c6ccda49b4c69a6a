"""Live scoring over a WebSocket: `/stream` (docs/serving.md, "Live streams").

The client opens the socket (with the bearer token, as on /predict), sends one JSON text
message `{"type": "start", "sample_rate": 16000, "encoding": "pcm16"}` (or "float32"),
then binary messages of mono little-endian samples, and `{"type": "end"}` when done.
The server answers `{"type": "ready", ...}`, then one `{"type": "window", ...}` event
per analysis window as soon as the window's audio has arrived, and a `{"type":
"summary", ...}` before closing with 1000. Each window is scored like an upload to
/predict (the batcher, the scoring workers, the same Predictor and calibration) and
logged like one. Every refusal is a close code with a reason (`CLOSE_*`).

Backpressure: a stream's next message is read only after its ready windows are scored
and sent, uvicorn's sans-I/O WebSocket protocol stops reading the socket after each
message until the app has taken it, and a send waits while the socket's write buffer is
full (a client that stops reading its events gets CLOSE_IDLE after serve.stream_idle_s).
So a client that sends faster than real time, or never reads, is held back by TCP
instead of growing the server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from kndcli.audio import sample_problem
from kndcli.inference.predictor import answer
from kndcli.serving.body import Upload
from kndcli.serving.deps import token_ok
from kndcli.serving.errors import ApiError
from kndcli.serving.service import Scored

log = logging.getLogger(__name__)
router = APIRouter()

CLOSE_NORMAL = 1000
CLOSE_BAD_DATA = 1003  # a start message or audio the server cannot take
CLOSE_POLICY = 1008  # missing or wrong bearer token
CLOSE_TRY_LATER = 1013  # too many streams, model not loaded, scoring unavailable
CLOSE_IDLE = 4408  # no audio (or events not read) for serve.stream_idle_s
CLOSE_TOO_LONG = 4413  # more than serve.stream_max_s of audio

# How long a close may wait for the client to take the close frame. A client that has
# stopped reading leaves the socket unwritable, and the close would wait for ever,
# holding one of serve.max_streams until the server restarts.
CLOSE_TIMEOUT_S = 5.0
ENCODINGS = {"pcm16": np.dtype("<i2"), "float32": np.dtype("<f4")}


class StreamRefused(Exception):
    """End the stream with `code` and `reason` (a WebSocket close)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class StreamFormat:
    sample_rate: int
    encoding: str

    @classmethod
    def parse(cls, text: str, min_rate: int, max_rate: int) -> StreamFormat:
        """The start message, checked; anything else is a CLOSE_BAD_DATA refusal."""
        try:
            message = json.loads(text)
        except ValueError:
            raise StreamRefused(CLOSE_BAD_DATA, "the first message must be JSON") from None
        if not isinstance(message, dict) or message.get("type") != "start":
            raise StreamRefused(CLOSE_BAD_DATA, 'the first message must be {"type": "start", ...}')
        encoding = message.get("encoding", "pcm16")
        if not isinstance(encoding, str) or encoding not in ENCODINGS:
            raise StreamRefused(
                CLOSE_BAD_DATA, f"encoding {encoding!r}: choose {' or '.join(ENCODINGS)}"
            )
        rate = message.get("sample_rate")
        if not isinstance(rate, int) or not min_rate <= rate <= max_rate:
            raise StreamRefused(
                CLOSE_BAD_DATA,
                f"sample_rate {rate!r}: an integer from {min_rate} to {max_rate} Hz "
                "(audio.min_sample_rate, audio.max_sample_rate)",
            )
        return cls(rate, encoding)


class StreamWindows:
    """A live stream's samples, cut into analysis windows of `window_s` every `hop_s`.

    Only the audio a later window still needs is kept: at most one window plus one
    message, however long the stream runs.
    """

    def __init__(self, fmt: StreamFormat, window_s: float, hop_s: float) -> None:
        self.rate = fmt.sample_rate
        self.dtype = ENCODINGS[fmt.encoding]
        self.window = max(1, int(round(window_s * self.rate)))
        self.hop = max(1, int(round(hop_s * self.rate)))
        self.samples = np.zeros(0, np.float32)
        self.first = 0  # stream index of samples[0]
        self.next_start = 0  # stream index where the next window starts
        self.received = 0  # samples received
        self.emitted = 0  # windows cut
        self.partial = b""  # bytes of a sample split across two messages

    @property
    def seconds(self) -> float:
        return self.received / self.rate

    def feed(self, data: bytes) -> list[tuple[float, np.ndarray]]:
        """Add one message's samples; the windows now complete, as (start s, samples)."""
        data = self.partial + data
        usable = len(data) - len(data) % self.dtype.itemsize
        self.partial = data[usable:]
        block = np.frombuffer(data[:usable], self.dtype).astype(np.float32)
        if self.dtype.kind == "i":
            block /= 32768.0
        problem = sample_problem(float(np.abs(block).max(initial=0.0)))
        if problem:
            raise StreamRefused(CLOSE_BAD_DATA, f"audio {problem}")
        self.samples = np.concatenate([self.samples, block])
        self.received += len(block)
        ready = []
        while self.next_start + self.window <= self.received:
            ready.append(self._cut(self.next_start, self.next_start + self.window))
            self.next_start += self.hop
        self._drop(self.next_start)
        return ready

    def finish(self) -> list[tuple[float, np.ndarray]]:
        """The last window: the whole stream if it was shorter than one window, or the
        final `window_s` if more than half a hop arrived after the last window."""
        if self.received == 0:
            return []
        if self.emitted == 0:
            return [self._cut(0, self.received)]
        last_end = self.next_start - self.hop + self.window
        if self.received - last_end > self.hop // 2:
            return [self._cut(self.received - self.window, self.received)]
        return []

    def _cut(self, start: int, end: int) -> tuple[float, np.ndarray]:
        self.emitted += 1
        return start / self.rate, self.samples[start - self.first : end - self.first].copy()

    def _drop(self, before: int) -> None:
        # Keep one window back so that `finish` can still cut the final window.
        keep_from = max(self.first, min(before, self.received - self.window))
        self.samples = self.samples[keep_from - self.first :]
        self.first = keep_from


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """A window as a float WAV: the form in which clips reach the scoring workers."""
    import soundfile as sf

    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV", subtype="FLOAT")
    return out.getvalue()


class StreamCounter:
    """Open streams in this process, against `serve.max_streams`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0


@router.websocket("/stream")
async def stream(websocket: WebSocket) -> None:
    """Live scoring; the protocol is in this module's docstring."""
    app = websocket.app
    settings = app.state.settings
    counter: StreamCounter = app.state.streams
    await websocket.accept()
    counted = False
    try:
        if not token_ok(app.state.api_token, websocket.headers):
            raise StreamRefused(CLOSE_POLICY, "missing or wrong bearer token")
        service = app.state.service
        if service is None or not service.ready:
            raise StreamRefused(CLOSE_TRY_LATER, "model not loaded yet; retry shortly")
        if counter.active >= counter.limit:
            raise StreamRefused(
                CLOSE_TRY_LATER, f"{counter.limit} streams open already (serve.max_streams)"
            )
        counter.active += 1
        counted = True
        app.state.metrics.streams.set(counter.active)
        await _session(websocket, service, settings)
    except StreamRefused as exc:
        await _close(websocket, exc.code, exc.reason)
    except WebSocketDisconnect:
        pass
    finally:
        if counted:
            counter.active -= 1
            app.state.metrics.streams.set(counter.active)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    """Close with a code and reason; a client gone or not reading is given up on."""
    with contextlib.suppress(RuntimeError, WebSocketDisconnect, TimeoutError):
        await asyncio.wait_for(websocket.close(code=code, reason=reason[:120]), CLOSE_TIMEOUT_S)


async def _receive(
    websocket: WebSocket, wait_s: float, idle_s: float, what: str = "message"
) -> dict[str, Any]:
    """The next message, waiting at most `wait_s` (what is left of `idle_s`)."""
    try:
        message = await asyncio.wait_for(websocket.receive(), max(0.0, wait_s))
    except TimeoutError:
        raise StreamRefused(
            CLOSE_IDLE, f"no {what} for {idle_s:g} s (serve.stream_idle_s)"
        ) from None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return message


async def _send(websocket: WebSocket, event: dict[str, Any], settings: Any) -> None:
    """Send one event; a client that has not read for serve.stream_idle_s (the send
    waits while the socket's buffer is full) is closed."""
    try:
        await asyncio.wait_for(websocket.send_json(event), settings.stream_idle_s)
    except TimeoutError:
        raise StreamRefused(
            CLOSE_IDLE,
            f"events not read for {settings.stream_idle_s:g} s (serve.stream_idle_s)",
        ) from None


async def _session(websocket: WebSocket, service: Any, settings: Any) -> None:
    idle_s = settings.stream_idle_s
    first = await _receive(websocket, idle_s, idle_s)
    if first.get("text") is None:
        raise StreamRefused(CLOSE_BAD_DATA, 'the first message must be {"type": "start", ...}')
    audio = settings.audio
    fmt = StreamFormat.parse(first["text"], audio.min_sample_rate, audio.max_sample_rate)
    bundle = service.bundle
    window_s = settings.inference.window_s or bundle.window_seconds
    hop_s = settings.inference.hop_s or bundle.hop_seconds
    windows = StreamWindows(fmt, window_s, hop_s)
    stream_id = uuid.uuid4().hex[:12]
    scorer = _Scorer(service, stream_id, fmt.sample_rate, settings.inference.min_confidence)
    await websocket.send_json(
        {
            "type": "ready",
            "stream_id": stream_id,
            "window_s": window_s,
            "hop_s": hop_s,
            "labels": bundle.labels,
            "model_version": service.model_version,
        }
    )
    # Only audio keeps a stream open: empty messages would hold a slot without ever
    # reaching serve.stream_max_s. Live audio comes at least as fast as it plays, so a
    # stream open longer than its audio limit (plus one idle wait) is trickling bytes to
    # hold a slot, and is closed like one that sent too much.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + idle_s
    open_until = loop.time() + settings.stream_max_s + idle_s
    while True:
        if loop.time() > open_until:
            raise StreamRefused(
                CLOSE_TOO_LONG,
                f"open for more than {settings.stream_max_s + idle_s:g} s "
                "(serve.stream_max_s + serve.stream_idle_s): audio came slower than it plays",
            )
        message = await _receive(websocket, deadline - loop.time(), idle_s, "audio")
        if message.get("bytes") is not None:
            ready = windows.feed(message["bytes"])
            if windows.seconds > settings.stream_max_s:
                raise StreamRefused(
                    CLOSE_TOO_LONG,
                    f"more than {settings.stream_max_s:g} s of audio (serve.stream_max_s)",
                )
            for start, samples in ready:
                await _send(websocket, await scorer.score(start, samples), settings)
            if message["bytes"]:
                # From now, not from the message's arrival: time the server spent scoring
                # (up to serve.scoring_timeout_s) is not the client's silence.
                deadline = loop.time() + idle_s
            continue
        text = message.get("text") or ""
        try:
            end = json.loads(text).get("type") == "end"
        except (ValueError, AttributeError):
            end = False
        if not end:
            raise StreamRefused(CLOSE_BAD_DATA, 'text messages after start: only {"type": "end"}')
        for start, samples in windows.finish():
            await _send(websocket, await scorer.score(start, samples), settings)
        await _send(websocket, scorer.summary(windows.seconds), settings)
        await _close(websocket, CLOSE_NORMAL, "done")
        return


class _Scorer:
    """Scores one stream's windows through the service and keeps their running mean."""

    def __init__(self, service: Any, stream_id: str, rate: int, min_confidence: float) -> None:
        self.service = service
        self.stream_id = stream_id
        self.rate = rate
        self.min_confidence = min_confidence
        self.count = 0
        self.total: np.ndarray | None = None

    async def score(self, start: float, samples: np.ndarray) -> dict[str, Any]:
        began = time.perf_counter()
        upload = Upload(f"stream-{self.stream_id}", wav_bytes(samples, self.rate), window=True)
        request_id = f"{self.stream_id}-{self.count}"
        (scored,) = await self.service.score([upload], [request_id], owner=self.stream_id)
        _raise_for(scored)
        await _log(self.service, scored, began)
        pred = scored.prediction
        probs = np.array(list(pred.probabilities.values()))
        self.total = probs if self.total is None else self.total + probs
        self.count += 1
        return {
            "type": "window",
            "index": self.count - 1,
            "start": round(start, 3),
            "end": round(start + len(samples) / self.rate, 3),
            "label": pred.label,
            "confidence": round(pred.confidence, 6),
            "probabilities": {k: round(v, 6) for k, v in pred.probabilities.items()},
            "latency_ms": round((time.perf_counter() - began) * 1000, 3),
        }

    def summary(self, seconds: float) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "summary", "duration": round(seconds, 3)}
        out["windows"] = self.count
        if self.total is None:
            return {**out, "label": None, "confidence": 0.0, "probabilities": {}}
        mean = self.total / self.count
        labels = self.service.bundle.labels
        best = int(mean.argmax())
        return {
            **out,
            "label": answer(mean, labels, self.min_confidence),
            "confidence": round(float(mean[best]), 6),
            "probabilities": {k: round(float(v), 6) for k, v in zip(labels, mean, strict=True)},
        }


def _raise_for(scored: Scored) -> None:
    """A window that could not be scored ends the stream with the service's reason."""
    if scored.error is None:
        return
    # 503 (no worker in time, log busy) and 504 (waited too long) are worth a retry.
    code = CLOSE_TRY_LATER if scored.error.status in (503, 504) else CLOSE_BAD_DATA
    raise StreamRefused(code, scored.error.message)


async def _log(service: Any, scored: Scored, began: float) -> None:
    """Each window is logged like an upload before its event is sent (drift sees streams)."""
    try:
        await service.log_scored([scored], began)
    except ApiError as exc:
        raise StreamRefused(CLOSE_TRY_LATER, exc.message) from None
