"""`knd stream`: a live client of `knd serve`'s /stream WebSocket."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from kndcli.cli import options as opt
from kndcli.errors import UsageError


def stream(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(help="An audio file, or - for raw PCM16 mono on stdin (e.g. from arecord)."),
    ],
    server: Annotated[
        str, typer.Option("--server", help="The knd service, e.g. http://127.0.0.1:8080.")
    ] = "http://127.0.0.1:8080",
    speed: Annotated[
        float,
        typer.Option(
            "--speed", help="Send at this multiple of real time; 0: as fast as the server reads."
        ),
    ] = 1.0,
    rate: Annotated[
        int, typer.Option("--rate", help="Sample rate of raw PCM16 on stdin (with -).")
    ] = 16000,
    chunk_ms: Annotated[
        int, typer.Option("--chunk-ms", help="Audio per message, in milliseconds.")
    ] = 100,
    id_token: Annotated[
        bool,
        typer.Option(
            "--id-token",
            help="Send a Google ID token too: the service is private on Cloud Run.",
        ),
    ] = False,
    jsonl: opt.Jsonl = False,
    config: opt.ConfigFiles = None,
    sets: opt.Sets = None,
    print_config: opt.PrintConfig = False,
) -> None:
    """Stream audio to a knd service and print an event per analysis window as it comes.

    The bearer token, when the service has one, is read from KND_API_TOKEN. Exit 3 when
    the server refuses or ends the stream (its close code and reason are printed).
    """
    from kndcli.serving.stream_client import pcm16_chunks, stream_audio, stream_url

    if speed < 0:
        raise UsageError(f"--speed {speed:g}: 0 (no pacing) or a positive multiple")
    if not 10 <= chunk_ms <= 1000:
        raise UsageError(f"--chunk-ms {chunk_ms}: 10 to 1000")
    cfg = opt.load(ctx)
    url = stream_url(server)
    sample_rate = rate if source == "-" else cfg.audio.sample_rate
    blocks = _stdin_blocks() if source == "-" else _file_blocks(cfg, source)
    first = next(blocks, None)  # a file that cannot be opened fails before connecting
    blocks = itertools.chain([] if first is None else [first], blocks)
    low, high = cfg.audio.min_sample_rate, cfg.audio.max_sample_rate
    if source == "-" and not low <= rate <= high:
        raise UsageError(f"--rate {rate}: {low} to {high} Hz (audio.min/max_sample_rate)")
    printer = _print_jsonl if jsonl else _LinePrinter()
    google_id = None
    if id_token:
        from kndcli.cloud.invoke import identity_token

        google_id = identity_token(server.rstrip("/"))
    stream_audio(
        url,
        pcm16_chunks(blocks, sample_rate, chunk_ms / 1000),
        sample_rate=sample_rate,
        speed=speed,
        token=os.environ.get("KND_API_TOKEN") or None,
        id_token=google_id,
        on_event=printer,
    )


def _file_blocks(cfg: Any, path: str) -> Iterator[Any]:
    """The file decoded block by block at the service's rate (long files stream too)."""
    from kndcli.audio import decode_blocks
    from kndcli.inference.timeline import long_limits

    return decode_blocks(
        path, audio=long_limits(cfg.audio, cfg.timeline), sample_rate=cfg.audio.sample_rate
    )


def _stdin_blocks() -> Iterator[Any]:
    import numpy as np

    stdin = sys.stdin.buffer
    pending = b""
    while data := stdin.read(8192):
        data = pending + data
        usable = len(data) - len(data) % 2
        pending = data[usable:]
        yield np.frombuffer(data[:usable], "<i2").astype(np.float32) / 32768.0


def _print_jsonl(event: dict[str, Any]) -> None:
    import json

    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class _LinePrinter:
    """A live table: one aligned line per window as it arrives, the summary at the end."""

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "ready":
            print(
                f"streaming to {event['model_version']}: {event['window_s']:g} s windows "
                f"every {event['hop_s']:g} s",
                flush=True,
            )
            print(f"{'window':>17}  {'label':<10} {'confidence':>10}  {'latency':>9}", flush=True)
        elif kind == "window":
            span = f"{event['start']:.1f}-{event['end']:.1f} s"
            print(
                f"{span:>17}  {event['label']:<10} {event['confidence']:>10.3f}  "
                f"{event['latency_ms']:>6.0f} ms",
                flush=True,
            )
        elif kind == "summary":
            label = event["label"] or "no audio"
            print(
                f"{event['duration']:.1f} s, {event['windows']} windows: {label} "
                f"({event['confidence']:.3f})",
                flush=True,
            )
