"""`knd demo`: the whole job on built-in synthetic data."""

from __future__ import annotations

from kndcli.errors import KndError


def demo() -> None:
    """Synthesize, prepare, train, evaluate and predict, offline, in minutes."""
    raise KndError("knd demo is not yet available")
