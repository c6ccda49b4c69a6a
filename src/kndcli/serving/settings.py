"""What one service instance needs to know, built from the typed config and the environment.

Plain data, JSON round-trippable: with several uvicorn workers each worker process
rebuilds the app from `KND_SERVE_SETTINGS` (see `create_app_from_env`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from kndcli.config import (
    BACKENDS,
    AudioConfig,
    DriftConfig,
    InferenceConfig,
    ServeConfig,
    check_min_confidence,
    check_serve,
)
from kndcli.cpus import usable_cpus
from kndcli.errors import ConfigError

if TYPE_CHECKING:
    from kndcli.config import KndConfig

SETTINGS_ENV = "KND_SERVE_SETTINGS"
TOKEN_ENV = "KND_API_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeSettings(ServeConfig):
    """The `serve:` config section, the sections the service applies, and the bundle.

    `inference` and `audio` are applied by every scoring worker exactly as `knd predict`
    applies them (`Predictor.from_config`), and `drift` judges `GET /monitoring`.
    """

    model: str = ""
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    # The decoder's limits (formats, rates, channels, samples) as `knd predict` applies
    # them; serve.max_duration_s and serve.max_body_mb replace its seconds and bytes.
    audio: AudioConfig = field(default_factory=AudioConfig)
    threads: int = 0  # ONNX Runtime intra-op threads; 0 = one per core (1 per scoring process)
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
    def from_config(cls, cfg: KndConfig, model: str | os.PathLike) -> ServeSettings:
        """The resolved config (files, environment such as PORT, flags) for one bundle."""
        settings = cls(
            **asdict(cfg.serve),
            model=str(model),
            inference=replace(cfg.inference, model=str(model)),
            drift=cfg.drift,
            audio=cfg.audio,
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """The config checks again: tests and other callers build settings directly."""
        check_serve(self)
        _require_backend(self.inference.backend)
        check_min_confidence(self.inference.min_confidence)  # before workers fail on it

    def check_exposure(self) -> None:
        """Refuse to serve an address others can reach with no token, unless told to."""
        if self.host in LOOPBACK or self.token() or self.allow_no_token:
            return
        raise ConfigError(
            f"key 'serve.host': {self.host} is reachable from other machines and no "
            f"{TOKEN_ENV} is set, so anyone could use the service: set {TOKEN_ENV}, bind "
            "127.0.0.1, or pass --insecure-no-token (serve.allow_no_token) if something in "
            "front of it (Cloud Run IAM, a proxy) checks callers"
        )

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
        settings = cls(**{k: v for k, v in data.items() if k in known})
        settings.inference = InferenceConfig(**data.get("inference", {}))
        settings.drift = DriftConfig(**data.get("drift", {}))
        settings.audio = AudioConfig(**data.get("audio", {}))
        return settings


def _require_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"key 'inference.backend': {backend!r}: choose 'onnx' or 'torch'")
