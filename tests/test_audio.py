"""The one audio path: formats, channel counts, rates, and every kind of bad input."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile as sf
from tests.conftest import tone

from kndcli.audio import (
    FEATURE_NAMES,
    AudioError,
    audio_features,
    decode,
    find_audio_files,
    speech_bounds,
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


def test_decodes_mp3(wav_factory):
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile has no MP3 support")
    path = wav_factory("clip.mp3", seconds=1.0, rate=44100, fmt="MP3", subtype="MPEG_LAYER_III")
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


def test_too_long_by_header(wav_factory):
    path = wav_factory("long.wav", seconds=3.0)
    with pytest.raises(AudioError, match=r"too long: 3.0 s \(limit 2 s\)"):
        decode(path, max_duration_s=2.0)


def test_too_long_without_trustworthy_header(wav_factory):
    path = wav_factory("long.ogg", seconds=3.0, subtype="VORBIS")
    with pytest.raises(AudioError, match="too long"):
        decode(path, max_duration_s=2.0)


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
    with pytest.raises(AudioError, match="over the 0 MB limit"):
        decode(path, max_bytes=1000)


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
