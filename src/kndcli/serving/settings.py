"""What one service instance needs to know, built from the typed config and the environment.

Plain data, JSON round-trippable: with several uvicorn workers each worker process
rebuilds the app from `KND_SERVE_SETTINGS` (see `create_app_from_env`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from kndcli.config import ServeConfig
from kndcli.cpus import usable_cpus
from kndcli.errors import ConfigError

if TYPE_CHECKING:
    from kndcli.config import KndConfig

SETTINGS_ENV = "KND_SERVE_SETTINGS"
TOKEN_ENV = "KND_API_TOKEN"


@dataclass
class ServeSettings(ServeConfig):
    """The `serve:` config section plus what only a running instance knows."""

    model: str = ""
    backend: str = "onnx"
    threads: int = 0  # ONNX Runtime intra-op threads; 0 = one per core (1 per scoring process)
    min_confidence: float = 0.0  # inference.min_confidence: "uncertain" below it
    request_timeout_s: float = 60.0
    # None: read KND_API_TOKEN when the app is created. Never serialised into the env blob.
    api_token: str | None = None

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def processes(self) -> int:
        """Scoring processes to start: `scoring_processes`, with "auto" as one per core."""
        if self.scoring_processes == "auto":
            return usable_cpus()
        return int(self.scoring_processes)

    @classmethod
    def from_config(
        cls,
        cfg: KndConfig,
        model: str | os.PathLike,
        *,
        host: str | None = None,
        port: int | None = None,
        workers: int | None = None,
        backend: str | None = None,
    ) -> ServeSettings:
        """Config values, then the PORT env (Cloud Run), then explicit arguments."""
        serve = cfg.serve
        env_port = os.environ.get("PORT")
        if port is None and env_port:
            try:
                port = int(env_port)
            except ValueError:
                raise ConfigError(f"PORT={env_port!r} is not a port number") from None
        settings = cls(
            **{
                **asdict(serve),
                "host": host or serve.host,
                "port": serve.port if port is None else port,
                "workers": workers or serve.workers,
            },
            model=str(model),
            backend=backend or cfg.inference.backend,
            min_confidence=cfg.inference.min_confidence,
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "workers": self.workers >= 1,
            "max_body_mb": self.max_body_mb > 0,
            "max_duration_s": self.max_duration_s > 0,
            "max_batch_files": self.max_batch_files >= 1,
            "max_batch_size": self.max_batch_size >= 1,
            "max_wait_ms": self.max_wait_ms >= 0,
        }
        auto = self.scoring_processes == "auto"
        checks["scoring_processes"] = auto or (
            isinstance(self.scoring_processes, int) and self.scoring_processes >= 0
        )
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"serve.{key}: invalid value {getattr(self, key)!r}")
        if self.backend not in ("onnx", "torch"):
            raise ConfigError(f"backend {self.backend!r}: choose 'onnx' or 'torch'")
        from kndcli.inference.predictor import check_min_confidence

        check_min_confidence(self.min_confidence)  # before workers spawn and fail on it

    def token(self) -> str | None:
        """The bearer token prediction routes require, if any."""
        token = self.api_token if self.api_token is not None else os.environ.get(TOKEN_ENV)
        return token or None

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("api_token")
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> ServeSettings:
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
