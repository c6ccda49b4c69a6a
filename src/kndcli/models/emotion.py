"""Frontend + backbone as one module, and the probability head used for export."""

from __future__ import annotations

import math

import torch
from torch import nn

ENSEMBLE_MEANS = ("log", "probability")


def combine_members(member_logits: torch.Tensor, mean: str = "log") -> torch.Tensor:
    """(members, batch, classes) -> logits of the ensemble (`model.ensemble_mean`).

    "log": the members' mean log-probability, whose softmax is the normalised geometric
    mean of their probabilities; "probability": logits whose softmax is their arithmetic
    mean. Log-probabilities keep the "logits in, softmax for probabilities" contract that
    export, metrics and losses rely on; one member's logits pass through unchanged.
    """
    if len(member_logits) == 1:
        return member_logits[0]
    log_probs = torch.log_softmax(member_logits, dim=-1)
    if mean == "log":
        return log_probs.mean(dim=0)
    return torch.logsumexp(log_probs, dim=0) - math.log(len(member_logits))


class Ensemble(nn.Module):
    """Several backbones over one log-mel, combined by `combine_members`.

    Averaging independently initialised networks cancels part of each one's
    speaker-specific mistakes (+1.6 points on RAVDESS folds, docs/quality.md).
    """

    def __init__(self, members: list[nn.Module], mean: str = "log") -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.mean = mean

    def member_logits(self, mel: torch.Tensor) -> torch.Tensor:
        """(members, batch, classes): what training scores, one loss per member."""
        return torch.stack([member(mel) for member in self.members])

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return combine_members(self.member_logits(mel), self.mean)


class EmotionModel(nn.Module):
    """Waveform (batch, samples) at the model's sample rate -> class logits."""

    def __init__(self, frontend: nn.Module, backbone: nn.Module) -> None:
        super().__init__()
        self.frontend = frontend
        self.backbone = backbone

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.frontend(waveform))

    def member_logits(self, waveform: torch.Tensor) -> torch.Tensor:
        """(members, batch, classes); one member for a single backbone."""
        mel = self.frontend(waveform)
        if isinstance(self.backbone, Ensemble):
            return self.backbone.member_logits(mel)
        return self.backbone(mel).unsqueeze(0)


class WithProbabilities(nn.Module):
    """What ONNX exports: softmax probabilities, so every runtime gets calibrated output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(waveform), dim=-1)
