"""The HTTP routes. None takes a path, URL or model name: clients send audio bytes only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response

from kndcli.serving.body import RAW_AUDIO_TYPES, Upload, media_type, read_multipart, read_raw
from kndcli.serving.deps import Authorized, RequestId, RequestStart, Service, require_token
from kndcli.serving.errors import ApiError, error_response
from kndcli.serving.schemas import BatchOut, ErrorOut, HealthOut, PredictionOut, ReadyOut
from kndcli.serving.service import Scored

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in {
        401: "Bearer token missing or wrong (only when KND_API_TOKEN is set).",
        413: "Body over the size limit, or too many files.",
        415: "Content type is not multipart/form-data or audio/*.",
        422: "Audio empty, undecodable or too long.",
        503: "Model not loaded yet, no scoring worker answered in time (Retry-After), or "
        "the prediction log is unavailable.",
    }.items()
}
_AUDIO_BODY = {"type": "string", "format": "binary"}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": _AUDIO_BODY},
                    "required": ["file"],
                }
            },
            "audio/*": {"schema": _AUDIO_BODY},
        },
    }
}
_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": _AUDIO_BODY}},
                    "required": ["files"],
                }
            }
        },
    }
}


def _prediction_body(scored: Any, latency_ms: float, version: str, timeline: bool) -> dict:
    pred = scored.prediction
    body = {
        "request_id": scored.request_id,
        "label": pred.label,
        "confidence": pred.confidence,
        "probabilities": pred.probabilities,
        "duration": pred.duration,
        "model_version": version,
        "latency_ms": round(latency_ms, 3),
    }
    if timeline:
        body["windows"] = pred.windows
    return body


@router.post(
    "/predict",
    response_model=PredictionOut,
    response_model_exclude_none=True,
    responses=_ERRORS,
    dependencies=[Authorized],
    openapi_extra=_PREDICT_BODY,
    summary="Predict the emotion of one clip",
)
async def predict(
    request: Request,
    service: Service,
    request_id: RequestId,
    start: RequestStart,
    timeline: bool = Query(False, description="Include per-window labels."),
) -> Any:
    """One clip, as a multipart `file` field or as the raw body with an audio/* type."""
    settings = service.settings
    kind = media_type(request)
    if kind == "multipart/form-data":
        uploads = await read_multipart(request, settings.max_body_bytes, max_files=1)
        if not uploads:
            raise ApiError(422, "no file in the multipart body: send the clip as field 'file'")
        upload = uploads[0]
    elif kind.startswith(RAW_AUDIO_TYPES):
        upload = await read_raw(request, settings.max_body_bytes)
    else:
        raise ApiError(
            415,
            f"content type {kind or '(none)'!r} is not supported: send multipart/form-data "
            "or the raw clip as audio/*",
        )
    (scored,) = await service.score([upload], [request_id])
    if scored.error is not None:
        raise scored.error
    latency_ms = await service.log_scored([scored], start)
    return _prediction_body(scored, latency_ms, service.model_version, timeline)


@router.post(
    "/predict/batch",
    response_model=BatchOut,
    response_model_exclude_none=True,
    responses=_ERRORS,
    dependencies=[Authorized],
    openapi_extra=_BATCH_BODY,
    summary="Predict several clips in one request",
)
async def predict_batch(
    request: Request, service: Service, request_id: RequestId, start: RequestStart
) -> Any:
    """Several `files` parts; a bad file gets an error entry and the others are still scored."""
    settings = service.settings
    kind = media_type(request)
    if kind != "multipart/form-data":
        raise ApiError(
            415,
            f"content type {kind or '(none)'!r} is not supported: send multipart/form-data "
            "with one 'files' part per clip",
        )
    uploads: list[Upload] = await read_multipart(
        request, settings.max_body_bytes, max_files=settings.max_batch_files
    )
    if not uploads:
        raise ApiError(422, "no files in the multipart body: send each clip as a 'files' part")
    ids = [f"{request_id}-{i}" for i in range(len(uploads))]
    scored = await service.score(uploads, ids, owner=request_id)
    if all(s.error is not None and s.error.status >= 500 for s in scored):
        # Every file failed for the server's reasons: the whole request is to be retried.
        raise next(s.error for s in scored if s.error is not None)
    latency_ms = await service.log_scored(scored, start)
    results = [_batch_item(s) for s in scored]
    failed = sum(1 for s in scored if s.prediction is None)
    return {
        "request_id": request_id,
        "model_version": service.model_version,
        "latency_ms": round(latency_ms, 3),
        "scored": len(scored) - failed,
        "failed": failed,
        "results": results,
    }


def _batch_item(s: Scored) -> dict[str, Any]:
    """One file's entry: its prediction, or its error with the status /predict would give
    and, when the server was the cause, when to send it again."""
    if s.prediction is None:
        error = s.error or ApiError(500, "not scored")
        item: dict[str, Any] = {
            "filename": s.upload.filename,
            "error": error.message,
            "status": error.status,
        }
        retry_after = (error.headers or {}).get("Retry-After")
        if retry_after is not None:  # the server's busy or timed-out answers carry one
            item["retry_after_s"] = int(retry_after)
        return item
    p = s.prediction
    return {
        "filename": s.upload.filename,
        "request_id": s.request_id,
        "label": p.label,
        "confidence": p.confidence,
        "probabilities": p.probabilities,
        "duration": p.duration,
    }


@router.get("/health", response_model=HealthOut, summary="The process is alive")
async def health() -> Any:
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=ReadyOut,
    responses={503: {"model": ErrorOut}},
    summary="The model is loaded, a scoring worker is up, and requests are accepted",
)
async def ready(request: Request) -> Any:
    """503 while loading, shutting down, or while every scoring worker is being replaced:
    /health stays the liveness probe, so a restarting pool is not a dead process."""
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        return error_response(request, 503, "model not loaded")
    if not service.pool.ready:
        return error_response(request, 503, "no scoring worker is running; restarting")
    return {
        "status": "ready",
        "model_version": service.model_version,
        "labels": service.bundle.labels,
    }


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Open to scrapers unless serve.metrics_need_token: then the bearer token, as /predict."""
    from prometheus_client import CONTENT_TYPE_LATEST

    if request.app.state.settings.metrics_need_token:
        require_token(request)

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
