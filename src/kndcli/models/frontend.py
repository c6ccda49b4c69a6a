"""The log-mel frontend that lives inside every model, so it is exported with the weights."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torchaudio
from torch import nn
from torchaudio.transforms import FrequencyMasking, TimeMasking

from kndcli.config import ModelConfig
from kndcli.errors import ConfigError


def fp32_features(
    features: Callable[[torch.Tensor], torch.Tensor], waveform: torch.Tensor
) -> torch.Tensor:
    """`features(waveform)` in fp32 even under autocast: mixed-precision training runs the
    backbone in bf16, while the exported fp32 graph computes the features in fp32."""
    device = waveform.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return features(waveform.float())
    return features(waveform)


class PowerSpectrogram(nn.Module):
    """|STFT|² as one strided convolution with a fixed windowed-DFT basis.

    Mathematically torch.stft (centred, reflect-padded, Hann window); written as a
    convolution because ONNX Runtime runs its STFT operator several times slower than a
    GEMM-backed Conv, and this module is the first thing every request pays for.
    """

    def __init__(self, n_fft: int, win_length: int, hop_length: int) -> None:
        super().__init__()
        window = torch.hann_window(win_length, periodic=True, dtype=torch.float64)
        left = (n_fft - win_length) // 2
        window = nn.functional.pad(window, (left, n_fft - win_length - left))
        k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
        n = torch.arange(n_fft, dtype=torch.float64)[None, :]
        angle = 2 * torch.pi * k * n / n_fft
        basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])
        self.register_buffer("basis", basis[:, None, :].float(), persistent=False)
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.bins = n_fft // 2 + 1

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        pad = self.n_fft // 2
        x = nn.functional.pad(waveform[:, None, :], (pad, pad), mode="reflect")
        y = nn.functional.conv1d(x, self.basis, stride=self.hop_length)
        # (batch, 2, bins, frames): real and imaginary parts, squared and summed in one op.
        y = y.reshape(y.shape[0], 2, self.bins, y.shape[-1])
        return (y * y).sum(dim=1)


class LogMel(nn.Module):
    """Waveform (batch, samples) -> normalised log-mel (batch, 1, mels, frames).

    Normalisation is per utterance: a service scoring one clip cannot know the speaker,
    so it cannot use speaker statistics. SpecAugment masks apply in training mode only.
    """

    def __init__(self, cfg: ModelConfig, sample_rate: int) -> None:
        super().__init__()
        if cfg.normalize not in ("bin", "global"):
            raise ConfigError(f"key 'model.normalize': {cfg.normalize!r} is not 'bin' or 'global'")
        self.normalize = cfg.normalize
        if cfg.compression not in ("log", "pcen"):
            raise ConfigError(
                f"key 'model.compression': {cfg.compression!r} is not 'log' or 'pcen'"
            )
        win = round(cfg.win_ms * sample_rate / 1000)
        hop = round(cfg.hop_ms * sample_rate / 1000)
        n_fft = max(cfg.n_fft, win)
        self.spectrogram = PowerSpectrogram(n_fft, win, hop)
        fbanks = torchaudio.functional.melscale_fbanks(
            n_fft // 2 + 1,
            f_min=cfg.f_min,
            f_max=min(cfg.f_max, sample_rate / 2),
            n_mels=cfg.n_mels,
            sample_rate=sample_rate,
        )
        self.register_buffer("fbanks", fbanks.T.contiguous(), persistent=False)
        # iid_masks: each clip draws its own bands and frames. Without it torchaudio puts
        # one mask on the whole batch, so every clip of a step loses the same band.
        masks: list[nn.Module] = []
        masks += [FrequencyMasking(cfg.freq_mask_width, iid_masks=True)] * cfg.freq_masks
        masks += [TimeMasking(cfg.time_mask_width, iid_masks=True)] * cfg.time_masks
        self.spec_augment = nn.Sequential(*masks)
        self.vtlp = cfg.vtlp
        self.pcen = PCEN(cfg.n_mels, cfg.hop_ms / 1000) if cfg.compression == "pcen" else None

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return fp32_features(self._features, waveform)

    def _features(self, waveform: torch.Tensor) -> torch.Tensor:
        power = self.spectrogram(waveform)
        if self.training and self.vtlp > 0:
            alpha = 1 + (torch.rand(len(power), device=power.device) * 2 - 1) * self.vtlp
            power = warp_frequencies(power, alpha)
        energy = torch.matmul(self.fbanks, power)
        mel = self.pcen(energy) if self.pcen is not None else torch.log(energy + 1e-6)
        dims = (-2, -1) if self.normalize == "global" else (-1,)
        mean = mel.mean(dim=dims, keepdim=True)
        std = mel.std(dim=dims, keepdim=True)
        mel = (mel - mean) / (std + 1e-5)
        if self.training and len(self.spec_augment):
            mel = self.spec_augment(mel)
        return mel.unsqueeze(1)


class PCEN(nn.Module):
    """Per-channel energy normalisation (Wang et al., 2017), trainable per mel band.

    pcen(E) = (E / (eps + M)^alpha + delta)^r - delta^r, where M is E smoothed over time
    by a first-order filter with a `time_constant_s` time constant. Dividing by M is an
    automatic gain control per band: a stationary noise floor or a channel's colouring
    becomes a constant the root compresses away, where log only shifts it. alpha, delta
    and r start at the values of Lostanlen et al. (2019) and are learnt as logarithms.

    The filter is written as a causal convolution with the impulse response truncated at
    0.1 % (export-friendly, no loop over frames), and each frame divides by the weight
    its window actually covered, so the first frames are not under-smoothed zeros.
    """

    def __init__(
        self,
        bands: int,
        hop_s: float,
        time_constant_s: float = 0.4,
        alpha: float = 0.98,
        delta: float = 2.0,
        r: float = 0.5,
    ) -> None:
        super().__init__()
        frames = time_constant_s / hop_s
        s = (math.sqrt(1 + 4 * frames**2) - 1) / (2 * frames**2)  # librosa.pcen's rule
        taps = math.ceil(math.log(1e-3) / math.log(1 - s))
        kernel = s * (1 - s) ** torch.arange(taps - 1, -1, -1, dtype=torch.float64)
        self.register_buffer("kernel", kernel.float()[None, None, :], persistent=False)
        self.decay = 1 - s
        self.log_alpha = nn.Parameter(torch.full((bands, 1), math.log(alpha)))
        self.log_delta = nn.Parameter(torch.full((bands, 1), math.log(delta)))
        self.log_r = nn.Parameter(torch.full((bands, 1), math.log(r)))

    def smooth(self, energy: torch.Tensor) -> torch.Tensor:
        """(batch, bands, frames) -> the first-order smoother's output, per band."""
        batch, bands, frames = energy.shape
        taps = self.kernel.shape[-1]
        x = nn.functional.pad(energy.reshape(batch * bands, 1, frames), (taps - 1, 0))
        smoothed = nn.functional.conv1d(x, self.kernel).reshape(batch, bands, frames)
        steps = torch.arange(frames, device=energy.device, dtype=energy.dtype).clamp(max=taps - 1)
        return smoothed / (1 - self.decay ** (steps + 1))

    def forward(self, energy: torch.Tensor) -> torch.Tensor:
        alpha = self.log_alpha.exp().clamp(max=1.0)
        delta, r = self.log_delta.exp(), self.log_r.exp()
        gain = (self.smooth(energy) + 1e-6) ** alpha
        return (energy / gain + delta) ** r - delta**r


def warp_frequencies(power: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Vocal tract length perturbation: stretch clip i's spectrum by `alpha[i]`.

    A longer or shorter vocal tract moves every formant by the same factor. Speed
    perturbation moves formants, pitch and tempo together; this moves formants alone, so
    the model hears more "speakers" than the corpus has. Training only.
    """
    batch, bins, frames = power.shape
    source = torch.arange(bins, device=power.device, dtype=power.dtype) / alpha[:, None]
    source = source.clamp(max=bins - 1)
    low = source.floor().long()
    high = (low + 1).clamp(max=bins - 1)
    weight = (source - low).unsqueeze(-1)

    def at(index: torch.Tensor) -> torch.Tensor:
        return power.gather(1, index.unsqueeze(-1).expand(batch, bins, frames))

    return at(low) * (1 - weight) + at(high) * weight
