"""The name -> backbone class table and the decorator that fills it.

It sits below both `backbones` (which registers into it) and `registry` (which builds
from it), so the dependency runs one way: `registry` -> `backbones` -> `registration`.
Torch-free, so registering costs nothing until a model is built.
"""

from __future__ import annotations

from collections.abc import Callable

BACKBONES: dict[str, type] = {}


def register_model(name: str) -> Callable[[type], type]:
    """Class decorator: make a backbone buildable as `model.name=<name>`."""

    def add(cls: type) -> type:
        BACKBONES[name] = cls
        return cls

    return add
