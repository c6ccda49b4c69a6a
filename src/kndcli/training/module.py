"""The LightningModule: owns loss, metrics and optimiser around a plain `models/` module."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics as tm

from kndcli.config import ModelConfig
from kndcli.models import build_model
from kndcli.models.emotion import combine_members


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -scale (Ganin & Lempitsky)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def _metrics(n_classes: int) -> tm.MetricCollection:
    return tm.MetricCollection(
        {
            "acc": tm.classification.MulticlassAccuracy(n_classes, average="micro"),
            "f1": tm.classification.MulticlassF1Score(n_classes, average="macro"),
            "uar": tm.classification.MulticlassRecall(n_classes, average="macro"),
        }
    )


class EmotionClassifier(pl.LightningModule):
    """Cross-entropy with label smoothing and optional mixup; AdamW with one-cycle or cosine.

    With `speaker_adversarial` > 0 a small speaker classifier reads the input of the
    model's last linear layer (the pooled embedding) through a gradient reversal: it
    learns to name the training speaker, and the backbone learns to make that hard. It
    lives here, not in the model, so the exported bundle is unchanged.
    """

    def __init__(
        self,
        model: dict[str, Any],
        labels: list[str],
        sample_rate: int,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        scheduler: str = "onecycle",
        speaker_adversarial: float = 0.0,
        n_speakers: int = 0,
        member_holdout: list[list[int]] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.labels = labels
        self.model = build_model(ModelConfig(**model), len(labels), sample_rate)
        n = len(labels)
        self.train_metrics = _metrics(n).clone(prefix="train/")
        self.val_metrics = _metrics(n).clone(prefix="val/")
        self.test_metrics = _metrics(n).clone(prefix="test/")
        self.val_recall = tm.classification.MulticlassRecall(n, average="none")
        self.val_confusion = tm.classification.MulticlassConfusionMatrix(n)
        self.last_confusion: np.ndarray | None = None
        self.speaker_head: torch.nn.Module | None = None
        self._embedding: torch.Tensor | None = None
        if speaker_adversarial > 0 and n_speakers > 1:
            last = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)][-1]
            self.speaker_head = torch.nn.Sequential(
                torch.nn.Linear(last.in_features, 128),
                torch.nn.ReLU(),
                torch.nn.Linear(128, n_speakers),
            )
            last.register_forward_hook(self._keep_embedding)

    def _keep_embedding(self, _module: Any, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
        self._embedding = inputs[0] if self.training else None

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        labels: list[str],
        sample_rate: int,
        n_speakers: int = 0,
        member_holdout: list[list[int]] | None = None,
    ) -> EmotionClassifier:
        """The module `knd train` fits for a KndConfig (also used by `knd profile train`)."""
        from dataclasses import asdict

        return cls(
            model=asdict(cfg.model),
            labels=labels,
            sample_rate=sample_rate,
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            label_smoothing=cfg.train.label_smoothing,
            mixup_alpha=cfg.train.augment.mixup_alpha,
            scheduler=cfg.train.scheduler,
            speaker_adversarial=cfg.train.speaker_adversarial,
            n_speakers=n_speakers,
            member_holdout=member_holdout,
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.model(waveform)

    def training_step(self, batch: tuple[torch.Tensor, ...], _: int) -> torch.Tensor:
        x, y, speaker = batch
        alpha = self.hparams.mixup_alpha
        lam, perm = 1.0, None
        if alpha > 0:
            lam = float(np.random.beta(alpha, alpha))
            perm = torch.randperm(x.shape[0], device=x.device)
        if getattr(self.model, "mixes_states", False):
            # A pretrained encoder: mix its hidden states (the head's input), so a frozen
            # encoder still sees, and caches, each clip as it is.
            member_logits = self.model.member_logits(x, lam, perm)
        else:
            if perm is not None:
                x = lam * x + (1 - lam) * x[perm]
            member_logits = self.model.member_logits(x)
        # Each ensemble member learns from its own loss, as if trained alone; the mean
        # keeps the logged loss comparable with a single model's.
        loss = torch.stack(
            [
                self._member_loss(logits, y, lam, perm, self._kept(m, speaker))
                for m, logits in enumerate(member_logits)
            ]
        ).mean()
        logits = combine_members(member_logits, self.hparams.model["ensemble_mean"])
        if self.speaker_head is not None and self._embedding is not None:
            loss = loss + self._speaker_loss(speaker, lam, perm)
        self.train_metrics.update(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def _kept(self, member: int, speaker: torch.Tensor) -> torch.Tensor | None:
        """Which clips of the batch member `member` may learn from (None: all of them);
        its left-out speakers (`train.cross_fit_speakers`) are kept for calibration."""
        held = (self.hparams.member_holdout or [])[member : member + 1]
        if not held or not held[0]:
            return None
        return ~torch.isin(speaker, torch.tensor(held[0], device=speaker.device))

    def _member_loss(
        self, logits: torch.Tensor, y: torch.Tensor, lam: float, perm: Any, kept: Any
    ) -> torch.Tensor:
        """One member's loss over the clips it may learn from. Under mixup each label is
        weighted by its share and counted only if its clip is kept: a left-out speaker's
        label never reaches the member."""
        if kept is None:
            return self._mixed(self._loss, logits, y, lam, perm)

        def per_clip(target: torch.Tensor) -> torch.Tensor:
            smoothing = self.hparams.label_smoothing
            return F.cross_entropy(logits, target, label_smoothing=smoothing, reduction="none")

        weight = kept.float()
        if perm is None:
            return (weight * per_clip(y)).sum() / weight.sum().clamp_min(1.0)
        first, second = lam * weight, (1 - lam) * weight[perm]
        total = (first * per_clip(y) + second * per_clip(y[perm])).sum()
        return total / (first + second).sum().clamp_min(1e-6)

    @staticmethod
    def _mixed(loss: Any, logits: torch.Tensor, y: torch.Tensor, lam: float, perm: Any) -> Any:
        if perm is None:
            return loss(logits, y)
        return lam * loss(logits, y) + (1 - lam) * loss(logits, y[perm])

    def _speaker_loss(self, speaker: torch.Tensor, lam: float, perm: Any) -> torch.Tensor:
        # The reversal ramps up over training (DANN's schedule): early on the embedding
        # has nothing to hide yet, and a full-strength reversal only adds noise.
        progress = self.global_step / max(1, self.trainer.estimated_stepping_batches)
        scale = self.hparams.speaker_adversarial * (2 / (1 + np.exp(-10 * progress)) - 1)
        logits = self.speaker_head(_ReverseGradient.apply(self._embedding, float(scale)))
        loss = self._mixed(F.cross_entropy, logits, speaker, lam, perm)
        self.log("train/speaker_loss", loss, on_step=False, on_epoch=True)
        return loss

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def validation_step(self, batch: tuple[torch.Tensor, ...], _: int) -> None:
        x, y, _speaker = batch
        logits = self(x)
        self.log("val/loss", self._loss(logits, y), prog_bar=True, sync_dist=True)
        self.val_metrics.update(logits, y)
        self.val_recall.update(logits, y)
        self.val_confusion.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        recall = self.val_recall.compute()
        for label, value in zip(self.labels, recall, strict=True):
            self.log(f"val/recall_{label}", value, sync_dist=True)
        self.last_confusion = self.val_confusion.compute().cpu().numpy()
        for metric in (self.val_metrics, self.val_recall, self.val_confusion):
            metric.reset()

    def test_step(self, batch: tuple[torch.Tensor, ...], _: int) -> None:
        x, y, _speaker = batch
        self.test_metrics.update(self(x), y)
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups: Any = [p for p in self.parameters() if p.requires_grad]
        if hasattr(self.model, "parameter_groups"):  # a pretrained encoder: its own rates
            model = hp.model
            groups = self.model.parameter_groups(hp.lr, model["encoder_lr"], model["layer_decay"])
            if self.speaker_head is not None:
                groups[0]["params"] += list(self.speaker_head.parameters())
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        if hp.scheduler == "onecycle":
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[group["lr"] for group in optimizer.param_groups],
                total_steps=max(1, total),
                pct_start=0.15,
            )
        elif hp.scheduler == "cosine":
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
        elif hp.scheduler == "none":
            return optimizer
        else:
            raise ValueError(f"train.scheduler: unknown scheduler {hp.scheduler!r}")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
