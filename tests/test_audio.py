"""The one audio path: formats, channel counts, rates, and every kind of bad input."""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from tests.conftest import tone

from kndcli.audio import (
    FEATURE_NAMES,
    AudioError,
    _mp3_frame,
    audio_features,
    decode,
    find_audio_files,
    speech_bounds,
)
from kndcli.config import SOUNDFILE_FORMATS, AudioConfig, check_audio
from kndcli.errors import ConfigError

needs_mp3 = pytest.mark.skipif(
    "MP3" not in sf.available_formats(), reason="this libsndfile has no MP3 support"
)


@pytest.mark.parametrize(
    ("name", "subtype", "fmt"),
    [
        ("pcm8.wav", "PCM_U8", None),
        ("pcm16.wav", "PCM_16", None),
        ("pcm24.wav", "PCM_24", None),
        ("pcm32.wav", "PCM_32", None),
        ("float.wav", "FLOAT", None),
        ("clip.flac", "PCM_16", None),
        ("clip.ogg", "VORBIS", None),
        ("clip.rf64", "PCM_16", "RF64"),
        ("wavex.wav", "PCM_16", "WAVEX"),
    ],
)
def test_decodes_formats_to_mono_16k(wav_factory, name, subtype, fmt):
    path = wav_factory(name, seconds=1.0, rate=44100, subtype=subtype, fmt=fmt)
    audio = decode(path, sample_rate=16000)
    assert audio.samples.dtype == np.float32
    assert audio.samples.ndim == 1
    assert audio.sample_rate == 16000
    assert audio.orig_sample_rate == 44100
    assert abs(audio.duration - 1.0) < 0.01
    assert 0.2 < np.abs(audio.samples).max() < 0.35


@needs_mp3
@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (16000, 1), (44100, 1), (48000, 2)])
def test_decodes_mp3(wav_factory, rate, channels):
    """Every MPEG version (2.5, 2, 1), mono and stereo: the length check refuses none."""
    path = wav_factory(
        "clip.mp3", rate=rate, channels=channels, fmt="MP3", subtype="MPEG_LAYER_III"
    )
    audio = decode(path)
    assert abs(audio.duration - 1.0) < 0.1


@pytest.mark.parametrize("channels", [2, 6])
def test_downmixes_any_channel_count(wav_factory, channels):
    audio = decode(wav_factory("multi.wav", channels=channels, rate=48000))
    assert audio.channels == channels
    assert audio.samples.ndim == 1
    assert abs(np.abs(audio.samples).max() - 0.3) < 0.02


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 96000])
def test_resamples_any_rate(wav_factory, rate):
    audio = decode(wav_factory(f"r{rate}.wav", rate=rate, freq=440), sample_rate=16000)
    assert len(audio.samples) == pytest.approx(16000, abs=2)
    spectrum = np.abs(np.fft.rfft(audio.samples))
    assert abs(np.argmax(spectrum) * 16000 / len(audio.samples) - 440) < 3


def test_reads_bytes_and_file_objects(wav_factory):
    data = wav_factory("x.wav").read_bytes()
    assert decode(data, name="upload.wav").source == "upload.wav"
    assert abs(decode(io.BytesIO(data)).duration - 1.0) < 0.01


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav: empty file"):
        decode(path)


def test_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio at all " * 20)
    with pytest.raises(AudioError, match="notes.wav: not a readable audio file"):
        decode(path)


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        decode(tmp_path / "nope.wav")


def test_zero_frames(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="no audio frames"):
        decode(path)


def test_nan_samples(tmp_path):
    path = tmp_path / "nan.wav"
    data = tone(0.5)
    data[100] = np.nan
    sf.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinite"):
        decode(path)


def test_float_samples_far_past_full_scale_are_refused(tmp_path):
    """1e25 is finite but overflows the spectrogram into NaN probabilities; 3x full
    scale is a loud float file and is read."""
    loud, wrong = tmp_path / "loud.wav", tmp_path / "wrong.wav"
    sf.write(loud, tone(0.5) * 10, 16000, subtype="FLOAT")
    sf.write(wrong, tone(0.5) * 1e25, 16000, subtype="FLOAT")
    assert np.abs(decode(loud).samples).max() > 2.5
    with pytest.raises(AudioError, match=r"wrong.wav.*samples reach 3e\+24, over 1000 times"):
        decode(wrong)


def test_a_float_stream_far_past_full_scale_is_closed() -> None:
    from kndcli.serving.stream import CLOSE_BAD_DATA, StreamFormat, StreamRefused, StreamWindows

    windows = StreamWindows(StreamFormat(16000, "float32"), 1.0, 0.5)
    windows.feed((np.ones(800, "<f4") * 0.9).tobytes())
    with pytest.raises(StreamRefused) as refused:
        windows.feed((np.ones(800, "<f4") * 1e25).tobytes())
    assert refused.value.code == CLOSE_BAD_DATA and "full scale" in str(refused.value)


def test_too_long_by_header(wav_factory):
    path = wav_factory("long.wav", seconds=3.0)
    with pytest.raises(AudioError, match=r"too long: 3.0 s, over the 2 s limit \(audio\."):
        decode(path, audio=AudioConfig(max_duration_s=2.0))


def test_too_long_without_trustworthy_header(wav_factory):
    path = wav_factory("long.ogg", seconds=3.0, subtype="VORBIS")
    with pytest.raises(AudioError, match="too long"):
        decode(path, audio=AudioConfig(max_duration_s=2.0))


def test_header_that_lies_about_length(wav_factory):
    path = wav_factory("cut.wav", seconds=1.0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="cut.wav: header declares .*truncated"):
        decode(path)


def test_header_with_inflated_data_size(wav_factory):
    path = wav_factory("inflated.wav", seconds=0.5)
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    data[at + 4 : at + 8] = struct.pack("<I", 10_000_000)
    path.write_bytes(bytes(data))
    with pytest.raises(AudioError, match="truncated or corrupt"):
        decode(path)


def test_size_limit(wav_factory):
    path = wav_factory("big.wav", seconds=2.0)
    with pytest.raises(AudioError, match="over the 0.001 MB limit"):
        decode(path, audio=AudioConfig(max_file_mb=0.001))


def test_silent_clip_is_valid(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(16000, dtype=np.float32), 16000)
    audio = decode(path)
    feats = audio_features(audio)
    assert feats["silence_ratio"] == 1.0
    assert feats["peak"] == 0.0


def test_features_are_complete_and_sensible(wav_factory):
    audio = decode(wav_factory("a.wav", rate=48000, freq=200, amp=0.5, channels=2))
    feats = audio_features(audio)
    assert set(feats) == set(FEATURE_NAMES)
    assert all(isinstance(v, float) and np.isfinite(v) for v in feats.values())
    assert feats["sample_rate"] == 48000.0
    assert feats["channels"] == 2.0
    assert abs(feats["pitch_hz"] - 200) < 10
    assert abs(feats["rms_dbfs"] - 20 * np.log10(0.5 / np.sqrt(2))) < 0.5
    assert feats["band_0_300"] > 0.9


def test_clipping_is_measured_at_the_original_rate(tmp_path):
    path = tmp_path / "clipped.wav"
    sf.write(path, np.clip(tone(1.0, rate=48000, amp=3.0), -1, 1), 48000)
    feats = audio_features(decode(path))
    assert feats["clipping_ratio"] > 0.5
    assert feats["peak"] >= 0.999


def test_speech_bounds_trims_leading_and_trailing_silence():
    x = np.concatenate([np.zeros(16000), tone(1.0), np.zeros(8000)]).astype(np.float32)
    start, stop = speech_bounds(x, 16000, margin_s=0.0)
    assert abs(start - 16000) <= 320
    assert abs(stop - 32000) <= 320


def test_find_audio_files(tmp_path, wav_factory):
    wav_factory("a/one.wav")
    wav_factory("a/b/two.flac")
    (tmp_path / "a" / "readme.txt").write_text("x")
    found = find_audio_files([tmp_path / "a"])
    assert sorted(p.name for p in found) == ["one.wav", "two.flac"]
    assert found == sorted(found)
    assert [p.name for p in find_audio_files([str(tmp_path / "a" / "*.wav")])] == ["one.wav"]


# ----------------------------------------------------------------------------- cost bounds
# Each hostile file is built here, most by hand: the header is what the checks read.


def wav_header(rate: int, channels: int, frames: int, body: bool = True) -> bytes:
    """A 16-bit PCM WAV of silence whose header says `rate`, `channels` and `frames`."""
    align = 2 * channels
    size = frames * align
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * align, align, 16)
    riff = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", size)
    return b"RIFF" + struct.pack("<I", len(riff) + size) + riff + bytes(size if body else 0)


def flac_declaring(rate: int, channels: int, seconds: float, real_frames: int) -> bytes:
    """A FLAC holding `real_frames` of silence whose STREAMINFO claims `seconds`."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros((real_frames, channels), np.int16), rate, format="FLAC")
    data = buf.getvalue()
    # STREAMINFO starts at byte 8; its 36-bit total sample count ends at byte 26.
    packed = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1) | int(seconds * rate)
    return data[:18] + packed.to_bytes(8, "big") + data[26:]


def refused(data: bytes, match: str, audio: AudioConfig | None = None) -> float:
    """Assert `decode` refuses `data` with `match`; the seconds the refusal took."""
    start = time.perf_counter()
    with pytest.raises(AudioError, match=match):
        decode(data, name="hostile", audio=audio)
    return time.perf_counter() - start


def test_655khz_8_channel_flac_is_refused_before_decoding():
    """The issue's 343 KB FLAC (60 s, 8 channels at 655 kHz: 2.3 s of worker CPU)."""
    data = flac_declaring(655000, 8, 60.0, real_frames=65536)
    seconds = refused(data, r"sample rate 655000 Hz is above the 192000 Hz maximum")
    assert seconds < 0.05
    # Allowed that rate, the samples limit still refuses it from the header.
    wide = AudioConfig(max_sample_rate=700_000)
    match = r"314,400,000 samples \(39,300,000 frames x 8 channels\), over the 23,040,000"
    assert refused(data, match, wide) < 0.05


def test_1hz_wav_is_refused():
    """164 bytes that counted as 60 s of audio (and 133 MiB of resampler)."""
    data = wav_header(1, 1, 60)
    assert len(data) == 164
    refused(data, r"sample rate 1 Hz is below the 4000 Hz minimum \(audio.min_sample_rate\)")


def test_telephone_rate_is_the_kind_of_low_rate_that_passes():
    assert decode(wav_header(8000, 1, 8000)).orig_sample_rate == 8000


def test_1024_channel_wav_is_refused():
    refused(wav_header(16000, 1024, 60), r"1024 channels, more than the 8 allowed")


def test_samples_limit_is_checked_from_an_exact_header(wav_factory):
    data = wav_factory("st.wav", seconds=1.0, channels=2).read_bytes()
    refused(data, r"32,000 samples .* over the 10,000 limit", AudioConfig(max_samples=10_000))


def test_samples_limit_bounds_the_read_where_the_header_only_estimates(wav_factory):
    """OGG's length is not trusted from the header; the block loop stops at the limit."""
    path = wav_factory("st.ogg", seconds=3.0, rate=48000, channels=2, subtype="VORBIS")
    with pytest.raises(AudioError, match=r"more than 100,000 samples at 2 channels"):
        decode(path, audio=AudioConfig(max_samples=100_000))


def test_rf64_whose_ds64_claims_2_to_the_40_frames_is_refused(wav_factory):
    data = bytearray(wav_factory("big.rf64", seconds=0.1, fmt="RF64").read_bytes())
    at = data.index(b"ds64") + 8  # RIFF size, data size, sample count: 64-bit each
    data[at + 8 : at + 24] = struct.pack("<QQ", 2**41, 2**40)
    start = time.perf_counter()
    with pytest.raises(
        AudioError, match=r"declares 2199023255552 bytes .* only 3200 \(truncated or corrupt\)"
    ):
        decode(bytes(data))
    assert time.perf_counter() - start < 0.05


def test_truncated_rf64_is_refused(wav_factory):
    data = wav_factory("cut.rf64", seconds=1.0, fmt="RF64").read_bytes()
    refused(data[: len(data) // 2], r"header declares 32000 bytes .* \(truncated or corrupt\)")


@pytest.mark.parametrize("fmt", ["AIFF", "AU", "W64", "CAF", "NIST"])
def test_formats_outside_the_allowlist_are_refused(wav_factory, fmt):
    data = wav_factory(f"clip.{fmt.lower()}", fmt=fmt, subtype="PCM_16").read_bytes()
    refused(data, rf"{fmt} \(PCM_16\) audio is not accepted; accepted formats: WAV, .*formats")
    allowed = AudioConfig(formats=[*AudioConfig().formats, fmt])
    assert decode(data, audio=allowed).channels == 1


def test_ogg_codecs_are_allowed_one_by_one(wav_factory):
    data = wav_factory("clip.opus", fmt="OGG", subtype="OPUS").read_bytes()
    refused(data, r"OGG \(OPUS\) audio is not accepted", AudioConfig(formats=["OGG/VORBIS"]))
    assert decode(data, audio=AudioConfig(formats=["OGG"])).channels == 1


def test_flac_whose_streaminfo_exceeds_what_decodes_is_refused():
    data = flac_declaring(16000, 1, 2.0, real_frames=16000)
    refused(data, r"stream breaks off before its declared 2.00 s .*: truncated or corrupt")


def test_flac_cut_mid_frame_is_refused(wav_factory):
    path = wav_factory("cut.flac", seconds=2.0, rate=48000, channels=2)
    data = path.read_bytes()
    refused(
        data[: len(data) // 2], r"breaks off before its declared 2.00 s \(flac decoder lost sync.\)"
    )


@pytest.fixture
def mp3(wav_factory) -> bytes:
    """Three seconds of 44.1 kHz MP3 as libsndfile writes it: a Xing header, then frames."""
    path = wav_factory("clip.mp3", seconds=3.0, rate=44100, fmt="MP3", subtype="MPEG_LAYER_III")
    return path.read_bytes()


def mp3_frame_starts(data: bytes) -> list[int]:
    starts = [0]
    while (frame := _mp3_frame(data[starts[-1] : starts[-1] + 4])) is not None:
        starts.append(starts[-1] + frame.length)
    assert starts[-1] == len(data)
    return starts[:-1]


@needs_mp3
def test_mp3_cut_mid_frame_is_refused_before_decoding(mp3):
    starts = mp3_frame_starts(mp3)
    middle = len(starts) // 2
    half = (starts[middle + 1] - starts[middle]) // 2
    needs = f"({2 * half}|{2 * half + 1})"
    match = rf"MP3 stream stops mid-frame: its last frame needs {needs} bytes, .* {half} "
    refused(mp3[: starts[middle] + half], match)
    refused(mp3[: starts[-3] + 2], r"MP3 stream stops inside a frame header")


@needs_mp3
def test_mp3_cut_between_frames_decodes_short_of_its_xing_header(mp3):
    cut = mp3_frame_starts(mp3)[60]
    refused(mp3[:cut], r"header declares 132300 frames but only \d+ could be read \(truncated\)")


@needs_mp3
def test_mp3_without_a_length_header_is_not_judged_by_its_estimate(mp3):
    """Without Xing/Info/VBRI libsndfile's length is an estimate; no false truncation."""
    first = _mp3_frame(mp3[:4])
    assert first is not None
    bare = mp3[first.length :]
    assert b"Xing" not in bare[:64]
    assert decode(bare, name="bare.mp3").duration > 0


def test_real_ravdess_clips_still_decode(ravdess_root: Path):
    """Three clips per actor, and every stereo one: all pass the default limits."""
    sample: list[Path] = []
    for actor in sorted(ravdess_root.glob("Actor_*")):
        files = find_audio_files([actor])
        sample += files[:3] + [p for p in files[3:] if sf.info(str(p)).channels > 1]
    assert len({sf.info(str(p)).channels for p in sample}) == 2  # mono and stereo
    for path in sample:
        audio = decode(path)
        assert audio.orig_sample_rate == 48000
        assert audio.duration > 1.0


def test_audio_formats_cover_libsndfile():
    """`audio.formats` entries are checked against this list, without importing soundfile."""
    assert set(sf.available_formats()) <= set(SOUNDFILE_FORMATS)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_duration_s", 0.0),
        ("max_file_mb", -1.0),
        ("min_sample_rate", 0),
        ("max_sample_rate", 3000),
        ("max_channels", 0),
        ("max_channels", 2048),
        ("max_samples", 4),
        ("formats", []),
        ("formats", ["WAV", "wav"]),
        ("formats", ["MPEG"]),
        ("formats", ["OGG/"]),
        ("sample_rate", 0),
        ("sample_rate", 1600),  # a typo for 16000: below audio.min_sample_rate
    ],
)
def test_audio_limits_are_checked_by_key(key, value):
    with pytest.raises(ConfigError, match=rf"key 'audio.{key}'"):
        check_audio(AudioConfig(**{key: value}))


def test_default_audio_limits_are_valid():
    check_audio(AudioConfig())
