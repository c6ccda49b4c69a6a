"""Write a model bundle from a trained torch model: safetensors, ONNX, metadata, hashes."""

from __future__ import annotations

import platform
import subprocess
import time
import warnings
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
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
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


def export_bundle(
    src: Path,
    out: Path,
    *,
    quantize: str | None = None,
    data: Path | None = None,
    split: str = "test",
) -> dict[str, float]:
    """Re-export `src`'s ONNX graph into a new bundle `out`, optionally int8-quantized.

    A plain re-export must match the torch model within PARITY_TOLERANCE; a quantized
    graph is expected to differ a little, so its difference is reported, not enforced.
    With `data`, accuracy and speed of both bundles are compared on one split.
    """
    import shutil

    from kndcli.data.store import PreparedSet
    from kndcli.inference.bundle import load_bundle
    from kndcli.inference.windowing import center_fit
    from kndcli.training.train import parity_batch

    bundle = load_bundle(src)
    if out.resolve() == src.resolve():
        raise KndError(f"--out {out}: choose a directory other than the source bundle")
    model = bundle.torch_model()
    length = int(bundle.clip_seconds * bundle.sample_rate)
    prepared_dir = data or Path(bundle.meta.get("data", {}).get("prepared", ""))
    if data is not None or (prepared_dir / "prepare.json").is_file():
        prepared = PreparedSet.open(prepared_dir)
        clips = parity_batch(prepared, prepared.indices(split) or prepared.indices(), length)
    else:
        rng = np.random.default_rng(0)
        clips = np.stack(
            [
                center_fit(0.1 * rng.standard_normal(length, dtype=np.float32), length)
                for _ in range(4)
            ]
        )
    out.mkdir(parents=True, exist_ok=True)
    files = [ONNX_FILE, WEIGHTS_FILE]
    for name in bundle.meta["files"]:
        if name != ONNX_FILE:
            shutil.copy2(bundle.path(name), out / name)
            if name not in files:
                files.append(name)
    export_onnx(model, out / ONNX_FILE, bundle.sample_rate, bundle.clip_seconds)
    if quantize == "int8":
        _quantize_int8(out / ONNX_FILE)
        parity = check_parity(model, out / ONNX_FILE, clips, tolerance=float("inf"))
    else:
        parity = check_parity(model, out / ONNX_FILE, clips)
    meta = {
        **{k: v for k, v in bundle.meta.items() if k not in ("files", "schema_version")},
        "name": bundle.meta.get("name", src.name) + (f"-{quantize}" if quantize else ""),
        "export": {"from": str(src), "quantize": quantize, "parity_max_abs_diff": parity},
        "versions": versions(),
    }
    write_bundle_json(out, meta, files)
    report = {
        "parity": parity,
        "size_before": float(bundle.path(ONNX_FILE).stat().st_size),
        "size_after": float((out / ONNX_FILE).stat().st_size),
    }
    if data is not None:
        report.update(_compare(src, out, PreparedSet.open(data), split))
    return report


def _quantize_int8(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = path.with_suffix(".pre.onnx")
    tmp = path.with_suffix(".int8.onnx")
    try:
        quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(str(pre), str(tmp), weight_type=QuantType.QInt8)
    finally:
        pre.unlink(missing_ok=True)
    tmp.replace(path)


def _compare(before: Path, after: Path, prepared: Any, split: str) -> dict[str, float]:
    from kndcli.inference.evaluate import evaluate_predictor
    from kndcli.inference.predictor import Predictor

    report: dict[str, float] = {}
    for tag, path in (("before", before), ("after", after)):
        predictor = Predictor.from_bundle(path)
        started = time.perf_counter()
        result = evaluate_predictor(predictor, prepared, split)
        report[f"ms_per_clip_{tag}"] = 1000 * (time.perf_counter() - started) / result.n_clips
        report[f"accuracy_{tag}"] = result.accuracy
    return report
