"""Plain nn.Modules: the log-mel frontend, the backbones, and a registry to build them."""

from kndcli.models.registration import register_model
from kndcli.models.registry import available_models, build_model

__all__ = ["available_models", "build_model", "register_model"]
