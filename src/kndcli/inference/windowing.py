"""Fitting clips to the model's window: centre pad or crop, and sliding windows."""

from __future__ import annotations

import numpy as np


def center_fit(samples: np.ndarray, length: int) -> np.ndarray:
    """Centre-crop or zero-pad to exactly `length` samples (evaluation and short clips)."""
    n = len(samples)
    if n == length:
        return samples
    if n > length:
        start = (n - length) // 2
        return samples[start : start + length]
    out = np.zeros(length, dtype=np.float32)
    start = (length - n) // 2
    out[start : start + n] = samples
    return out


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
