"""After fitting: best checkpoint -> ONNX bundle -> evaluation -> drift reference."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kndcli.config import KndConfig
from kndcli.data.store import PreparedSet
from kndcli.inference.bundle import (
    REFERENCE_FILE,
    BundleMeta,
    DataSummary,
    TrainingSummary,
    load_bundle,
    mark_latest,
    update_bundle,
)
from kndcli.inference.evaluate import evaluate_predictor, save_evaluation
from kndcli.inference.predictor import Predictor
from kndcli.monitoring.reference import build_reference
from kndcli.training.export import parity_batch, write_bundle


def load_checkpoint_model(checkpoint: str, cfg: KndConfig, labels: list[str], sample_rate: int):
    """The plain nn.Module with the checkpoint's weights (weights-only load, no pickle)."""
    import fsspec

    from kndcli.config import ModelConfig
    from kndcli.models import build_model

    with fsspec.open(checkpoint, "rb") as handle:
        state = torch.load(handle, map_location="cpu", weights_only=True)["state_dict"]
    model = build_model(ModelConfig(**asdict(cfg.model)), len(labels), sample_rate)
    prefix = "model."
    model.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return model.eval()


def encoder_record(model: Any) -> dict[str, Any] | None:
    """A pretrained encoder's config, source, revision and licence (models/ssl.py), so
    the bundle rebuilds itself without the encoder's directory; None for other models."""
    spec = getattr(getattr(model, "frontend", None), "spec", None)
    return spec.to_dict() if spec is not None else None


def build_bundle(
    cfg: KndConfig,
    prepared: PreparedSet,
    labels: list[str],
    checkpoint: str,
    run_dir: Path,
    *,
    epochs: int,
    resumed_from: str | None,
    world_size: int = 1,
    holdouts: list[list[str]] | None = None,
) -> dict[str, Any]:
    """Write the bundle into run_dir, calibrate it, evaluate it on val and test, and add
    the drift reference. `holdouts`: each member's left-out speakers (cross-fitting)."""
    model = load_checkpoint_model(checkpoint, cfg, labels, prepared.sample_rate)
    clip = cfg.train.clip_seconds
    counts = {s: len(prepared.indices(s)) for s in ("train", "val", "test")}
    meta = BundleMeta(
        name=cfg.train.run_name,
        labels=labels,
        sample_rate=prepared.sample_rate,
        clip_seconds=clip,
        window_seconds=clip,
        hop_seconds=clip / 2,
        trim_silence=cfg.train.trim_silence,
        trim_method=cfg.train.trim_method,
        model=cfg.model,
        encoder=encoder_record(model),
        hyperparameters=cfg.train,
        data=DataSummary(
            dataset=prepared.info.get("dataset"),
            prepared=prepared.source if "://" in prepared.source else str(prepared.root.resolve()),
            clips=counts,
            speakers=prepared.info.get("speakers"),
            fit_splits=prepared.info.get("fit_splits", ["train"]),
        ),
        training=TrainingSummary(
            epochs=epochs,
            best_checkpoint=checkpoint,
            resumed_from=resumed_from,
            world_size=world_size,
        ),
    )
    length = int(clip * prepared.sample_rate)
    probe = prepared.indices("val") or prepared.indices("train")
    write_bundle(model, run_dir, meta, parity_batch(prepared, probe, length))

    predictor = Predictor(load_bundle(run_dir))
    calibration = None
    if any(holdouts or []):  # empty unless the run calibrates (training/train.py)
        from kndcli.training.calibrate import fit_member_calibration

        calibration = fit_member_calibration(model, predictor, prepared, cfg, holdouts or [])
    elif cfg.train.calibrate and prepared.indices("val"):
        from kndcli.training.calibrate import fit_calibration

        calibration = fit_calibration(predictor, prepared, cfg)
    if calibration is not None:
        update_bundle(run_dir, {"calibration": calibration}, [])
        predictor = Predictor(load_bundle(run_dir))
    metrics: dict[str, Any] = {}
    evaluations = {}
    for split in ("val", "test"):
        if prepared.indices(split):
            evaluations[split] = evaluate_predictor(predictor, prepared, split)
            save_evaluation(evaluations[split], run_dir / "eval")
            summary = evaluations[split].summary()
            metrics[split] = {
                k: summary[k]
                for k in (
                    "n_clips",
                    "accuracy",
                    "macro_f1",
                    "uar",
                    "ece",
                    "per_class",
                    "per_speaker",
                )
            }
    update_bundle(run_dir, {"metrics": metrics}, [])
    _write_reference(prepared, evaluations.get("val"), run_dir)
    if cfg.train.model_dir:
        _upload(run_dir, cfg.train.model_dir)
    elif Path(cfg.train.output_dir).resolve() == run_dir.parent.resolve():
        mark_latest(run_dir)
    return metrics


def _write_reference(prepared: PreparedSet, val, run_dir: Path) -> None:
    features = prepared.features()
    train_idx = prepared.indices("train")
    val_idx = prepared.indices("val") if val is not None else []
    reference = build_reference(
        [features[i] for i in train_idx],
        [prepared.rows[i]["label"] for i in train_idx],
        [features[i] for i in val_idx],
        [prepared.rows[i]["label"] for i in val_idx],
        [p.top_label for p in val.predictions] if val is not None else [],
        [p.confidence for p in val.predictions] if val is not None else [],
    )
    reference.to_parquet(run_dir / REFERENCE_FILE, index=False)
    update_bundle(run_dir, {}, [REFERENCE_FILE])


def _upload(run_dir: Path, target: str) -> None:
    """Copy the bundle files to train.model_dir (AIP_MODEL_DIR, a gs:// path on Vertex AI)."""
    import fsspec

    from kndcli.inference.bundle import BUNDLE_JSON

    meta = load_bundle(run_dir, verify=False).meta
    fs, _, [root] = fsspec.get_fs_token_paths(target)
    fs.makedirs(root, exist_ok=True)
    for name in [*meta["files"], BUNDLE_JSON]:
        fs.put_file(str(run_dir / name), f"{root.rstrip('/')}/{name}")
