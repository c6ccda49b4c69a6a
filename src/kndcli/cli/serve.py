"""`knd serve`: the HTTP service."""

from __future__ import annotations

from kndcli.errors import KndError


def serve() -> None:
    """Serve a bundle over HTTP."""
    raise KndError("knd serve is not yet available")
