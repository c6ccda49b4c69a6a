"""Name -> model class. Adding a model is one class with `@register_model("name")`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kndcli.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from kndcli.config import ModelConfig

_REGISTRY: dict[str, type] = {}


def register_model(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls

    return add


def available_models() -> list[str]:
    import kndcli.models.backbones  # noqa: F401  (registers the built-in models)

    return sorted(_REGISTRY)


def build_model(cfg: ModelConfig, n_classes: int, sample_rate: int) -> nn.Module:
    """The full model: waveform in, logits out, frontend included."""
    from kndcli.models.emotion import EmotionModel, Ensemble
    from kndcli.models.frontend import LogMel

    names = available_models()
    if cfg.name not in _REGISTRY:
        raise ConfigError(f"model.name: unknown model {cfg.name!r} (available: {', '.join(names)})")
    if cfg.ensemble < 1:
        raise ConfigError(f"model.ensemble: {cfg.ensemble} must be at least 1")
    members = [_REGISTRY[cfg.name](cfg, n_classes) for _ in range(cfg.ensemble)]
    backbone = members[0] if len(members) == 1 else Ensemble(members)
    return EmotionModel(LogMel(cfg, sample_rate), backbone)
