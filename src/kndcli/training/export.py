"""Write a model bundle from a trained torch model: safetensors, ONNX, metadata, hashes."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kndcli import __version__
from kndcli.errors import KndError
from kndcli.inference.bundle import (
    ONNX_FILE,
    REFERENCE_FILE,
    WEIGHTS_FILE,
    write_bundle_json,
)
from kndcli.models.emotion import WithProbabilities

PARITY_TOLERANCE = 1e-4


def export_onnx(model: nn.Module, path: Path, sample_rate: int, clip_seconds: float) -> None:
    """Export waveform -> probabilities with dynamic batch and length, frontend included."""
    wrapped = WithProbabilities(model).eval()
    example = torch.randn(2, int(clip_seconds * sample_rate)) * 0.1
    batch = torch.export.Dim("batch", min=1, max=4096)
    samples = torch.export.Dim("samples", min=sample_rate // 4, max=sample_rate * 600)
    tmp = path.with_suffix(".onnx.tmp")
    with torch.no_grad():
        torch.onnx.export(
            wrapped,
            (example,),
            str(tmp),
            input_names=["audio"],
            output_names=["probabilities"],
            dynamic_shapes={"waveform": {0: batch, 1: samples}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    tmp.replace(path)


def check_parity(
    model: nn.Module, onnx_path: Path, waveforms: np.ndarray, tolerance: float = PARITY_TOLERANCE
) -> float:
    """Max |p_onnx - p_torch| over real clips; raises if the exported graph disagrees."""
    import onnxruntime as ort

    wrapped = WithProbabilities(model).eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = wrapped(torch.from_numpy(waveforms)).numpy()
    actual = session.run(None, {session.get_inputs()[0].name: waveforms})[0]
    diff = float(np.abs(actual - expected).max())
    if diff > tolerance:
        raise KndError(
            f"ONNX export disagrees with the torch model: max probability difference "
            f"{diff:.2e} > {tolerance:.0e} on {len(waveforms)} clips; bundle not written"
        )
    return diff


def write_bundle(
    model: nn.Module,
    out: Path,
    meta: dict[str, Any],
    parity_waveforms: np.ndarray,
    reference: Any | None = None,
) -> Path:
    """Write weights, ONNX (parity-checked), the drift reference and bundle.json into `out`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    export_onnx(model, out / ONNX_FILE, int(meta["sample_rate"]), float(meta["clip_seconds"]))
    parity = check_parity(model, out / ONNX_FILE, parity_waveforms.astype(np.float32))
    files = [ONNX_FILE, WEIGHTS_FILE]
    if reference is not None:
        reference.to_parquet(out / REFERENCE_FILE, index=False)
        files.append(REFERENCE_FILE)
    meta = {
        **meta,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "onnx": {"input": "audio", "output": "probabilities", "parity_max_abs_diff": parity},
        "versions": versions(),
        "git_commit": git_commit(),
    }
    write_bundle_json(out, meta, files)
    return out


def versions() -> dict[str, str]:
    import onnxruntime

    return {
        "knd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
