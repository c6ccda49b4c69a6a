"""Backbones over the log-mel image; each is registered by name."""

from __future__ import annotations

import torch
from torch import nn

from kndcli.config import ModelConfig
from kndcli.models.pooling import AttentiveStatsPool
from kndcli.models.registration import register_model


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, pool: tuple[int, int]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(c_in, c_out),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)
        self.pool = nn.MaxPool2d(pool) if pool != (1, 1) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.body(x) + self.skip(x)))


@register_model("cnn")
class EmotionCNN(nn.Module):
    """Small residual CNN with attentive statistics pooling: fast on a CPU, strong on RAVDESS."""

    def __init__(self, cfg: ModelConfig, n_classes: int) -> None:
        super().__init__()
        c = cfg.channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c // 2, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(c // 2),
            nn.ReLU(),
            _ResBlock(c // 2, c, (2, 2)),
            _ResBlock(c, 2 * c, (2, 1)),
            _ResBlock(2 * c, 2 * c, (2, 2)),
        )
        self.pool = AttentiveStatsPool(2 * c)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(4 * c, n_classes))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.features(mel).mean(dim=2)
        return self.head(self.pool(x))


@register_model("crnn")
class EmotionCRNN(nn.Module):
    """Convolutions for local spectral shape, a bidirectional GRU for prosody over time."""

    def __init__(self, cfg: ModelConfig, n_classes: int) -> None:
        super().__init__()
        c = cfg.channels
        self.features = nn.Sequential(
            _conv(1, c // 2),
            nn.MaxPool2d((2, 2)),
            _ResBlock(c // 2, c, (2, 2)),
            _ResBlock(c, c, (2, 1)),
        )
        self.gru = nn.GRU(c, c, batch_first=True, bidirectional=True)
        self.pool = AttentiveStatsPool(2 * c)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(4 * c, n_classes))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.features(mel).mean(dim=2).transpose(1, 2)
        x, _ = self.gru(x)
        return self.head(self.pool(x.transpose(1, 2)))


@register_model("resnet18")
class EmotionResNet18(nn.Module):
    """torchvision's ResNet-18 with a one-channel stem; never downloads weights."""

    def __init__(self, cfg: ModelConfig, n_classes: int) -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None, num_classes=n_classes)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(net.fc.in_features, n_classes))
        self.net = net

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.net(mel)
