"""Where the time goes: stage timings plus operator profiles for prediction and training.

`profile_predict` scores files through the real `Predictor` and `audio.decode`, timing the
stages they mark through their stage hook (decode, resample, windowing, frontend,
backbone, post-processing; `kndcli.timing`) while torch.profiler (torch backend) or ONNX
Runtime's profiler (onnx backend) records the operators. `profile_train` runs a few steps
of the real LightningModule over the real DataModule and separates data-loader wait from
compute. Both return plain dicts (the `--json` output) and can write a Chrome trace.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kndcli.errors import KndError

if TYPE_CHECKING:
    from kndcli.inference.predictor import Predictor

PREDICT_STAGES = ("decode", "resample", "windowing", "frontend", "backbone", "post_processing")
ONNX_STAGES = ("decode", "resample", "windowing", "model", "post_processing")


class StageTimer:
    """Accumulates wall seconds per named stage; optionally syncs CUDA at each switch.

    Stages nest as the code marks them (decode holds resample, the torch model run holds
    the frontend and backbone), and time goes to the innermost open stage only, so the
    stages add up to the total. `report_as` files a stage under another row.
    """

    def __init__(
        self, names: Sequence[str], sync: Any = None, report_as: dict[str, str] | None = None
    ) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(names, 0.0)
        self._sync = sync
        self._report_as = report_as or {}
        self._open: list[str] = []
        self._since = 0.0

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with _record_function(name):
            self._switch()
            self._open.append(self._report_as.get(name, name))
            try:
                yield
            finally:
                self._switch()
                self._open.pop()

    def _switch(self) -> None:
        """Charge the time since the last switch to the innermost open stage."""
        if self._sync:
            self._sync()
        now = time.perf_counter()
        if self._open:
            name = self._open[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._since
        self._since = now


def _record_function(name: str) -> Any:
    """A torch.profiler label when torch is already loaded, so stages show in the trace."""
    import sys
    from contextlib import nullcontext

    torch = sys.modules.get("torch")
    if torch is None:
        return nullcontext()
    return torch.profiler.record_function(f"knd/{name}")


# ----------------------------------------------------------------------------- predict
def _score(predictor: Predictor, paths: Sequence[Path]) -> dict[str, Any]:
    """Decode every file, then score the good ones in shared batches, as `knd predict` does.

    The Predictor's timeline gives the window count; building it is the only work here
    that a plain `knd predict` skips.
    """
    from kndcli.audio import AudioError

    audios, failed = [], []
    for path in paths:
        try:
            audios.append(predictor.decode(path))
        except AudioError as exc:
            failed.append({"file": str(path), "error": exc.problem})
    predictions = predictor.predict_audios(audios, timeline=True)
    return {
        "windows": sum(len(p.windows or []) for p in predictions),
        "audio_s": sum(a.duration for a in audios),
        "failed": failed,
        "predictions": [
            {"file": p.source, "label": p.label, "confidence": p.confidence} for p in predictions
        ],
    }


def profile_predict(
    bundle_dir: str | os.PathLike,
    files: Sequence[str | os.PathLike],
    *,
    backend: str = "torch",
    trace: str | os.PathLike | None = None,
    top: int = 15,
    threads: int | None = None,
) -> dict[str, Any]:
    """Profile scoring `files` with a bundle: stage seconds, top operators, optional trace."""
    from kndcli.audio import find_audio_files
    from kndcli.inference.bundle import load_bundle

    paths = find_audio_files(files)
    if not paths:
        raise KndError(f"no audio files found in {' '.join(map(str, files))}")
    bundle = load_bundle(bundle_dir)
    if backend == "torch":
        result = _profile_predict_torch(bundle, paths, trace, top, threads)
    elif backend == "onnx":
        result = _profile_predict_onnx(bundle, paths, trace, top, threads)
    else:
        raise KndError(f"backend {backend!r}: choose 'onnx' or 'torch'")
    stages = result["stages"]
    total = sum(stages.values())
    result.update(
        kind="predict",
        backend=backend,
        bundle=str(bundle_dir),
        files=len(paths),
        total_s=total,
        clips_per_s=(len(paths) - len(result["failed"])) / total if total > 0 else 0.0,
    )
    return result


def _profile_predict_torch(
    bundle: Any, paths: list[Path], trace: Any, top: int, threads: int | None
) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kndcli.inference.predictor import Predictor

    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    # The frontend and backbone mark their own stages inside the model run; what the run
    # keeps (the softmax, the copy back to numpy) is reported as post-processing.
    timer = StageTimer(
        PREDICT_STAGES,
        sync=torch.cuda.synchronize if cuda else None,
        report_as={"model": "post_processing"},
    )
    predictor = Predictor(
        bundle, backend="torch", stage=timer.stage, device="cuda" if cuda else "cpu"
    )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, acc_events=True) as prof:
        scored = _score(predictor, paths)
    trace_path = None
    if trace:
        trace_path = str(trace)
        Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(trace_path)
    return {
        "device": "cuda" if cuda else "cpu",
        "stages": timer.seconds,
        "operators": torch_operators(prof, top, cuda=cuda),
        **scored,
        "trace": trace_path,
    }


def torch_operators(prof: Any, top: int, *, cuda: bool = False) -> list[dict[str, Any]]:
    """Top operators by self CPU time from a finished torch.profiler run (labels excluded)."""
    rows = []
    for event in prof.key_averages():
        if event.key.startswith(("knd/", "ProfilerStep")):
            continue
        row = {
            "name": event.key,
            "calls": int(event.count),
            "self_ms": event.self_cpu_time_total / 1000.0,
            "total_ms": event.cpu_time_total / 1000.0,
        }
        if cuda:
            row["self_device_ms"] = getattr(event, "self_device_time_total", 0.0) / 1000.0
        rows.append(row)
    rows.sort(key=lambda r: -r["self_ms"])
    return rows[:top]


def _profile_predict_onnx(
    bundle: Any, paths: list[Path], trace: Any, top: int, threads: int | None
) -> dict[str, Any]:
    from kndcli.inference.bundle import ONNX_FILE
    from kndcli.inference.predictor import Predictor

    timer = StageTimer(ONNX_STAGES)
    with tempfile.TemporaryDirectory(prefix="knd-ort-profile-") as tmp:
        predictor = Predictor(
            bundle, threads=threads, stage=timer.stage, onnx_profile_prefix=str(Path(tmp) / "ort")
        )
        scored = _score(predictor, paths)
        profile_file = predictor.session.end_profiling()
        events = json.loads(Path(profile_file).read_text())
        trace_path = None
        if trace:
            trace_path = str(trace)
            Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(profile_file, trace_path)
    operators, parts = onnx_operators(events, top, _onnx_node_parts(bundle.path(ONNX_FILE)))
    return {
        "device": "cpu",
        "stages": timer.seconds,
        "model_breakdown_ms": parts,
        "operators": operators,
        **scored,
        "trace": trace_path,
    }


def _onnx_node_parts(model_path: Path) -> dict[str, str]:
    """Graph node name -> "frontend" or "backbone", from the module scopes torch's exporter
    stores in each node's metadata. Empty when the `onnx` package is not installed."""
    try:
        import onnx
    except ImportError:
        return {}
    parts = {}
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        scopes = next(
            (p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), ""
        )
        if "model.frontend" in scopes:
            parts[node.name] = "frontend"
        elif "model.backbone" in scopes:
            parts[node.name] = "backbone"
    return parts


def onnx_operators(
    events: list[dict[str, Any]], top: int, node_parts: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Summarise ONNX Runtime profiler events by op type, and split node time by model part."""
    node_parts = node_parts or {}
    by_op: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "self_ms": 0.0})
    parts: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        op = event.get("args", {}).get("op_name", "?")
        ms = float(event.get("dur", 0)) / 1000.0
        by_op[op]["calls"] += 1
        by_op[op]["self_ms"] += ms
        parts[_node_part(event["name"].removesuffix("_kernel_time"), node_parts)] += ms
    rows = [
        {"name": op, "calls": int(v["calls"]), "self_ms": v["self_ms"], "total_ms": v["self_ms"]}
        for op, v in by_op.items()
    ]
    rows.sort(key=lambda r: -r["self_ms"])
    return rows[:top], dict(parts)


def _node_part(node: str, node_parts: dict[str, str]) -> str:
    """ONNX Runtime renames the nodes it rewrites: fusions become `<first node>/<fusion>/`,
    NCHWc layout nodes drop the `node_` prefix and gain `_nchwc`; map them back."""
    base = node.split("/")[0]
    stripped = base.removesuffix("_nchwc")
    for candidate in (node, base, stripped, f"node_{stripped}"):
        if candidate in node_parts:
            return node_parts[candidate]
    return "other"


# ----------------------------------------------------------------------------- train
def profile_train(
    cfg: Any,
    *,
    steps: int = 5,
    warmup: int = 1,
    trace: str | os.PathLike | None = None,
    top: int = 15,
    profile_ops: bool = True,
) -> dict[str, Any]:
    """A few optimiser steps of the real module over the real train loader, timed per step.

    Data wait is the time `next(loader)` blocks (with `num_workers=0` the loading itself);
    compute is forward, loss (with mixup when configured), backward and the AdamW step.
    `warmup` steps run first and are not counted.
    """
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile

    from kndcli.data.store import PreparedSet
    from kndcli.training.data import PreparedDataModule
    from kndcli.training.module import EmotionClassifier
    from kndcli.training.train import (
        check_config,
        check_lowpass,
        resolve_precision,
        training_labels,
    )

    if steps < 1:
        raise KndError(f"--steps must be at least 1, got {steps}")
    check_config(cfg)
    prepared = PreparedSet.open(cfg.data.prepared)
    check_lowpass(cfg.train.augment.conditions, prepared)
    labels = training_labels(cfg, prepared)
    torch.manual_seed(cfg.train.seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    module = EmotionClassifier.from_config(cfg, labels, prepared.sample_rate).to(device)
    module.train()
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    datamodule = PreparedDataModule(prepared, labels, cfg.train)
    sync = torch.cuda.synchronize if cuda else None
    # The same mixed precision `knd train` would pick, so the figures describe real training.
    precision = resolve_precision(cfg.train.trainer.precision, "gpu" if cuda else "cpu")
    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)

    def batches() -> Iterator[Any]:
        while True:  # a new epoch when the loader runs out before `steps`
            yield from datamodule.train_dataloader()

    loader = batches()
    per_step: list[dict[str, float]] = []

    def one_step(record: bool) -> None:
        start = time.perf_counter()
        with _record_function("data"):
            x, y, speaker = next(loader)
            x, y, speaker = x.to(device), y.to(device), speaker.to(device)
        ready = time.perf_counter()
        with _record_function("compute"):
            with torch.autocast(device.type, dtype=half, enabled=half is not None):
                loss = module.training_step((x, y, speaker), len(per_step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if sync:
                sync()
        done = time.perf_counter()
        if record:
            per_step.append(
                {"data_s": ready - start, "compute_s": done - ready, "samples": int(len(y))}
            )

    with warnings.catch_warnings():
        # The module logs through its Trainer; here there is none, and that is intended.
        warnings.filterwarnings("ignore", message=".*self.log.*")
        warnings.filterwarnings("ignore", message=".*trainer.*")
        for _ in range(warmup):
            one_step(record=False)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if profile_ops:
            with profile(activities=activities, acc_events=True) as prof:
                for _ in range(steps):
                    one_step(record=True)
        else:
            prof = None
            for _ in range(steps):
                one_step(record=True)
    trace_path = None
    if trace and prof is not None:
        trace_path = str(trace)
        Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(trace_path)
    data_s = sum(s["data_s"] for s in per_step)
    compute_s = sum(s["compute_s"] for s in per_step)
    samples = sum(s["samples"] for s in per_step)
    step_s = [s["data_s"] + s["compute_s"] for s in per_step]
    return {
        "kind": "train",
        "device": "cuda" if cuda else "cpu",
        "model": cfg.model.name,
        "precision": precision,
        "batch_size": cfg.train.batch_size,
        "clip_seconds": cfg.train.clip_seconds,
        "num_workers": cfg.train.num_workers,
        "train_clips": len(prepared.indices("train")),
        "steps": len(per_step),
        "warmup_steps": warmup,
        "samples": samples,
        "data_wait_s": data_s,
        "compute_s": compute_s,
        "data_fraction": data_s / (data_s + compute_s) if data_s + compute_s > 0 else 0.0,
        "samples_per_s": samples / (data_s + compute_s) if data_s + compute_s > 0 else 0.0,
        "step_s": {
            "median": float(np.median(step_s)),
            "min": float(min(step_s)),
            "max": float(max(step_s)),
        },
        "per_step": per_step,
        "operators": torch_operators(prof, top, cuda=cuda) if prof is not None else [],
        "trace": trace_path,
    }
