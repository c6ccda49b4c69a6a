"""Name -> model. Adding a model is one class with `@register_model("name")`.

The table and the decorator live in `registration`, below `backbones`; this module
imports `backbones` (lazily, it needs torch) only so the built-in models are registered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kndcli.errors import ConfigError
from kndcli.models.registration import BACKBONES

if TYPE_CHECKING:
    from torch import nn

    from kndcli.config import ModelConfig


def available_models() -> list[str]:
    import kndcli.models.backbones  # noqa: F401  (registers the built-in models)

    return sorted(BACKBONES)


def build_model(cfg: ModelConfig, n_classes: int, sample_rate: int) -> nn.Module:
    """The full model: waveform in, logits out, frontend included."""
    from kndcli.models.emotion import EmotionModel, Ensemble
    from kndcli.models.frontend import LogMel

    names = available_models()
    if cfg.name not in BACKBONES:
        raise ConfigError(f"model.name: unknown model {cfg.name!r} (available: {', '.join(names)})")
    if cfg.ensemble < 1:
        raise ConfigError(f"model.ensemble: {cfg.ensemble} must be at least 1")
    members = [BACKBONES[cfg.name](cfg, n_classes) for _ in range(cfg.ensemble)]
    backbone = members[0] if len(members) == 1 else Ensemble(members)
    return EmotionModel(LogMel(cfg, sample_rate), backbone)
