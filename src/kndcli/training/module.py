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


def _metrics(n_classes: int) -> tm.MetricCollection:
    return tm.MetricCollection(
        {
            "acc": tm.classification.MulticlassAccuracy(n_classes, average="micro"),
            "f1": tm.classification.MulticlassF1Score(n_classes, average="macro"),
            "uar": tm.classification.MulticlassRecall(n_classes, average="macro"),
        }
    )


class EmotionClassifier(pl.LightningModule):
    """Cross-entropy with label smoothing and optional mixup; AdamW with one-cycle or cosine."""

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

    @classmethod
    def from_config(cls, cfg: Any, labels: list[str], sample_rate: int) -> EmotionClassifier:
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
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.model(waveform)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        alpha = self.hparams.mixup_alpha
        if alpha > 0:
            lam = float(np.random.beta(alpha, alpha))
            perm = torch.randperm(x.shape[0], device=x.device)
            logits = self(lam * x + (1 - lam) * x[perm])
            loss = lam * self._loss(logits, y) + (1 - lam) * self._loss(logits, y[perm])
        else:
            logits = self(x)
            loss = self._loss(logits, y)
        self.train_metrics.update(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
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

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.test_metrics.update(self(x), y)
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        if hp.scheduler == "onecycle":
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=hp.lr, total_steps=max(1, total), pct_start=0.15
            )
        elif hp.scheduler == "cosine":
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
        elif hp.scheduler == "none":
            return optimizer
        else:
            raise ValueError(f"train.scheduler: unknown scheduler {hp.scheduler!r}")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
