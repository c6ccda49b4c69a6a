"""The stage hook: how the scoring path lets `knd profile` time it without a copy of it.

A stage hook takes a stage name and returns a context manager around that stage's work.
`audio.decode` and the `Predictor` mark their stages through one, so the profiler times
the code that predict and serve run; by default the hook is `untimed`, a no-op `with`.
Torch-free and numpy-free: the predict path imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

Stage = Callable[[str], AbstractContextManager[object]]

_NOTHING = nullcontext()


def untimed(name: str) -> AbstractContextManager[object]:
    """The default stage hook: records nothing."""
    return _NOTHING


def time_forward(module: Any, stage: Stage, name: str) -> None:
    """Mark each forward of the torch `module` as stage `name`, with forward hooks.

    Hooks, not a re-written forward: the model keeps running the forward it was exported
    to ONNX from, and its parts (frontend, backbone) still show up in the profile. The
    post-hook is `always_call`, so a forward that raises still closes its stage. Meant for
    one thread at a time, as `knd profile` runs.
    """
    entered: list[AbstractContextManager[object]] = []

    def enter(*_: Any) -> None:
        context = stage(name)
        context.__enter__()
        entered.append(context)

    def leave(*_: Any) -> None:
        entered.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)
