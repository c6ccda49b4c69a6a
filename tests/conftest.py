"""Shared fixtures: generated audio, the shared RAVDESS actors, a tiny model bundle."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

# Before any test can import gcsfs: see kndcli/__init__.py.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

REPO = Path(__file__).resolve().parents[1]
from bench.common import RAVDESS  # noqa: E402

SHARED_RAVDESS = RAVDESS  # bench.common finds it beside this or the origin checkout


@pytest.fixture(scope="session")
def ravdess_root() -> Path:
    """The real RAVDESS actors beside the checkout (read-only).

    Missing data fails the tests that need it: a skip would hide that they never ran.
    """
    if not SHARED_RAVDESS.is_dir():
        pytest.fail(f"shared RAVDESS data not found at {SHARED_RAVDESS}: clone beside shared/")
    return SHARED_RAVDESS


def tone(
    seconds: float = 1.0,
    rate: int = 16000,
    freq: float = 220.0,
    amp: float = 0.3,
    channels: int = 1,
) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


@pytest.fixture
def wav_factory(tmp_path: Path) -> Callable[..., Path]:
    """Write a real audio file: `wav_factory("a.wav", seconds=1, rate=8000, subtype="PCM_24")`."""

    def make(
        name: str = "clip.wav",
        *,
        seconds: float = 1.0,
        rate: int = 16000,
        freq: float = 220.0,
        amp: float = 0.3,
        channels: int = 1,
        subtype: str | None = None,
        fmt: str | None = None,
    ) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = tone(seconds, rate, freq, amp, channels)
        sf.write(path, data, rate, subtype=subtype, format=fmt)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained but complete bundle (ONNX, safetensors, reference): fast to build."""
    from bench.cases import untrained_bundle

    from kndcli.config import ModelConfig

    rng = np.random.default_rng(0)
    clips = [
        tone(2.0, freq=f) + 0.01 * rng.standard_normal(32000).astype(np.float32)
        for f in (150, 200, 250, 300)
    ]
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    return untrained_bundle(out, model=ModelConfig(channels=8), name="tiny", clips=clips)


@pytest.fixture(scope="session")
def ravdess_two_actors(ravdess_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Actors 01 (WAV, two stereo files) and 05 (FLAC, one stereo file), linked, not copied."""
    root = tmp_path_factory.mktemp("ravdess2")
    for actor in ("Actor_01", "Actor_05"):
        (root / actor).mkdir()
        for src in sorted((ravdess_root / actor).iterdir()):
            (root / actor / src.name).symlink_to(src)
    return root


@pytest.fixture(scope="session")
def synth_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four synthetic actors (240 clips), prepared: 2 train, 1 val, 1 test speaker."""
    from kndcli.config import load_config
    from kndcli.data.prepare import prepare_dataset
    from kndcli.datasets.synth import synthesize

    base = tmp_path_factory.mktemp("synth")
    synthesize(base / "raw", actors=4, seed=0)
    cfg = load_config(
        overrides=[
            "data.dataset=synth",
            f"data.raw={base / 'raw'}",
            f"data.prepared={base / 'prepared'}",
            "data.split.val_speakers=['02']",
            "data.split.test_speakers=['03']",
        ]
    )
    prepare_dataset(cfg)
    return base / "prepared"


def ravdess_clips(root: Path, actors: range | list[int]) -> list[Path]:
    """The speech clips of the given RAVDESS actors, sorted."""
    from kndcli.audio import find_audio_files

    return find_audio_files([root / f"Actor_{a:02d}" for a in actors])


@pytest.fixture(scope="session")
def drift_bundle(tiny_bundle: Path, ravdess_root: Path, tmp_path_factory) -> Path:
    """A copy of `tiny_bundle` whose reference is real speech: features of RAVDESS actors
    01-10 (train rows) and the model's predictions on actors 11-12 (val rows)."""
    import shutil

    from kndcli.audio import audio_features, decode
    from kndcli.inference.bundle import REFERENCE_FILE, update_bundle
    from kndcli.inference.predictor import Predictor
    from kndcli.monitoring.reference import build_reference

    root = tmp_path_factory.mktemp("drift") / "bundle"
    shutil.copytree(tiny_bundle, root)
    train = ravdess_clips(ravdess_root, range(1, 11))
    train_feats = [audio_features(decode(p)) for p in train]
    val = [
        p
        for p in Predictor.from_config(root).predict_paths(
            ravdess_clips(ravdess_root, [11, 12]), features=True
        )
        if p.ok
    ]
    reference = build_reference(
        train_feats,
        ["?"] * len(train_feats),
        [p.features for p in val],
        ["?"] * len(val),
        [p.label for p in val],
        [p.confidence for p in val],
    )
    reference.to_parquet(root / REFERENCE_FILE, index=False)
    update_bundle(root, {})  # re-hash: the reference file changed
    return root


def free_port() -> int:
    """A loopback port nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, proc, timeout: float = 60) -> None:
    """Until `knd serve` at `url` answers /ready; fail at once if the process exits."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"knd serve exited: {out}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("knd serve never became ready")


def stop_process(proc, grace_s: float = 30) -> None:
    """SIGTERM a server a test started, and SIGKILL it if it has not exited in `grace_s`."""
    import subprocess

    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def gcs_emulator(monkeypatch: pytest.MonkeyPatch, bucket: str) -> Iterator[str]:
    """gcp-storage-emulator in memory on a free loopback port, with one bucket; its URL.

    STORAGE_EMULATOR_HOST points gcsfs (and `knd` subprocesses) at it for the test.
    """
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
