"""Name -> model. Adding a model is one class with `@register_model("name")`.

The table and the decorator live in `registration`, below `backbones`; this module
imports `backbones` (lazily, it needs torch) only so the built-in models are registered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kndcli.errors import ConfigError
from kndcli.models.registration import BACKBONES

if TYPE_CHECKING:
    from torch import nn

    from kndcli.config import ModelConfig


# A pretrained speech encoder with a head (models/ssl.py), built apart from the log-mel
# backbones because its frontend is the encoder itself.
ENCODER_MODEL = "ssl"


def available_models() -> list[str]:
    import kndcli.models.backbones  # noqa: F401  (registers the built-in models)

    return sorted([*BACKBONES, ENCODER_MODEL])


def build_model(
    cfg: ModelConfig, n_classes: int, sample_rate: int, encoder: dict[str, Any] | None = None
) -> nn.Module:
    """The full model: waveform in, logits out, frontend included.

    `encoder` is a bundle's recorded encoder (models/ssl.EncoderSpec as a dict): the
    architecture is rebuilt from it, without the pretrained directory.
    """
    from kndcli.models.emotion import ENSEMBLE_MEANS, EmotionModel, Ensemble
    from kndcli.models.frontend import LogMel

    names = available_models()
    if cfg.name not in names:
        raise ConfigError(f"model.name: unknown model {cfg.name!r} (available: {', '.join(names)})")
    if cfg.ensemble < 1:
        raise ConfigError(f"model.ensemble: {cfg.ensemble} must be at least 1")
    if cfg.ensemble_mean not in ENSEMBLE_MEANS:
        raise ConfigError(
            f"model.ensemble_mean: {cfg.ensemble_mean!r} is not one of {', '.join(ENSEMBLE_MEANS)}"
        )
    if cfg.name == ENCODER_MODEL:
        from kndcli.models.ssl import EncoderSpec, build_encoder_model

        spec = EncoderSpec(**encoder) if encoder else None
        return build_encoder_model(cfg, n_classes, sample_rate, spec)
    members = [BACKBONES[cfg.name](cfg, n_classes) for _ in range(cfg.ensemble)]
    backbone = members[0] if len(members) == 1 else Ensemble(members, cfg.ensemble_mean)
    return EmotionModel(LogMel(cfg, sample_rate), backbone)
