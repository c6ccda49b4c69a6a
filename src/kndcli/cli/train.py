"""`knd train` and `knd evaluate`."""

from __future__ import annotations

from kndcli.cli.common import ConfigOpt, OverridesArg
from kndcli.errors import KndError


def train(config: ConfigOpt = None, overrides: OverridesArg = None) -> None:
    """Train a model on the prepared set and write a model bundle."""
    raise KndError("knd train is not yet available")


def evaluate() -> None:
    """Evaluate a bundle: accuracy, macro-F1, UAR, per class and per speaker."""
    raise KndError("knd evaluate is not yet available")
