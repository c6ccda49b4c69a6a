"""Pooling over time: attention-weighted mean and standard deviation."""

from __future__ import annotations

import torch
from torch import nn


class AttentiveStatsPool(nn.Module):
    """(batch, channels, time) -> (batch, 2 * channels), weighting frames by learned salience.

    Emotion lives in a few stressed syllables; averaging silence and neutral frames with
    them dilutes it, so frames are weighted before their mean and spread are taken.
    """

    def __init__(self, channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.attention = nn.Sequential(
            nn.Conv1d(channels, hidden, 1), nn.Tanh(), nn.Conv1d(hidden, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.attention(x), dim=-1)
        mean = (x * weights).sum(dim=-1)
        var = (x * x * weights).sum(dim=-1) - mean * mean
        return torch.cat([mean, torch.sqrt(var.clamp(min=1e-6))], dim=1)
