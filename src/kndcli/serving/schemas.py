"""Response bodies, as pydantic models: they are the /docs contract."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Window(BaseModel):
    start: float = Field(description="Seconds from the start of the clip.")
    end: float
    label: str
    confidence: float


class PredictionOut(BaseModel):
    request_id: str = Field(description="Also in the X-Request-ID header and the prediction log.")
    label: str
    confidence: float
    probabilities: dict[str, float]
    duration: float = Field(description="Seconds of audio scored.")
    model_version: str
    latency_ms: float
    windows: list[Window] | None = None


class BatchItemOut(BaseModel):
    filename: str
    request_id: str | None = None
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    duration: float | None = None
    error: str | None = Field(None, description="Why this file was not scored.")
    status: int | None = Field(
        None,
        description="For a file not scored, what /predict would have answered for it: 422 "
        "for the file itself; 503 or 504 when the server could not score it in time.",
    )
    retry_after_s: int | None = Field(
        None, description="Set when the failure was the server's: send the file again after it."
    )


class BatchOut(BaseModel):
    request_id: str
    model_version: str
    latency_ms: float
    scored: int
    failed: int
    results: list[BatchItemOut]


class ErrorOut(BaseModel):
    error: str = Field(description="What is wrong with the request, in one line.")
    status: int
    request_id: str | None = None


class HealthOut(BaseModel):
    status: str


class ReadyOut(BaseModel):
    status: str
    model_version: str | None = None
    labels: list[str] | None = None
