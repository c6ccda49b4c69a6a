"""Fitting clips to the model's window: centre pad or crop, and sliding windows."""

from __future__ import annotations

import numpy as np


def center_fit(samples: np.ndarray, length: int) -> np.ndarray:
    """Centre-crop a long clip, or repeat a short one, to exactly `length` samples.

    Repeating instead of zero-padding keeps every frame of the window speech: digital
    silence would dominate a per-utterance normalised log-mel of a short clip.
    """
    n = len(samples)
    if n == length:
        return samples
    if n > length:
        start = (n - length) // 2
        return samples[start : start + length]
    return repeat_fit(samples, length)


def repeat_fit(samples: np.ndarray, length: int, shift: int = 0) -> np.ndarray:
    """Tile a short clip to `length` samples, starting `shift` samples into it."""
    if len(samples) == 0:
        return np.zeros(length, dtype=np.float32)
    reps = -(-(length + shift) // len(samples))
    return np.tile(samples, reps)[shift : shift + length].astype(np.float32, copy=False)


def window_starts(n_samples: int, window: int, hop: int) -> list[int]:
    """Start offsets of sliding windows covering the clip; one centred window if it fits.

    A clip up to a quarter longer than the window gets one centred window: a second one
    would mostly re-score the same audio.
    """
    if n_samples <= window + window // 4:
        return [0]
    last = n_samples - window
    starts = list(range(0, last + 1, hop))
    if starts[-1] != last:
        starts.append(last)
    return starts


def make_windows(samples: np.ndarray, window: int, hop: int) -> tuple[np.ndarray, list[int]]:
    """(n_windows, window) float32 batch and each window's start sample."""
    starts = window_starts(len(samples), window, hop)
    if len(starts) == 1:
        return center_fit(samples, window)[None, :], [max(0, (len(samples) - window) // 2)]
    return np.stack([samples[s : s + window] for s in starts]).astype(np.float32), starts
