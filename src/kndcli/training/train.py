"""`knd train`: prepared set -> Lightning fit -> self-describing model bundle."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kndcli.config import ConditionsConfig, KndConfig, TrainerConfig, to_yaml
from kndcli.data.store import PreparedSet
from kndcli.errors import ConfigError, KndError, UsageError
from kndcli.inference.bundle import BUNDLE_JSON
from kndcli.training.resume import check_resume, record_of

CONFIG_FILE = "config.yaml"
LAST = "last.ckpt"
AVERAGED = "averaged.ckpt"
SCHEDULERS = ("onecycle", "cosine", "none")


@dataclass
class TrainResult:
    run_dir: Path
    bundle_dir: str
    best_checkpoint: str
    epochs: int
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)


def run_config_file(run_dir: Path) -> Path:
    """The configuration a run was started with, for `knd train --resume RUN_DIR`."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir}: not a knd run directory (no {CONFIG_FILE})")
    return path


def finished_bundle(run_dir: Path) -> Path | None:
    """The bundle a finished run wrote (then there is nothing to resume), else None."""
    path = run_dir / BUNDLE_JSON
    return path if path.is_file() else None


def train(cfg: KndConfig) -> TrainResult | None:
    """Fit, then (on rank 0) export, evaluate and write the bundle. Resumes when it can.

    Returns None on non-zero ranks of a distributed run: only rank 0 writes the bundle.
    KND_RUN_NAME is set for the run's DDP processes and restored afterwards, so a second
    run in the same process (a notebook, the tests) does not inherit the first one's name.
    """
    previous = os.environ.get("KND_RUN_NAME")
    try:
        return _train(cfg)
    finally:
        if previous is None:
            os.environ.pop("KND_RUN_NAME", None)
        else:
            os.environ["KND_RUN_NAME"] = previous


def _train(cfg: KndConfig) -> TrainResult | None:
    started = time.perf_counter()
    check_config(cfg)
    _apply_cluster_env(cfg)
    _read_secret_env()
    import pytorch_lightning as pl

    _quiet_libraries()
    from kndcli.training.data import PreparedDataModule
    from kndcli.training.module import EmotionClassifier

    prepared = _fitted_set(cfg)
    check_lowpass(cfg.train.augment.conditions, prepared)
    labels = training_labels(cfg, prepared)
    run_name = cfg.train.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    # DDP workers re-run this command and read it back (config.ENV_KEYS): same run dir.
    os.environ["KND_RUN_NAME"] = run_name
    cfg.train.run_name = run_name
    run_dir = Path(cfg.train.output_dir) / run_name
    ckpt_dir = cfg.train.checkpoint_dir or str(run_dir / "checkpoints")
    if _rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / (CONFIG_FILE + ".tmp")
        tmp.write_text(to_yaml(cfg))
        tmp.replace(run_dir / CONFIG_FILE)

    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    datamodule = PreparedDataModule(prepared, labels, cfg.train)
    holdouts = _holdouts(cfg, prepared)
    index = {speaker: i for i, speaker in enumerate(datamodule.speakers)}
    module = EmotionClassifier.from_config(
        cfg,
        labels,
        prepared.sample_rate,
        n_speakers=len(datamodule.speakers),
        member_holdout=[[index[s] for s in held] for held in holdouts],
    )
    has_val = bool(prepared.indices("val"))
    if not has_val and cfg.train.early_stopping_patience > 0:
        raise ConfigError(
            f"key 'train.early_stopping_patience': early stopping watches the validation "
            f"split, and {prepared.root} has none (set it to 0, or give data.split a "
            f"val_fraction or val_speakers)"
        )
    trainer, checkpoint = _trainer(cfg, run_dir, ckpt_dir, has_val)
    last = _existing_last(ckpt_dir)
    # Every rank checks (a refusal on rank 0 alone would leave the others waiting).
    check_resume(ckpt_dir, record_of(cfg), has_last=last is not None, write=_rank() == 0)
    cache = _attach_feature_cache(module.model, cfg)
    try:
        # weights_only explicitly: torch's default can be switched off by the environment
        # (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD), and a checkpoint directory may be a bucket.
        trainer.fit(module, datamodule=datamodule, ckpt_path=last, weights_only=True)
    finally:
        _finish_wandb(trainer)
        _detach_feature_cache(module.model, cache)
    if not trainer.is_global_zero:
        return None

    best = (checkpoint.best_model_path if checkpoint else "") or _checkpoint(ckpt_dir, LAST)
    averaged = _checkpoint(ckpt_dir, AVERAGED)
    if cfg.train.average_last > 0 and _exists(averaged):
        best = averaged
    from kndcli.training.bundle import build_bundle

    metrics = build_bundle(
        cfg,
        prepared,
        labels,
        best,
        run_dir,
        epochs=trainer.current_epoch,
        resumed_from=last,
        world_size=trainer.world_size,
        holdouts=holdouts,
    )
    return TrainResult(
        run_dir=run_dir,
        bundle_dir=cfg.train.model_dir or str(run_dir),
        best_checkpoint=best,
        epochs=trainer.current_epoch,
        seconds=time.perf_counter() - started,
        metrics=metrics,
    )


def rebuild_bundle(cfg: KndConfig, epochs: int) -> TrainResult:
    """Redo what follows training (calibration, export, evaluation) from the weights a
    finished run of `epochs` epochs saved (its averaged, else best or last checkpoint),
    without training: for a change to those steps, measured on models already trained
    (bench.accuracy_cv --rebuild)."""
    from kndcli.training.bundle import build_bundle

    started = time.perf_counter()
    prepared = _fitted_set(cfg)
    labels = training_labels(cfg, prepared)
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    ckpt_dir = cfg.train.checkpoint_dir or str(run_dir / "checkpoints")
    names = (AVERAGED,) if cfg.train.average_last > 0 else ()
    found = [c for c in (*names, "best.ckpt", LAST) if _exists(_checkpoint(ckpt_dir, c))]
    if not found:
        raise UsageError(f"{ckpt_dir}: no checkpoint to rebuild the bundle from")
    weights = _checkpoint(ckpt_dir, found[0])
    holdouts = _holdouts(cfg, prepared)
    metrics = build_bundle(
        cfg, prepared, labels, weights, run_dir, epochs=epochs, resumed_from=None, holdouts=holdouts
    )
    return TrainResult(
        run_dir=run_dir,
        bundle_dir=cfg.train.model_dir or str(run_dir),
        best_checkpoint=weights,
        epochs=epochs,
        seconds=time.perf_counter() - started,
        metrics=metrics,
    )


def _fitted_set(cfg: KndConfig) -> PreparedSet:
    """The prepared set with `train.fit_splits` relabelled as the train split."""
    prepared = PreparedSet.open(cfg.data.prepared)
    if cfg.train.fit_splits != ["train"]:
        prepared = prepared.fitting_on(cfg.train.fit_splits)
    return prepared


def check_lowpass(conditions: ConditionsConfig, prepared: PreparedSet) -> None:
    """The low-pass range against the rate its clips are degraded at, the prepared set's,
    known only here and checked before the run folder is written."""
    if conditions.enabled and conditions.lowpass_prob > 0:
        from kndcli.perturb.channel import check_cutoffs

        key = "train.augment.conditions.lowpass_hz"
        source = f"the prepared set {prepared.root}"
        check_cutoffs(conditions.lowpass_hz, prepared.sample_rate, key, source)


def _holdouts(cfg: KndConfig, prepared: PreparedSet) -> list[list[str]]:
    """Each member's left-out training speakers; they serve calibration only, so a run
    that does not calibrate leaves nobody out."""
    from kndcli.training.data import member_holdouts, train_speakers

    cross_fit = cfg.train.cross_fit_speakers if cfg.train.calibrate else 0
    has_val = bool(prepared.indices("val"))
    return member_holdouts(
        train_speakers(prepared), cfg.model.ensemble, cross_fit, cfg.train.seed, has_val
    )


def _attach_feature_cache(model: Any, cfg: KndConfig) -> Any:
    """A frozen encoder encodes each distinct training input once (models/ssl.py)."""
    frontend = getattr(model, "frontend", None)
    if getattr(frontend, "mode", "") != "frozen" or cfg.model.feature_cache_gb <= 0:
        return None
    from kndcli.models.ssl import FeatureCache

    aug = cfg.train.augment
    if aug.random_crop or aug.gain_db > 0 or any(speed != 1.0 for speed in aug.speeds):
        print(
            "encoder states: random crops, gains or speeds make every training input new, "
            "so the frozen encoder runs on each; set train.augment.random_crop=false, "
            "gain_db=0 and speeds=[1.0] to encode each input once (configs/ssl-frozen.yaml)",
            file=sys.stderr,
        )
    spec = frontend.spec
    # Everything that changes the states: the encoder (config, weights' revision, input
    # handling) and the precision it runs in.
    precision = resolve_precision(cfg.train.trainer.precision, cfg.train.trainer.accelerator)
    recipe = json.dumps({"encoder": spec.to_dict(), "precision": precision}, sort_keys=True)
    identity = f"{spec.family}-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"
    root = Path(cfg.train.output_dir) / ".cache" / "encoder-states"
    frontend.cache = FeatureCache(root, identity, int(cfg.model.feature_cache_gb * 2**30))
    return frontend.cache


def _detach_feature_cache(model: Any, cache: Any) -> None:
    """Export and evaluation run the encoder itself (the cache is not part of the graph)."""
    if cache is None:
        return
    model.frontend.cache = None
    print(
        f"encoder states: {cache.hits} read from the cache, {cache.misses} encoded "
        f"({cache.bytes / 2**20:.0f} MiB in {cache.root})",
        file=sys.stderr,
    )


def _quiet_libraries() -> None:
    """Keep the console to what a user acts on: no hardware banners, tips or deprecations."""
    import logging
    import warnings

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # The directory holds this run's own record (training/resume.py), checked already.
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")


def check_config(cfg: KndConfig) -> None:
    if cfg.train.scheduler not in SCHEDULERS:
        raise ConfigError(
            f"key 'train.scheduler': {cfg.train.scheduler!r} is not one of {', '.join(SCHEDULERS)}"
        )
    if cfg.train.clip_seconds <= 0:
        raise ConfigError(f"key 'train.clip_seconds': must be > 0, got {cfg.train.clip_seconds}")
    if not 0 <= cfg.train.average_last < 1:
        raise ConfigError(
            f"key 'train.average_last': a fraction of the epochs in [0, 1), "
            f"got {cfg.train.average_last}"
        )
    fit = cfg.train.fit_splits
    if "train" not in fit or not set(fit) <= {"train", "val", "test"}:
        raise ConfigError(
            f"key 'train.fit_splits': must hold 'train' and only train, val or test, got {fit}"
        )
    if cfg.train.speaker_adversarial < 0:
        raise ConfigError(
            f"key 'train.speaker_adversarial': must be >= 0, got {cfg.train.speaker_adversarial}"
        )
    if cfg.train.cross_fit_speakers < 0:
        raise ConfigError(
            f"key 'train.cross_fit_speakers': must be >= 0, got {cfg.train.cross_fit_speakers}"
        )
    if cfg.model.ensemble < 1:
        raise ConfigError(f"key 'model.ensemble': must be at least 1, got {cfg.model.ensemble}")
    if cfg.train.speaker_adversarial > 0 and cfg.model.ensemble > 1:
        # The speaker head reads one backbone's embedding; the other members would go
        # unregularised while the run claims otherwise.
        raise ConfigError(
            "key 'train.speaker_adversarial': needs a single backbone, set model.ensemble=1"
        )
    _check_device(cfg.train.trainer)
    from kndcli.perturb.multicondition import check_conditions

    check_conditions(cfg.train.augment.conditions)
    from kndcli.models import available_models
    from kndcli.models.registry import ENCODER_MODEL

    if cfg.model.name not in available_models():
        raise ConfigError(
            f"key 'model.name': unknown model {cfg.model.name!r} "
            f"(available: {', '.join(available_models())})"
        )
    if cfg.model.name == ENCODER_MODEL:
        # Find the encoder and read its config now, before any data is read.
        from kndcli.models.ssl import encoder_spec, longest_input_s, resolve_encoder

        spec = encoder_spec(cfg.model.encoder, resolve_encoder(cfg.model.encoder))
        longest = longest_input_s(spec)
        if longest is not None and cfg.train.clip_seconds > longest:
            raise ConfigError(
                f"key 'train.clip_seconds': {cfg.train.clip_seconds:g} s, but a {spec.family} "
                f"encoder takes at most {longest:g} s"
            )


def _read_secret_env() -> None:
    """In a Vertex job, the variables `knd cloud submit --secret-env` referenced (the W&B
    key) are read from Secret Manager now, before anything looks for them."""
    if any(name.startswith("KND_SECRET__") for name in os.environ):
        from kndcli.cloud.secrets import resolve_secret_env

        resolve_secret_env()


def _apply_cluster_env(cfg: KndConfig) -> None:
    """On Vertex AI, translate its cluster variables into what Lightning reads.

    Only the launching process translates (Lightning's own DDP children already carry
    process-level WORLD_SIZE); the node count travels to them in KND_NUM_NODES.
    """
    from kndcli.cloud.vertex_env import apply_lightning_env

    if "LOCAL_RANK" not in os.environ and os.environ.get("CLUSTER_SPEC"):
        os.environ["KND_NUM_NODES"] = str(apply_lightning_env(os.environ))
    nodes = int(os.environ.get("KND_NUM_NODES", "0") or 0)
    if nodes > 1:
        cfg.train.trainer.num_nodes = nodes


def _rank() -> int:
    """Global rank before the Trainer exists: 0 in the launching process."""
    node, local = int(os.environ.get("NODE_RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    return node * 1000 + local


def training_labels(cfg: KndConfig, prepared: PreparedSet) -> list[str]:
    """The configured vocabulary, restricted to labels the train split has, in order."""
    present = {row["label"] for row in prepared.rows if row["split"] == "train"}
    if not present:
        raise KndError(f"{prepared.root}: the train split is empty")
    unknown = present - set(cfg.labels)
    if unknown:
        raise KndError(f"labels {sorted(unknown)} are not in the configured vocabulary")
    labels = [label for label in cfg.labels if label in present]
    if len(labels) < 2:
        raise KndError(f"{prepared.root}: need at least two labels to train, found {labels}")
    return labels


def _checkpoint(ckpt_dir: str, name: str) -> str:
    return f"{ckpt_dir.rstrip('/')}/{name}"


def _existing_last(ckpt_dir: str) -> str | None:
    path = _checkpoint(ckpt_dir, LAST)
    return path if _exists(path) else None


def _exists(path: str) -> bool:
    import fsspec

    fs, _, [stripped] = fsspec.get_fs_token_paths(path)
    return bool(fs.exists(stripped))


def _trainer(cfg: KndConfig, run_dir: Path, ckpt_dir: str, has_val: bool = True):
    """The Trainer and its best-on-validation checkpoint callback (None without validation).

    Without a validation split nothing can be selected: the run keeps its last (or, with
    `train.average_last`, its averaged) weights, which is how a final model is trained on
    every speaker available.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from kndcli.training.callbacks import EpochSummary, ValidationPlots, WeightAveraging
    from kndcli.training.checkpoint_io import AtomicCheckpointIO

    tc = cfg.train.trainer
    # Saved at train-epoch end, after validation and after WeightAveraging's update.
    mode = "min" if cfg.train.monitor.endswith("loss") else "max"
    checkpoint = None
    if has_val:
        checkpoint = ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best",
            monitor=cfg.train.monitor,
            mode=mode,
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
            save_on_train_epoch_end=True,
        )
    # Lightning's save_last only writes "last" in epochs that also wrote a best, so a
    # killed run would resume from its last improvement: every epoch gets its own save.
    last = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="last",
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,
        save_on_train_epoch_end=True,
    )
    callbacks: list[Any] = [c for c in (checkpoint, last, ValidationPlots(run_dir)) if c]
    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
        loggers.append(_wandb_logger(cfg, run_dir))
    callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if cfg.train.average_last > 0:
        start = tc.max_epochs - max(1, round(cfg.train.average_last * tc.max_epochs))
        callbacks.append(WeightAveraging(max(0, start), _checkpoint(ckpt_dir, AVERAGED)))
    if cfg.train.early_stopping_patience > 0:
        callbacks.append(
            EarlyStopping(
                monitor=cfg.train.monitor,
                patience=cfg.train.early_stopping_patience,
                mode=mode,
            )
        )
    interactive = sys.stderr.isatty()
    if interactive:
        from pytorch_lightning.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    else:
        callbacks.append(EpochSummary())
    precision = resolve_precision(tc.precision, tc.accelerator)
    trainer = pl.Trainer(
        max_epochs=tc.max_epochs,
        accelerator=tc.accelerator,
        devices=tc.devices,
        strategy=tc.strategy,
        num_nodes=tc.num_nodes,
        precision=precision,
        deterministic="warn" if tc.deterministic else False,
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
        reload_dataloaders_every_n_epochs=1,
        limit_train_batches=tc.limit_train_batches,
        limit_val_batches=tc.limit_val_batches if has_val else 0,
        log_every_n_steps=tc.log_every_n_steps,
        max_time={"minutes": tc.max_time_minutes} if tc.max_time_minutes > 0 else None,
        enable_progress_bar=interactive,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return trainer, checkpoint


def _cuda_reason(torch: Any) -> str:
    """Why CUDA is unusable, in torch's words: on a cloud GPU node this is the line that
    says the host's driver is older than the CUDA the wheel was built for."""
    built = torch.version.cuda
    if not built:
        return f"torch {torch.__version__} is a build without CUDA"
    try:
        torch.cuda.init()
    except Exception as exc:  # torch raises RuntimeError or AssertionError, by cause
        words = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"torch {torch.__version__} is built for CUDA {built}: {words}"
    return f"torch {torch.__version__} (CUDA {built}) sees no GPU"


def _check_device(trainer: TrainerConfig) -> None:
    """Refuse, naming the key, what Lightning would refuse later with a traceback."""
    import torch

    if trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"key 'train.trainer.accelerator': {trainer.accelerator!r} but this machine has no "
            f"CUDA GPU torch can use ({_cuda_reason(torch)}); use auto or cpu"
        )
    if trainer.accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("key 'train.trainer.accelerator': 'mps' is not available here")
    on_cpu = trainer.accelerator == "cpu" or not torch.cuda.is_available()
    if on_cpu and str(trainer.precision).startswith("16"):
        raise ConfigError(
            f"key 'train.trainer.precision': {trainer.precision!r} needs a GPU; on a CPU use "
            "bf16-mixed, 32-true or auto"
        )


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto`: bf16 mixed precision where the hardware computes bf16 natively, else fp32.

    That is a CUDA GPU, or a CPU with bf16 matrix or vector instructions: AMX tiles
    (Intel Sapphire Rapids and later) or AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper
    Lake). There oneDNN trains the default two-member model 1.6 (AMX) to 2.3 (Zen 4) times
    faster than in fp32. Elsewhere bf16 is emulated and slower, so those CPUs stay on fp32.
    """
    if precision != "auto":
        return precision
    import torch

    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    cpu = accelerator in ("auto", "cpu") and not gpu and cpu_has_bf16()
    return "bf16-mixed" if gpu or cpu else "32-true"


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU advertises native bf16 arithmetic (Linux; elsewhere assume not)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return any(flag in flags.split() for flag in BF16_CPU_FLAGS)


def _finish_wandb(trainer: Any) -> None:
    """Close this run's W&B run, so a second `train` in one process starts its own."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()


def _wandb_logger(cfg: KndConfig, run_dir: Path):
    """W&B offline by default; online only when configured. The key comes from WANDB_API_KEY."""
    from pytorch_lightning.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity or None,
        name=cfg.train.run_name,
        id=cfg.train.run_name,
        save_dir=str(run_dir),
        offline=cfg.wandb.mode == "offline",
        resume="allow",
        config=asdict(cfg),
    )
