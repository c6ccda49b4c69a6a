"""Callbacks that leave readable artefacts: confusion PNGs and one line per epoch."""

from __future__ import annotations

from pathlib import Path

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
