"""Write a model bundle from a trained torch model: safetensors, ONNX, metadata, hashes."""

from __future__ import annotations

import platform
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kndcli import __version__
from kndcli.data.store import PreparedSet
from kndcli.errors import KndError, UsageError
from kndcli.inference.bundle import (
    ONNX_DATA_FILE,
    ONNX_FILE,
    REFERENCE_FILE,
    WEIGHTS_FILE,
    BundleMeta,
    write_bundle_json,
)
from kndcli.inference.windowing import center_fit
from kndcli.models.emotion import WithProbabilities

PARITY_TOLERANCE = 1e-4
# Weights above this go to model.onnx.data (the protobuf limit is 2 GB, metadata included).
EXTERNAL_DATA_BYTES = 1_800_000_000


def export_onnx(model: nn.Module, path: Path, sample_rate: int, clip_seconds: float) -> list[str]:
    """Export waveform -> probabilities with dynamic batch and length, frontend included.

    Returns the files written: model.onnx, and model.onnx.data beside it when the weights
    are over EXTERNAL_DATA_BYTES (one protobuf holds at most 2 GB).
    """
    wrapped = WithProbabilities(model).eval()
    example = torch.randn(2, int(clip_seconds * sample_rate)) * 0.1
    batch = torch.export.Dim("batch", min=1, max=4096)
    samples = torch.export.Dim("samples", min=sample_rate // 4, max=sample_rate * 600)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    external = size > EXTERNAL_DATA_BYTES
    # Written under their final names in a scratch directory (model.onnx records the name
    # of its data file), then moved in: data first, so model.onnx never names a missing one.
    scratch = path.parent / ".onnx-export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            wrapped,
            (example,),
            str(scratch / path.name),
            input_names=["audio"],
            output_names=["probabilities"],
            dynamic_shapes={"waveform": {0: batch, 1: samples}},
            dynamo=True,
            external_data=external,
            verbose=False,
        )
    data = path.with_name(path.name + ".data")
    if external:
        (scratch / data.name).replace(data)
    else:
        data.unlink(missing_ok=True)
    (scratch / path.name).replace(path)
    shutil.rmtree(scratch, ignore_errors=True)
    return [path.name, data.name] if external else [path.name]


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


def parity_batch(prepared: PreparedSet, indices: list[int], length: int, n: int = 8) -> np.ndarray:
    """A few real clips, centre-fitted, for the ONNX-vs-torch parity check.

    Real clips rather than noise, so the check covers inputs like those the model will
    score. Here, beside the check, because training's export and `knd export` both need it.
    """
    chosen = indices[:: max(1, len(indices) // n)][:n]
    return np.stack([center_fit(prepared.waveform(i), length) for i in chosen]).astype(np.float32)


def write_bundle(
    model: nn.Module,
    out: Path,
    meta: BundleMeta,
    parity_waveforms: np.ndarray,
    reference: Any | None = None,
) -> Path:
    """Write weights, ONNX (parity-checked), the drift reference and bundle.json into `out`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    graph = export_onnx(model, out / ONNX_FILE, meta.sample_rate, meta.clip_seconds)
    parity = check_parity(model, out / ONNX_FILE, parity_waveforms.astype(np.float32))
    files = [*graph, WEIGHTS_FILE]
    if reference is not None:
        reference.to_parquet(out / REFERENCE_FILE, index=False)
        files.append(REFERENCE_FILE)
    fields = {
        **meta.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "onnx": {"input": "audio", "output": "probabilities", "parity_max_abs_diff": parity},
        "versions": versions(),
        "git_commit": git_commit(),
    }
    write_bundle_json(out, fields, files)
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


# int8 is kept only when it is not worse: at most this much accuracy lost, and faster
# than the source within timing noise (shared machines drift several percent per run).
INT8_MAX_ACCURACY_DROP = 0.005
INT8_MAX_SLOWDOWN = 1.05


def export_bundle(
    src: Path,
    out: Path,
    *,
    quantize: str | None = None,
    data: str | None = None,
    split: str = "test",
    force: bool = False,
) -> dict[str, Any]:
    """Re-export `src`'s ONNX graph into a new bundle `out`, optionally int8-quantized.

    A plain re-export must match the torch model within PARITY_TOLERANCE; a quantized
    graph is expected to differ a little, so its difference is reported, not enforced.
    Accuracy and speed of both bundles are compared on one split of `data` (default: the
    set the bundle was trained on). An int8 graph that is less accurate or slower is
    removed again (`kept` False, with the reasons in `refused`) unless `force`.
    """
    from kndcli.inference.bundle import load_bundle

    bundle = load_bundle(src)
    if out.resolve() == src.resolve():
        raise UsageError(f"--out {out}: choose a directory other than the source bundle")
    prepared, split = _comparison_set(bundle.meta, data, split)
    if quantize and prepared is None and not force:
        raise UsageError(
            "int8 export is measured before it is kept, but this bundle's prepared set is "
            "not here: pass --prepared DIR (or --force to keep it unmeasured)"
        )
    model = bundle.torch_model()
    length = int(bundle.clip_seconds * bundle.sample_rate)
    if prepared is not None:
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
    files = [WEIGHTS_FILE]
    for name in bundle.meta["files"]:
        if name not in (ONNX_FILE, ONNX_DATA_FILE):
            shutil.copy2(bundle.path(name), out / name)
            if name not in files:
                files.append(name)
    files = [*export_onnx(model, out / ONNX_FILE, bundle.sample_rate, bundle.clip_seconds), *files]
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
    report: dict[str, Any] = {
        "parity": parity,
        "size_before": float(bundle.path(ONNX_FILE).stat().st_size),
        "size_after": float((out / ONNX_FILE).stat().st_size),
        "split": split,
    }
    if prepared is not None:
        report.update(_compare(src, out, prepared, split))
    report["refused"] = _worse(report) if quantize else []
    report["kept"] = force or not report["refused"]
    if not report["kept"]:
        shutil.rmtree(out)
    return report


def _comparison_set(
    meta: dict[str, Any], data: str | None, split: str
) -> tuple[PreparedSet | None, str]:
    """The set to compare on and its split: a held-out one when the bundle was refitted."""
    from kndcli.inference.evaluate import is_recorded_set

    location = data or (meta.get("data") or {}).get("prepared")
    if not location:
        return None, split
    try:
        prepared = PreparedSet.open(location)
    except KndError:  # gone, unreachable or inconsistent: the recorded set is optional
        if data:
            raise
        return None, split
    fitted = (meta.get("data") or {}).get("fit_splits", ["train"])
    if split in fitted and is_recorded_set(meta, prepared):
        split = "val"
    return prepared, split


def _worse(report: dict[str, Any]) -> list[str]:
    """Why a quantized graph is not an improvement, if it is not."""
    if "accuracy_after" not in report:
        return []
    reasons = []
    drop = report["accuracy_before"] - report["accuracy_after"]
    if drop > INT8_MAX_ACCURACY_DROP:
        reasons.append(f"accuracy drops {100 * drop:.1f} points")
    if report["ms_per_clip_after"] > INT8_MAX_SLOWDOWN * report["ms_per_clip_before"]:
        reasons.append(
            f"slower: {report['ms_per_clip_after']:.2f} ms per clip instead of "
            f"{report['ms_per_clip_before']:.2f}"
        )
    return reasons


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
        predictor = Predictor.from_config(path)
        started = time.perf_counter()
        result = evaluate_predictor(predictor, prepared, split)
        report[f"ms_per_clip_{tag}"] = 1000 * (time.perf_counter() - started) / result.n_clips
        report[f"accuracy_{tag}"] = result.accuracy
    return report
