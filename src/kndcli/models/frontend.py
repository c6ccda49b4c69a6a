"""The log-mel frontend that lives inside every model, so it is exported with the weights."""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

from kndcli.config import ModelConfig
from kndcli.errors import ConfigError


class LogMel(nn.Module):
    """Waveform (batch, samples) -> normalised log-mel (batch, 1, mels, frames).

    Normalisation is per utterance and per mel bin: a service scoring one clip cannot know
    the speaker, so it cannot use speaker statistics. SpecAugment masks apply in training
    mode only.
    """

    def __init__(self, cfg: ModelConfig, sample_rate: int) -> None:
        super().__init__()
        if cfg.normalize not in ("bin", "global"):
            raise ConfigError(f"key 'model.normalize': {cfg.normalize!r} is not 'bin' or 'global'")
        self.normalize = cfg.normalize
        win = int(round(cfg.win_ms * sample_rate / 1000))
        hop = int(round(cfg.hop_ms * sample_rate / 1000))
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=max(cfg.n_fft, win),
            win_length=win,
            hop_length=hop,
            f_min=cfg.f_min,
            f_max=min(cfg.f_max, sample_rate / 2),
            n_mels=cfg.n_mels,
            power=2.0,
        )
        masks: list[nn.Module] = []
        masks += [torchaudio.transforms.FrequencyMasking(cfg.freq_mask_width)] * cfg.freq_masks
        masks += [torchaudio.transforms.TimeMasking(cfg.time_mask_width)] * cfg.time_masks
        self.spec_augment = nn.Sequential(*masks)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        mel = torch.log(self.melspec(waveform) + 1e-6)
        dims = (-2, -1) if self.normalize == "global" else (-1,)
        mean = mel.mean(dim=dims, keepdim=True)
        std = mel.std(dim=dims, keepdim=True)
        mel = (mel - mean) / (std + 1e-5)
        if self.training and len(self.spec_augment):
            mel = self.spec_augment(mel)
        return mel.unsqueeze(1)
