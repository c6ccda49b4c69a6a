"""`knd data synth`: procedural emotional speech, named and laid out like RAVDESS.

The built-in data set for demos and tests when no real corpus is at hand. Each clip is a
source-filter rendering of one of RAVDESS's two statements: a Rosenberg glottal pulse
train following an F0 contour, shaped by time-varying formant resonators (in the STFT
domain, so it stays vectorised), plus band-limited noise for the consonants.

Emotion moves the acoustic cues that acted emotion moves (Banse & Scherer 1996; Juslin &
Laukka 2003): F0 level, range and contour shape, speaking rate, loudness, spectral tilt,
voice quality (open quotient, breathiness, jitter, shimmer, tremor, creak) and
articulation. Speakers differ in base F0, vocal-tract length and personal style, and every
clip draws a little random variation, so telling emotions apart across speakers is
learnable but not trivial.

Every clip is drawn from a generator seeded by (seed, actor, clip index), so the output
is byte-identical for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kndcli.config import LABELS
from kndcli.errors import KndError, UsageError

MAX_ACTORS = 99
# RAVDESS speech: neutral has only normal intensity; 2 statements x 2 repetitions each.
INTENSITIES: dict[str, tuple[int, ...]] = {
    label: (1,) if label == "neutral" else (1, 2) for label in LABELS
}
_PEAK = 0.88
_PEAK_LIMIT = 0.9
_SPEECH_RMS = 0.05
_MIN_CLIP_S, _MAX_CLIP_S = 2.5, 4.5

# ------------------------------------------------------------------ prosody parameters
# Neutral values; emotions are deltas from these, scaled by intensity and speaker style.
# f0: semitones; range: log2 factor on F0 excursions; decl: fall over the utterance (st);
# accent: pitch-accent size (st); final: final glide (st, + rises); irregular: random
# per-syllable F0 scatter (st); rate: log2 speaking-rate factor; energy: dB; tilt: dB per
# octave; oq: glottal open quotient; jitter/shimmer: cycle-to-cycle fractions; breath:
# aspiration noise; tremor: 5-7 Hz F0 wobble (st); creak: share of irregular long cycles;
# formant: log2 formant shift (smiling raises formants); undershoot: vowels pulled toward
# schwa; articulation: log2 gain of consonant noise.
_NEUTRAL: dict[str, float] = {
    "f0": 0.0,
    "range": 0.0,
    "decl": 2.0,
    "accent": 2.5,
    "final": -2.0,
    "irregular": 0.4,
    "rate": 0.0,
    "energy": 0.0,
    "tilt": 0.0,
    "oq": 0.55,
    "jitter": 0.006,
    "shimmer": 0.04,
    "breath": 0.04,
    "tremor": 0.0,
    "creak": 0.02,
    "formant": 0.0,
    "undershoot": 0.0,
    "articulation": 0.0,
}
_PARAMS = tuple(_NEUTRAL)

_EMOTION_DELTAS: dict[str, dict[str, float]] = {
    "neutral": {},
    "calm": {
        "f0": -1.5, "range": -0.6, "decl": -0.5, "accent": -0.8, "final": 0.5,
        "rate": -0.2, "energy": -3.0, "tilt": -1.5, "oq": 0.05, "breath": 0.04,
        "jitter": -0.002, "articulation": -0.3,
    },
    "happy": {
        "f0": 3.5, "range": 0.6, "decl": -0.5, "accent": 2.0, "final": 1.0, "irregular": 0.6,
        "rate": 0.1, "energy": 4.0, "tilt": 2.0, "oq": -0.05, "formant": 0.05,
    },
    "sad": {
        "f0": -1.5, "range": -0.9, "decl": 1.5, "accent": -1.5, "final": -0.5,
        "rate": -0.4, "energy": -7.0, "tilt": -3.5, "oq": 0.1, "breath": 0.08,
        "jitter": 0.004, "shimmer": 0.03, "creak": 0.05, "formant": -0.02,
        "undershoot": 0.35, "articulation": -0.6,
    },
    "angry": {
        "f0": 3.0, "range": 0.5, "accent": 3.0, "final": -2.0, "irregular": 0.4,
        "rate": 0.15, "energy": 8.0, "tilt": 4.0, "oq": -0.15, "jitter": 0.004,
        "shimmer": 0.02, "formant": 0.03, "articulation": 0.6,
    },
    "fearful": {
        "f0": 5.0, "range": 0.2, "decl": -2.0, "accent": -0.5, "final": 2.0,
        "irregular": 1.5, "rate": 0.3, "energy": 1.0, "tilt": 1.0, "breath": 0.06,
        "jitter": 0.012, "shimmer": 0.05, "tremor": 0.7, "oq": 0.03,
    },
    "disgust": {
        "f0": -1.0, "range": 0.1, "decl": 1.0, "accent": 1.0, "final": -3.0,
        "rate": -0.2, "energy": 1.0, "tilt": -0.5, "creak": 0.25, "formant": -0.02,
        "breath": 0.02, "shimmer": 0.03, "undershoot": 0.1,
    },
    "surprised": {
        "f0": 4.0, "range": 0.7, "decl": -3.0, "accent": 2.0, "final": 8.0,
        "irregular": 0.3, "energy": 3.0, "tilt": 1.5, "oq": -0.03, "formant": 0.02,
        "articulation": 0.2,
    },
}  # fmt: skip

# Per-clip scatter (standard deviation) on top of the emotion, plus 30% of its delta.
_CLIP_SD: dict[str, float] = {
    "f0": 1.2, "range": 0.18, "decl": 0.75, "accent": 0.75, "final": 1.2, "irregular": 0.15,
    "rate": 0.09, "energy": 2.25, "tilt": 1.05, "oq": 0.03, "jitter": 0.0015,
    "shimmer": 0.012, "breath": 0.015, "tremor": 0.075, "creak": 0.015, "formant": 0.015,
    "undershoot": 0.045, "articulation": 0.15,
}  # fmt: skip
_LIMITS: dict[str, tuple[float, float]] = {
    "oq": (0.3, 0.8), "jitter": (0.0, 0.05), "shimmer": (0.0, 0.2), "breath": (0.0, 0.4),
    "tremor": (0.0, 2.5), "creak": (0.0, 0.8), "undershoot": (0.0, 0.7),
    "irregular": (0.0, 4.0), "rate": (-0.8, 0.7), "f0": (-6.0, 12.0), "range": (-1.5, 1.2),
}  # fmt: skip
_STRONG = 1.6  # strong intensity exaggerates every delta by this factor
# Each actor is recorded through a different chain: a smooth random EQ through these points.
_CHANNEL_HZ = np.array([100.0, 250.0, 600.0, 1500.0, 3500.0, 8000.0])

# ------------------------------------------------------------------ phones and statements
# Formants (F1, F2, F3) of an adult male (Peterson & Barney 1952); scaled per speaker.
_VOWELS: dict[str, tuple[float, float, float]] = {
    "ɪ": (390, 1990, 2550),
    "ɑ": (730, 1090, 2440),
    "ɔ": (570, 840, 2410),
    "ə": (500, 1500, 2500),
    "aɪ": (730, 1090, 2440),  # glides to ɪ in its second half
}
_SCHWA = np.array(_VOWELS["ə"], dtype=float)


@dataclass(frozen=True)
class _Consonant:
    kind: str  # stop, fricative, nasal or approximant
    voiced: bool
    duration: float
    noise_hz: float = 0.0  # centre of the burst or frication band
    noise_bw: float = 0.0
    noise_amp: float = 0.0
    formants: tuple[float, float, float] | None = None


_CONSONANTS: dict[str, _Consonant] = {
    "k": _Consonant("stop", False, 0.05, 2200, 900, 0.9),
    "t": _Consonant("stop", False, 0.05, 4200, 1500, 0.9),
    "d": _Consonant("stop", True, 0.045, 3800, 1500, 0.5),
    "g": _Consonant("stop", True, 0.045, 2000, 900, 0.5),
    "b": _Consonant("stop", True, 0.045, 1000, 800, 0.4),
    "s": _Consonant("fricative", False, 0.10, 6000, 1500, 0.35),
    "z": _Consonant("fricative", True, 0.07, 5500, 1500, 0.2),
    "ð": _Consonant("fricative", True, 0.045, 4000, 2500, 0.08),
    "ŋ": _Consonant("nasal", True, 0.07, formants=(280, 2100, 2700)),
    "r": _Consonant("approximant", True, 0.07, formants=(480, 1250, 1650)),
}

# (onset consonants, vowel, coda consonants, stressed)
_Syllable = tuple[str, str, str, bool]
STATEMENTS: dict[int, tuple[str, tuple[_Syllable, ...]]] = {
    1: (
        "Kids are talking by the door",
        (
            ("k", "ɪ", "dz", True),
            ("", "ɑ", "r", False),
            ("t", "ɔ", "", True),
            ("k", "ɪ", "ŋ", False),
            ("b", "aɪ", "", False),
            ("ð", "ə", "", False),
            ("d", "ɔ", "r", True),
        ),
    ),
    2: (
        "Dogs are sitting by the door",
        (
            ("d", "ɔ", "gz", True),
            ("", "ɑ", "r", False),
            ("s", "ɪ", "", True),
            ("t", "ɪ", "ŋ", False),
            ("b", "aɪ", "", False),
            ("ð", "ə", "", False),
            ("d", "ɔ", "r", True),
        ),
    ),
}


@dataclass(frozen=True)
class ClipSpec:
    """One RAVDESS speech clip: who says which statement, how."""

    actor: int
    emotion: str
    intensity: int
    statement: int
    repetition: int
    index: int  # position in the actor's clip list; seeds the clip

    @property
    def filename(self) -> str:
        code = LABELS.index(self.emotion) + 1
        return (
            f"03-01-{code:02d}-{self.intensity:02d}-{self.statement:02d}-"
            f"{self.repetition:02d}-{self.actor:02d}.wav"
        )


def clip_specs(actor: int) -> list[ClipSpec]:
    """The 60 speech clips RAVDESS records per actor, in a fixed order."""
    specs: list[ClipSpec] = []
    for emotion in LABELS:
        for intensity in INTENSITIES[emotion]:
            for statement in (1, 2):
                for repetition in (1, 2):
                    specs.append(
                        ClipSpec(actor, emotion, intensity, statement, repetition, len(specs))
                    )
    return specs


@dataclass(frozen=True)
class Speaker:
    """A synthetic actor: voice (F0, vocal-tract length) and personal speaking style."""

    actor: int
    female: bool
    f0_hz: float
    formant_scale: float
    style: dict[str, float]  # offsets added to every clip's parameters
    expressiveness: float  # how far this actor pushes emotions
    quirks: dict[str, dict[str, float]]  # per-emotion multipliers on the deltas
    room_noise_dbfs: float
    channel_db: tuple[float, ...]  # microphone/room colouring at _CHANNEL_HZ

    def channel_gain(self, freqs: np.ndarray) -> np.ndarray:
        """Linear gain of this actor's recording chain at `freqs`."""
        log_f = np.log(np.maximum(freqs, _CHANNEL_HZ[0]))
        return 10 ** (np.interp(log_f, np.log(_CHANNEL_HZ), self.channel_db) / 20)


def make_speaker(seed: int, actor: int) -> Speaker:
    """Draw actor `actor`'s voice; odd actors are male, even female, as in RAVDESS."""
    rng = np.random.default_rng([seed, actor, 0])
    female = actor % 2 == 0
    f0 = rng.uniform(180, 240) if female else rng.uniform(100, 140)
    scale = rng.uniform(1.0, 1.15) if female else rng.uniform(0.85, 1.0)
    style = {
        "range": rng.normal(0, 0.2),
        "rate": rng.normal(0, 0.08),
        "tilt": rng.normal(0, 1.5),
        "oq": rng.normal(0, 0.04),
        "breath": abs(rng.normal(0, 0.02)),
        "jitter": abs(rng.normal(0, 0.002)),
        "accent": rng.normal(0, 0.5),
        "decl": rng.normal(0, 0.5),
    }
    quirks = {
        emotion: {name: float(np.clip(rng.normal(1.0, 0.4), 0.3, 1.7)) for name in _PARAMS}
        for emotion in LABELS
    }
    return Speaker(
        actor=actor,
        female=female,
        f0_hz=float(f0),
        formant_scale=float(scale),
        style={k: float(v) for k, v in style.items()},
        expressiveness=float(rng.uniform(0.55, 1.25)),
        quirks=quirks,
        room_noise_dbfs=float(rng.uniform(-72, -62)),
        channel_db=tuple(float(v) for v in rng.normal(0, 3.0, len(_CHANNEL_HZ))),
    )


def clip_prosody(speaker: Speaker, spec: ClipSpec, rng: np.random.Generator) -> dict[str, float]:
    """Neutral + speaker style + (emotion delta x intensity x expressiveness) + scatter."""
    deltas = _EMOTION_DELTAS[spec.emotion]
    quirks = speaker.quirks[spec.emotion]
    strength = speaker.expressiveness * (_STRONG if spec.intensity == 2 else 1.0)
    params: dict[str, float] = {}
    for name in _PARAMS:
        delta = deltas.get(name, 0.0) * quirks[name] * strength
        scatter = rng.normal(0.0, _CLIP_SD[name] + 0.3 * abs(delta))
        value = _NEUTRAL[name] + speaker.style.get(name, 0.0) + delta + scatter
        lo, hi = _LIMITS.get(name, (-np.inf, np.inf))
        params[name] = float(np.clip(value, lo, hi))
    return params


# ------------------------------------------------------------------ rendering


@dataclass
class _Track:
    """Per-segment control values, laid end to end."""

    durations: list[float]
    voicing: list[float]
    amp: list[float]
    formants: list[tuple[float, float, float] | None]
    noise: list[tuple[float, float, float]]  # (amp, centre Hz, bandwidth Hz)
    nuclei: list[tuple[int, bool]]  # (segment index of each vowel, stressed)


def _build_track(
    statement: int, p: dict[str, float], rate: float, rng: np.random.Generator
) -> _Track:
    syllables = STATEMENTS[statement][1]
    track = _Track([], [], [], [], [], [])
    consonant_rate = rate**0.6  # consonants stretch less than vowels when speech slows
    artic = 2.0 ** p["articulation"]

    def add(
        dur: float,
        voicing: float,
        amp: float,
        formants: tuple[float, float, float] | None,
        noise: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ) -> None:
        track.durations.append(dur * float(np.exp(rng.normal(0, 0.08))))
        track.voicing.append(voicing)
        track.amp.append(amp)
        track.formants.append(formants)
        track.noise.append(noise)

    def consonant(symbol: str, final: bool) -> None:
        c = _CONSONANTS[symbol]
        dur = c.duration / consonant_rate * (1.3 if final else 1.0)
        if c.kind == "stop":
            add(dur, 0.3 if c.voiced else 0.0, 0.12, None)  # closure (voice bar if voiced)
            add(0.012, 0.0, 0.0, None, (c.noise_amp * artic, c.noise_hz, c.noise_bw))
            if not c.voiced:  # aspiration before the vowel
                add(0.03 / consonant_rate, 0.0, 0.0, None, (0.12 * artic, 1800.0, 1800.0))
        elif c.kind == "fricative":
            voicing = 0.5 if c.voiced else 0.0
            add(dur, voicing, 0.25 * voicing, None, (c.noise_amp * artic, c.noise_hz, c.noise_bw))
        else:
            add(dur, 1.0, 0.45 if c.kind == "nasal" else 0.7, c.formants)

    for i, (onset, vowel, coda, stressed) in enumerate(syllables):
        last = i == len(syllables) - 1
        for symbol in onset:
            consonant(symbol, False)
        base = 0.14 if stressed else (0.06 if vowel == "ə" else 0.09)
        dur = base / rate * (1.5 if last else 1.0)
        amp = (1.0 if stressed else 0.75) * (0.85 if last else 1.0)
        formants = _VOWELS[vowel]
        track.nuclei.append((len(track.durations), stressed))
        if vowel == "aɪ":
            add(dur * 0.8, 1.0, amp, formants)
            add(dur * 0.6, 1.0, amp * 0.9, _VOWELS["ɪ"])
        else:
            add(dur, 1.0, amp, formants)
        for symbol in coda:
            consonant(symbol, last)
    return track


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average with edge padding (coarticulation, onset ramps)."""
    if width <= 1:
        return x
    kernel = np.ones(width) / width
    padded = np.pad(x, (width // 2, width - 1 - width // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def _f0_contour(
    speaker: Speaker,
    p: dict[str, float],
    track: _Track,
    starts: np.ndarray,
    speech_start: int,
    n: int,
    sr: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """F0 in Hz per sample: declination, pitch accents, final glide, tremor, drift."""
    ends = starts + np.asarray([int(round(d * sr)) for d in track.durations])
    speech_end = int(ends[-1])
    span = max(speech_end - speech_start, 1)
    range_mult = 2.0 ** p["range"]
    times, values = [], []
    for k, (seg, stressed) in enumerate(track.nuclei):
        centre = (starts[seg] + ends[seg]) / 2
        u = (centre - speech_start) / span
        value = p["decl"] * (0.5 - u) + rng.normal(0, 1) * p["irregular"]
        if stressed:
            value += p["accent"]
        value *= range_mult
        if k == len(track.nuclei) - 1:
            # Final glide across the last vowel (and its coda).
            times += [starts[seg], speech_end]
            values += [value, value + p["final"] * range_mult]
        else:
            times.append(centre)
            values.append(value)
    times = [speech_start, *times]
    values = [values[0] - 0.5 * range_mult, *values]
    # Build at 1 kHz, smooth there (cheap), then interpolate to samples.
    step = max(sr // 1000, 1)
    grid = np.arange(0, n, step)
    contour = np.interp(grid, times, values)
    contour = _smooth(contour, 60)
    drift = _smooth(rng.normal(0, 1, len(grid)), 150) * 4.0  # slow wander, ~0.3 st
    contour = contour + drift
    semitones = np.interp(np.arange(n), grid, contour)
    t = np.arange(n) / sr
    if p["tremor"] > 0:
        rate_hz = rng.uniform(5.0, 7.0)
        semitones += p["tremor"] * np.sin(2 * np.pi * rate_hz * t + rng.uniform(0, 2 * np.pi))
    f0 = speaker.f0_hz * 2.0 ** ((p["f0"] + semitones) / 12.0)
    return np.clip(f0, 50.0, min(480.0, 0.2 * sr))


def _glottal_source(
    f0: np.ndarray, p: dict[str, float], creak_from: float, sr: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Differentiated Rosenberg pulses (with jitter, shimmer, creak) and the glottal flow."""
    n = len(f0)
    max_cycles = int(1.3 * n * f0.max() / sr) + 2  # room for jitter and short cycles
    jitter_draws = rng.normal(0, 1, max_cycles)
    shimmer_draws = rng.normal(0, 1, max_cycles)
    creak_draws = rng.random(max_cycles)
    creak_len = rng.uniform(1.4, 2.2, max_cycles)
    starts, periods, amps = [], [], []
    t, k = 0.0, 0
    while t < n and k < max_cycles:
        period = sr / f0[int(t)] * (1 + p["jitter"] * jitter_draws[k])
        amp = 1 + p["shimmer"] * shimmer_draws[k]
        # Creaky cycles: long, irregular and weak, mostly late in the phrase.
        late = 0.3 + 0.7 * (t / n >= creak_from)
        if creak_draws[k] < p["creak"] * late:
            period *= creak_len[k]
            amp *= 0.6
        starts.append(t)
        periods.append(period)
        amps.append(amp)
        t += period
        k += 1
    starts_a, periods_a, amps_a = np.asarray(starts), np.asarray(periods), np.asarray(amps)
    samples = np.arange(n, dtype=float)
    cycle = np.clip(np.searchsorted(starts_a, samples, side="right") - 1, 0, len(starts_a) - 1)
    phase = (samples - starts_a[cycle]) / periods_a[cycle]
    oq = p["oq"]
    rise, fall = 0.7 * oq, 0.3 * oq
    flow = np.where(
        phase < rise,
        0.5 * (1 - np.cos(np.pi * phase / rise)),
        np.where(phase < oq, np.cos(0.5 * np.pi * (phase - rise) / fall), 0.0),
    )
    flow *= np.maximum(amps_a[cycle], 0.0)
    excitation = np.diff(flow, prepend=0.0)  # lip radiation ~ differentiation
    return excitation, flow


def _stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    window = np.hanning(n_fft + 1)[:-1]
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    return np.fft.rfft(frames * window, axis=1)


def _istft(spec: np.ndarray, n_fft: int, hop: int, length: int) -> np.ndarray:
    window = np.hanning(n_fft + 1)[:-1]
    frames = np.fft.irfft(spec, n=n_fft, axis=1) * window
    out = np.zeros(length)
    for i, frame in enumerate(frames):
        out[i * hop : i * hop + n_fft] += frame
    return out / (np.sum(window**2) / hop)


def _resonators(formants: np.ndarray, bandwidths: np.ndarray, freqs: np.ndarray, sr: int):
    """Complex response of cascaded unity-DC-gain 2nd-order resonators, per frame.

    formants, bandwidths: (frames, k) in Hz; freqs: (bins,). Returns (frames, bins).
    """
    r = np.exp(-np.pi * bandwidths / sr)
    a1 = (-2 * r * np.cos(2 * np.pi * formants / sr)).astype(np.float32)
    a2 = (r * r).astype(np.float32)
    z1 = np.exp(-2j * np.pi * freqs / sr).astype(np.complex64)
    z2 = z1 * z1
    response = np.ones((len(formants), len(freqs)), dtype=np.complex64)
    for k in range(formants.shape[1]):
        gain = (1 + a1[:, k] + a2[:, k])[:, None]
        response *= gain / (1 + a1[:, k, None] * z1 + a2[:, k, None] * z2)
    return response


def render_clip(speaker: Speaker, spec: ClipSpec, seed: int, sample_rate: int) -> np.ndarray:
    """One clip as float64 samples, before the actor-wide peak normalisation."""
    sr = sample_rate
    rng = np.random.default_rng([seed, spec.actor, 1 + spec.index])
    p = clip_prosody(speaker, spec, rng)
    rate = 2.0 ** p["rate"]
    track = _build_track(spec.statement, p, rate, rng)

    seg_len = np.asarray([max(int(round(d * sr)), 1) for d in track.durations])
    speech_len = int(seg_len.sum())
    lead = rng.uniform(0.35, 0.9)
    trail = rng.uniform(0.35, 1.0)
    total = speech_len / sr + lead + trail
    if total < _MIN_CLIP_S:
        trail += _MIN_CLIP_S - total + rng.uniform(0, 0.2)
    elif total > _MAX_CLIP_S:  # shrink both silences, keeping at least 0.2 s each
        room = max(_MAX_CLIP_S - speech_len / sr, 0.4)
        shrink = room / (lead + trail)
        lead, trail = max(lead * shrink, 0.2), max(trail * shrink, 0.2)
    start = int(lead * sr)
    n = start + speech_len + int(trail * sr)
    seg_start = start + np.concatenate([[0], np.cumsum(seg_len)[:-1]])

    # Per-sample control signals.
    voicing = np.zeros(n)
    amp = np.zeros(n)
    formant_track = np.full((n, 3), np.nan)
    for i, (s0, length) in enumerate(zip(seg_start, seg_len, strict=True)):
        voicing[s0 : s0 + length] = track.voicing[i]
        amp[s0 : s0 + length] = track.amp[i]
        if track.formants[i] is not None:
            formant_track[s0 : s0 + length] = track.formants[i]
    ramp = max(int(0.012 * sr), 1)
    voicing = _smooth(voicing, ramp)
    amp = _smooth(amp, ramp)

    # Consonants take the formants of the nearest vowel (coarticulation).
    known = ~np.isnan(formant_track[:, 0])
    idx = np.where(known, np.arange(n), -1)
    idx = np.maximum.accumulate(idx)
    first = int(np.argmax(known))
    idx[idx < 0] = first
    formant_track = formant_track[idx]
    formant_track = formant_track + p["undershoot"] * (_SCHWA - formant_track)
    formant_track *= speaker.formant_scale * 2.0 ** p["formant"]

    f0 = _f0_contour(speaker, p, track, seg_start, start, n, sr, rng)
    creak_from = (start + 0.7 * speech_len) / n
    excitation, flow = _glottal_source(f0, p, creak_from, sr, rng)
    excitation /= np.sqrt(np.mean(excitation[voicing > 0.5] ** 2)) + 1e-12
    aspiration = rng.normal(0, 1, n) * (0.25 + flow) * p["breath"] * 3.0
    source = (excitation + aspiration) * voicing * amp

    # Consonant noise, band-limited per segment so bursts stay sharp in time.
    frication = np.zeros(n)
    for i, (s0, length) in enumerate(zip(seg_start, seg_len, strict=True)):
        level, centre, bw = track.noise[i]
        if level <= 0:
            continue
        centre = min(centre, 0.42 * sr)
        burst = rng.normal(0, 1, length)
        spectrum = np.fft.rfft(burst)
        freqs = np.fft.rfftfreq(length, 1 / sr)
        spectrum *= np.exp(-0.5 * ((freqs - centre) / bw) ** 2)
        burst = np.fft.irfft(spectrum, n=length)
        burst /= np.sqrt(np.mean(burst**2)) + 1e-12
        taper = np.hanning(length) ** 0.5 if length > 2 else np.ones(length)
        if length < int(0.02 * sr):  # stop burst: sharp onset, fast decay
            taper = np.exp(-np.arange(length) / (0.3 * length))
        frication[s0 : s0 + length] += level * burst * taper

    # Vocal-tract filter and spectral tilt, frame by frame.
    n_fft = 1 << int(np.ceil(np.log2(0.032 * sr)))
    hop = n_fft // 4
    pad = n_fft
    padded = np.pad(source, (pad, pad + n_fft))
    spec_voice = _stft(padded, n_fft, hop)
    centres = np.clip(np.arange(len(spec_voice)) * hop + n_fft // 2 - pad, 0, n - 1)
    nyquist_cap = 0.45 * sr
    # Formants glide between targets over ~40 ms (coarticulation), smoothed at frame rate.
    glide = max(int(round(0.04 * sr / hop)), 1)
    f123 = np.stack([_smooth(col, glide) for col in formant_track[centres].T], axis=1)
    upper = np.array([[3500.0, 4500.0]]) * speaker.formant_scale
    formants = np.concatenate([f123, upper.repeat(len(centres), axis=0)], axis=1)
    formants = np.minimum(formants, nyquist_cap)
    breathy_widen = 1 + 2 * p["breath"]
    bandwidths = np.array([80.0 * breathy_widen, 100.0, 140.0, 220.0, 300.0])[None, :].repeat(
        len(centres), axis=0
    )
    freqs = np.fft.rfftfreq(n_fft, 1 / sr)
    response = _resonators(formants, bandwidths, freqs, sr)
    octaves = np.log2(np.maximum(freqs, 100.0) / 500.0)
    tilt = 10 ** (p["tilt"] * octaves / 20.0)
    lowpass = 1 / (1 + (freqs / nyquist_cap) ** 8)
    spec_fric = _stft(np.pad(frication, (pad, pad + n_fft)), n_fft, hop)
    fric_gain = 0.5 * 10 ** (max(p["tilt"], 0) / 40.0)
    channel = speaker.channel_gain(freqs)
    spec = (spec_voice * response * tilt + spec_fric * fric_gain) * (lowpass * channel)
    speech = _istft(spec, n_fft, hop, len(padded))[pad : pad + n]
    active = voicing > 0.5
    level = np.sqrt(np.mean(speech[active] ** 2)) + 1e-12
    return speech * (_SPEECH_RMS / level) * 10 ** (p["energy"] / 20.0)


def _room_noise(speaker: Speaker, spec: ClipSpec, seed: int, n: int) -> np.ndarray:
    """Quiet, slightly low-passed recording-room noise, same level for all of an actor."""
    rng = np.random.default_rng([seed, spec.actor, 1000 + spec.index])
    white = rng.normal(0, 1, n + 1)
    noise = 0.6 * white[1:] + 0.4 * white[:-1]
    noise /= np.sqrt(np.mean(noise**2)) + 1e-12
    return noise * 10 ** (speaker.room_noise_dbfs / 20)


def synthesize_actor(out: Path, actor: int, seed: int, sample_rate: int) -> list[Path]:
    """Render and write one actor's 60 clips, normalised together so loudness is a cue."""
    import soundfile as sf

    speaker = make_speaker(seed, actor)
    specs = clip_specs(actor)
    clips = [render_clip(speaker, spec, seed, sample_rate) for spec in specs]
    scale = _PEAK / max(float(np.abs(c).max()) for c in clips)
    folder = out / f"Actor_{actor:02d}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KndError(f"{folder}: cannot create directory ({exc.strerror})") from None
    paths = []
    for spec, clip in zip(specs, clips, strict=True):
        signal = clip * scale + _room_noise(speaker, spec, seed, len(clip))
        pcm = np.round(np.clip(signal, -_PEAK_LIMIT, _PEAK_LIMIT) * 32767).astype(np.int16)
        path = folder / spec.filename
        try:
            sf.write(path, pcm, sample_rate, subtype="PCM_16", format="WAV")
        except (OSError, RuntimeError) as exc:
            raise KndError(f"{path}: cannot write ({exc})") from None
        paths.append(path)
    return paths


def _run_actor(job: tuple[Path, int, int, int]) -> list[Path]:
    return synthesize_actor(*job)


def synthesize(
    out: Path,
    *,
    actors: int = 8,
    seed: int = 0,
    sample_rate: int = 16000,
    workers: int | None = None,
) -> list[Path]:
    """Write `actors` x 60 RAVDESS-named speech clips under `out`; return their sorted paths.

    `workers` defaults to up to 2 processes; the files are identical whatever it is.
    """
    out = Path(out)
    if not 1 <= actors <= MAX_ACTORS:
        raise UsageError(f"--actors must be between 1 and {MAX_ACTORS}, got {actors}")
    if seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {seed}")
    if not 8000 <= sample_rate <= 96000:
        raise UsageError(f"--sample-rate must be between 8000 and 96000 Hz, got {sample_rate}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    jobs = [(out, actor, seed, sample_rate) for actor in range(1, actors + 1)]
    if workers is None:
        workers = min(2, os.cpu_count() or 1, actors) if actors >= 3 else 1
    workers = max(1, min(workers, actors))
    results: Sequence[list[Path]]
    if workers == 1:
        results = [_run_actor(job) for job in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: safe whatever threads the caller (a CLI, pytest, a notebook) is running.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            results = list(pool.map(_run_actor, jobs))
    return sorted(path for paths in results for path in paths)
