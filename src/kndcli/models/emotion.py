"""Frontend + backbone as one module, and the probability head used for export."""

from __future__ import annotations

import torch
from torch import nn


class EmotionModel(nn.Module):
    """Waveform (batch, samples) at the model's sample rate -> class logits."""

    def __init__(self, frontend: nn.Module, backbone: nn.Module) -> None:
        super().__init__()
        self.frontend = frontend
        self.backbone = backbone

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.frontend(waveform))


class WithProbabilities(nn.Module):
    """What ONNX exports: softmax probabilities, so every runtime gets calibrated output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(waveform), dim=-1)
