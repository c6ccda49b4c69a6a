"""Long recordings made of real clips: what `knd predict --timeline` is tested and timed on.

RAVDESS clips are laid end to end with pauses of faint noise between them (a meeting or
a call has no digital silence), cycling through the clips until the wanted length. The
file is written block by block, so an hour costs no more memory than a clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Utterance:
    """Where one clip's speech lies in the recording (seconds), and which clip it is."""

    start: float
    end: float
    clip: Path


def long_recording(
    clips: list[Path],
    seconds: float,
    path: Path,
    *,
    rate: int = 16000,
    pause_s: tuple[float, float] = (1.0, 3.0),
    noise_db: float = -60.0,
    seed: int = 0,
) -> list[Utterance]:
    """Write `seconds` of clips and pauses to `path` (WAV or FLAC by suffix) at `rate`;
    the utterances come back with their speech bounds (the clips' own silence trimmed)."""
    import soundfile as sf

    from kndcli.audio import decode, speech_bounds

    rng = np.random.default_rng(seed)
    noise = 10 ** (noise_db / 20)
    total = int(seconds * rate)
    written = 0
    truth: list[Utterance] = []
    with sf.SoundFile(path, "w", samplerate=rate, channels=1) as out:
        for n in range(10**9):
            pause = int(rng.uniform(*pause_s) * rate)
            out.write(noise * rng.standard_normal(min(pause, total - written)).astype(np.float32))
            written = min(total, written + pause)
            if written >= total:
                break
            clip = clips[n % len(clips)]
            samples = decode(clip, sample_rate=rate).samples[: total - written]
            a, b = speech_bounds(samples, rate)
            truth.append(Utterance((written + a) / rate, (written + b) / rate, clip))
            out.write(samples + noise * rng.standard_normal(len(samples)).astype(np.float32))
            written += len(samples)
            if written >= total:
                break
    return truth
