"""Callbacks that leave readable artefacts: confusion PNGs and one line per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl


class ValidationPlots(pl.Callback):
    """Write the latest validation confusion matrix as `confusion_val.png` each epoch.

    Runs at train-epoch end, which Lightning calls after validation and after the
    module has computed its metrics.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        confusion = getattr(module, "last_confusion", None)
        if not trainer.is_global_zero or confusion is None or trainer.sanity_checking:
            return
        from kndcli.plots import plot_confusion

        uar = trainer.callback_metrics.get("val/uar")
        title = f"epoch {trainer.current_epoch}" + (f", val UAR {float(uar):.1%}" if uar else "")
        plot_confusion(confusion, module.labels, self.run_dir / "confusion_val.png", title)

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from kndcli.plots import plot_learning_curves

        plot_learning_curves(
            self.run_dir / "logs" / "metrics.csv", self.run_dir / "learning_curve.png"
        )


class EpochSummary(pl.Callback):
    """One line per epoch when there is no terminal for a progress bar (CI, Vertex logs)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        for key in ("train/loss", "val/loss", "val/acc", "val/uar"):
            if key in m:
                parts.append(f"{key} {float(m[key]):.4f}")
        print("  ".join(parts), flush=True)


class WeightAveraging(pl.Callback):
    """Average the model's weights over the last epochs, then re-estimate BatchNorm.

    With ten training speakers, the checkpoint that scores best on two validation
    speakers is a noisy pick, and runs that differ only in their seed land several
    points apart on unseen speakers. A running mean of the weights from `start_epoch` on
    (stochastic weight averaging) sits in a flatter region than any one of them.
    BatchNorm statistics of averaged weights must be measured again, not averaged: an
    average of running statistics does not match the averaged weights (tried: chance).
    The result is written as `averaged.ckpt` in Lightning's layout; the running mean
    rides in every checkpoint, so a resumed run averages the same epochs.
    """

    def __init__(self, start_epoch: int, path: str) -> None:
        self.start_epoch = start_epoch
        self.path = path
        self.average: dict[str, Any] | None = None
        self.count = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch < self.start_epoch:
            return
        import torch

        with torch.no_grad():
            state = {
                k: v.detach().float().cpu()
                for k, v in module.model.state_dict().items()
                if v.is_floating_point()
            }
            if self.average is None:
                self.average = state
            else:
                for key, value in state.items():
                    self.average[key] += (value - self.average[key]) / (self.count + 1)
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average, "count": self.count, "start_epoch": self.start_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.average = state_dict["average"]
        self.count = state_dict["count"]

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self.average is None:
            return
        import copy

        from torch.optim.swa_utils import update_bn

        from kndcli.training.checkpoint_io import AtomicCheckpointIO

        model = copy.deepcopy(module.model)
        state = model.state_dict()
        state.update({k: v.to(state[k].dtype) for k, v in self.average.items()})
        model.load_state_dict(state)
        update_bn(trainer.datamodule.train_dataloader(), model, device=module.device)
        weights = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
        AtomicCheckpointIO().save_checkpoint(
            {"state_dict": weights, "averaged_epochs": self.count, "epoch": trainer.current_epoch},
            self.path,
        )
