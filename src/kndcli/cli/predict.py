"""`knd predict` and `knd export`."""

from __future__ import annotations

from kndcli.errors import KndError


def predict() -> None:
    """Predict the emotion of each clip."""
    raise KndError("knd predict is not yet available")


def export() -> None:
    """Re-export or quantize a bundle's model."""
    raise KndError("knd export is not yet available")
