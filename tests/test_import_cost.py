"""The CLI's cold path imports no training, monitoring or cloud stack (DESIGN.md import rules)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

FORBIDDEN = (
    "torch",
    "lightning",
    "pytorch_lightning",
    "wandb",
    "evidently",
    "google.cloud",
    "pandas",
    "transformers",
    "huggingface_hub",
)
# Imported only after the arguments are parsed, at the end of the process: sys.modules then
# holds everything the command ever imported.
PROBE = (
    "import atexit, json, sys\n"
    "out = sys.argv[1]\n"
    "sys.argv = ['knd', *sys.argv[2:]]\n"
    "atexit.register(lambda: open(out, 'w').write(json.dumps(sorted(sys.modules))))\n"
    "from kndcli.cli.main import main\n"
    "main()\n"
)


def modules_after(
    tmp_path: Path, *args: str | Path, env: dict[str, str] | None = None
) -> tuple[set[str], int]:
    out = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    return set(json.loads(out.read_text())), result.returncode


def heavy(modules: set[str]) -> list[str]:
    """Forbidden packages and their submodules.

    The bare `google` and `google.cloud` namespace modules are exempt: installed `*-nspkg.pth`
    files create them at interpreter start-up, before any knd code runs.
    """
    namespaces = {"google", "google.cloud"}
    return sorted(
        m for m in modules - namespaces if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)
    )


@pytest.mark.parametrize(
    "args", [["--help"], ["data", "--help"], ["predict", "--help"], ["serve", "--help"]]
)
def test_help_imports_nothing_heavy(tmp_path: Path, args: list[str]) -> None:
    modules, code = modules_after(tmp_path, *args)
    assert code == 0
    assert heavy(modules) == []
    assert "numpy" not in modules and "onnxruntime" not in modules


def test_predict_onnx_imports_no_torch(
    tmp_path: Path, tiny_bundle: Path, wav_factory: Callable[..., Path]
) -> None:
    clip = wav_factory("clip.wav")
    # Environment variables that set keys (Cloud Run's PORT, a DDP run's name) are read
    # without omegaconf too.
    env = {"PORT": "8081", "KND_RUN_NAME": "r1"}
    modules, code = modules_after(
        tmp_path, "predict", "--model", tiny_bundle, "--json", clip, env=env
    )
    assert code == 0
    assert "onnxruntime" in modules  # the probe saw the real scoring path
    assert heavy(modules) == []
    assert "omegaconf" not in modules  # defaults need no YAML merge
    assert "fastapi" not in modules and "uvicorn" not in modules


def test_predict_table_output_imports_no_torch(
    tmp_path: Path, tiny_bundle: Path, wav_factory: Callable[..., Path]
) -> None:
    clip = wav_factory("clip.wav")
    modules, code = modules_after(tmp_path, "predict", "-m", tiny_bundle, clip)
    assert code == 0
    assert heavy(modules) == []


def test_probe_would_catch_a_heavy_import() -> None:
    assert heavy({"google", "google.cloud", "numpy", "torch.nn", "google.cloud.storage"}) == [
        "google.cloud.storage",
        "torch.nn",
    ]
