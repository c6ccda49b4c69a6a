"""What the routes call: score uploads through the batcher and the scoring pool, log, count.

`ServiceState` lives on `app.state.service` from the lifespan handler on; the hook for
later features (drift monitoring) is `app.state.settings`, `.bundle` and `.log`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from kndcli.monitoring.predlog import PredictionLogError, prediction_record, safe_filename
from kndcli.serving.batcher import BatcherClosedError
from kndcli.serving.errors import ApiError
from kndcli.serving.scoring import Clip, ScoringCrashedError, ScoringUnavailableError

if TYPE_CHECKING:
    from kndcli.inference.bundle import Bundle
    from kndcli.inference.predictor import Prediction
    from kndcli.monitoring.predlog import PredictionLog
    from kndcli.serving.batcher import MicroBatcher
    from kndcli.serving.body import Upload
    from kndcli.serving.metrics import Metrics
    from kndcli.serving.scoring import ScoringPool
    from kndcli.serving.settings import ServeSettings

logger = logging.getLogger(__name__)

# What a 503 from scoring asks the client to wait: about the time a new scoring worker
# takes to load the model (0.4 s for the default model on 2 cores, measured).
SCORING_RETRY_AFTER = {"Retry-After": "2"}
LOG_RETRY_AFTER = {"Retry-After": "5"}


@dataclass
class Scored:
    """One upload's outcome: a prediction, or the reason it was refused."""

    upload: Upload
    request_id: str
    prediction: Prediction | None = None
    features: dict[str, float] | None = None
    error: ApiError | None = None


@dataclass
class ServiceState:
    settings: ServeSettings
    bundle: Bundle
    pool: ScoringPool
    batcher: MicroBatcher[Clip, Prediction]
    log: PredictionLog
    metrics: Metrics
    ready: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_version(self) -> str:
        return self.bundle.version

    async def _score_one(self, upload: Upload, request_id: str, owner: str | None = None) -> Scored:
        """Score one upload; `owner` (default: its request id) shares turns with its request."""
        scored = Scored(upload=upload, request_id=request_id)
        clip = Clip(upload.data, safe_filename(upload.filename) or "upload", upload.window)
        try:
            prediction = await self.batcher.submit(
                clip, timeout=self.settings.request_timeout_s, owner=owner or request_id
            )
        except BatcherClosedError as exc:  # shutting down: another instance can take it
            scored.error = ApiError(503, str(exc), SCORING_RETRY_AFTER)
            return scored
        except ScoringUnavailableError as exc:  # not scored in time: not the clip's fault
            scored.error = ApiError(503, str(exc), SCORING_RETRY_AFTER)
            return scored
        except ScoringCrashedError:  # it crashed a worker in its batch and again alone
            logger.error(
                "clip %r (request %s) crashed a scoring worker twice: refused",
                clip.name,
                request_id,
            )
            scored.error = ApiError(422, "could not score this clip: it crashed the scoring worker")
            return scored
        except TimeoutError:
            scored.error = ApiError(504, "inference timed out", SCORING_RETRY_AFTER)
            return scored
        except Exception as exc:  # the batcher isolated this clip: it alone cannot be scored
            logger.exception("scoring %s failed", clip.name)
            scored.error = ApiError(422, f"could not score this clip ({type(exc).__name__})")
            return scored
        if prediction.error is not None:
            scored.error = ApiError(422, prediction.error)
        else:
            scored.prediction, scored.features = prediction, prediction.features
        return scored

    async def score(
        self, uploads: list[Upload], request_ids: list[str], owner: str | None = None
    ) -> list[Scored]:
        """Decode and score all uploads concurrently; they share forward passes.

        The uploads of one request (`owner`) take turns with other requests' clips.
        """
        return list(
            await asyncio.gather(
                *(
                    self._score_one(u, rid, owner)
                    for u, rid in zip(uploads, request_ids, strict=True)
                )
            )
        )

    async def log_scored(self, scored: list[Scored], start: float) -> float:
        """Write one log record per scored upload before the response is sent.

        Returns the latency recorded. A request is acknowledged only once it is logged, so a
        log failure is a 503, not a silent gap in the drift data.
        """
        latency_ms = (time.perf_counter() - start) * 1000
        records = [
            prediction_record(
                request_id=s.request_id,
                model_version=self.model_version,
                # The model's choice, "uncertain" or not: drift compares it with the
                # reference's predicted-class mix, which has no "uncertain".
                label=s.prediction.top_label or "",
                confidence=s.prediction.confidence,
                latency_ms=latency_ms,
                filename=s.upload.filename,
                features=s.features or {},
            )
            for s in scored
            if s.prediction is not None
        ]
        if records:
            try:
                await anyio.to_thread.run_sync(functools.partial(self.log.write, records))
            except PredictionLogError as exc:
                # The client gets the reason, not where the log is (path, bucket, spool);
                # the operator's log gets both. A busy or full log frees up: retry.
                logger.error("prediction log write failed, answering 503: %s", exc)
                reason = f": {exc.reason}" if exc.reason else ""
                raise ApiError(
                    503, f"prediction log unavailable{reason}; retry shortly", LOG_RETRY_AFTER
                ) from None
        for s in scored:
            if s.prediction is not None:
                self.metrics.predictions.labels(s.prediction.label).inc()
        return latency_ms
