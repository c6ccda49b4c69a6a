"""Request bodies read under limits: bytes are counted as they arrive, never trusted from headers.

A Content-Length over the limit is refused before reading; a chunked body (no length) is
cut off the moment it passes the limit. Either way the client gets a 413 with a JSON body,
and memory never holds more than the limit.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request

from kndcli.serving.errors import ApiError
from kndcli.serving.guards import BodyStalled, BufferFull

RAW_AUDIO_TYPES = ("audio/", "application/octet-stream")
# After refusing an over-long body, keep reading (and discarding) up to this much more so the
# client finishes sending and can read the 413, instead of seeing a connection reset.
DRAIN_LIMIT = 64 * 1024 * 1024
_FILENAME = re.compile(r'filename\*?=(?:UTF-8\'\')?"?([^";]+)"?', re.IGNORECASE)


@dataclass
class Upload:
    filename: str
    data: bytes
    # A live stream's window, which the server itself wrote as a float WAV: decoded
    # whatever `audio.formats` admits for clients' files.
    window: bool = False


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is over the {limit / 2**20:g} MB limit")


def check_declared_length(request: Request, limit: int) -> None:
    """Refuse at once when the client says up front that the body is too large."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise ApiError(400, f"Content-Length {declared!r} is not a number") from None
    if length > limit:
        raise too_large(limit)


async def limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks; raises 413 as soon as their total passes `limit`."""
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                await _drain(request, received)
                raise too_large(limit)
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise ApiError(400, "client disconnected before sending the whole body") from None
    except BodyStalled as exc:
        raise ApiError(408, f"request body too slow: {exc}", {"Connection": "close"}) from None
    except BufferFull as exc:
        raise ApiError(
            503, f"server busy receiving other uploads ({exc}); retry shortly", {"Retry-After": "2"}
        ) from None


async def _drain(request: Request, received: int) -> None:
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > DRAIN_LIMIT:
                return
    except (ClientDisconnect, RuntimeError, BodyStalled, BufferFull):
        return


async def read_raw(request: Request, limit: int) -> Upload:
    """A raw audio body (Content-Type audio/*), read under the limit."""
    check_declared_length(request, limit)
    parts = bytearray()
    async for chunk in limited_stream(request, limit):
        parts += chunk
    disposition = request.headers.get("content-disposition", "")
    match = _FILENAME.search(disposition)
    return Upload(filename=match.group(1) if match else "", data=bytes(parts))


async def read_multipart(request: Request, limit: int, max_files: int) -> list[Upload]:
    """Every file part of a multipart/form-data body, read under the size and count limits."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    check_declared_length(request, limit)
    parser = MultiPartParser(
        request.headers, limited_stream(request, limit), max_files=max_files, max_fields=100
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise ApiError(413, f"too many files: at most {max_files} per request") from None
        raise ApiError(422, f"malformed multipart body: {exc.message}") from None
    uploads: list[Upload] = []
    try:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append(Upload(filename=value.filename or "", data=await value.read()))
    finally:
        await form.close()
    return uploads
