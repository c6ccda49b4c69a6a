"""Degradations of real audio: noise, rooms, telephone lines, codecs, cheap microphones.

One library serves multi-condition training (`train.augment.conditions`) and the
robustness report (`knd evaluate --robustness`), so the model is measured under the same
families of degradation it learned from, at levels it did not. Every function takes mono
float32 samples and, where it draws anything, a numpy Generator: the same seed gives the
same audio. Only numpy, soxr and soundfile (already in the serving runtime) are needed,
plus pyroomacoustics for rooms.
"""

from kndcli.perturb.channel import apply_gain, band_limit, clip_peaks, lowpass, telephone
from kndcli.perturb.codec import codec_roundtrip
from kndcli.perturb.noise import BabbleSource, colored_noise, mix_at_snr, snr_db
from kndcli.perturb.room import RoomBank, reverberate, room_impulse_response

__all__ = [
    "BabbleSource",
    "RoomBank",
    "apply_gain",
    "band_limit",
    "clip_peaks",
    "codec_roundtrip",
    "colored_noise",
    "lowpass",
    "mix_at_snr",
    "reverberate",
    "room_impulse_response",
    "snr_db",
    "telephone",
]
