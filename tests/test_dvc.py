"""DVC: the pipeline file, a push/pull round trip to a gs:// remote served by a local GCS
emulator on 127.0.0.1, and (slow) `dvc repro` on synthetic data."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "knd-test"


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    # Before gcsfs is imported in the dvc process, or every call stalls ~60 s.
    env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    env.update(extra or {})
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _repo(tmp_path: Path, env: dict[str, str]) -> Path:
    """A fresh git repository with knd's DVC files (config, data.dvc, dvc.yaml, ignores)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(["git", "init", "-q"], repo, env)
    for name in ("dvc.yaml", "data.dvc", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO / name, repo / name)
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    return repo


def test_pipeline_is_prepare_train_evaluate_with_config_params() -> None:
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = pipeline["stages"]
    assert list(stages) == ["prepare", "train", "evaluate"]
    assert "data/raw" in stages["prepare"]["deps"]
    assert stages["prepare"]["outs"] == ["data/prepared"]
    assert "data/prepared" in stages["train"]["deps"]
    assert "models/dvc" in stages["train"]["outs"]
    assert "models/dvc" in stages["evaluate"]["deps"]
    for name in ("prepare", "train"):
        assert {"configs/exp1.yaml": None} in stages[name]["params"]
        assert stages[name]["cmd"].startswith("knd ")
    tracked = yaml.safe_load((REPO / "data.dvc").read_text())
    assert tracked["outs"][0]["path"] == "data/raw"


def test_default_remote_is_gcs() -> None:
    out = _run([str(BIN / "dvc"), "remote", "list"], REPO, _env())
    name, url = out.split()[:2]
    assert url.startswith("gs://")
    default = _run([str(BIN / "dvc"), "remote", "default"], REPO, _env()).strip()
    assert default == name


@pytest.fixture
def gcs_emulator():
    port = free_port()
    server = subprocess.Popen(
        [
            str(BIN / "gcp-storage-emulator"),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
            "--default-bucket",
            BUCKET,
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        server.kill()
        pytest.fail("the GCS emulator did not start")
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=10)


@pytest.mark.slow
def test_push_and_pull_round_trip(tmp_path: Path, gcs_emulator: str) -> None:
    env = _env({"STORAGE_EMULATOR_HOST": gcs_emulator})
    repo = _repo(tmp_path, env)
    dvc = str(BIN / "dvc")
    # The bucket is configurable the way docs/cloud.md says.
    _run([dvc, "remote", "modify", "gcs", "url", f"gs://{BUCKET}/dvc"], repo, env)
    _run([dvc, "remote", "modify", "--local", "gcs", "endpointurl", gcs_emulator], repo, env)
    raw = repo / "data" / "raw"
    (raw / "Actor_01").mkdir(parents=True)
    files = {
        "Actor_01/03-01-01-01-01-01-01.wav": os.urandom(4096),
        "Actor_01/03-01-05-01-01-01-01.wav": os.urandom(1000),
        "notes.txt": b"synthetic\n",
    }
    for name, data in files.items():
        (raw / name).write_bytes(data)
    _run([dvc, "commit", "--force", "data.dvc"], repo, env)
    assert "md5" in (repo / "data.dvc").read_text()
    _run([dvc, "push", "data.dvc"], repo, env)

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(raw)
    _run([dvc, "pull", "data.dvc"], repo, env)
    for name, data in files.items():
        assert (raw / name).read_bytes() == data


def _tiny_config(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "data:\n  dataset: synth\n  split:\n    val_fraction: 0.25\n    test_fraction: 0.25\n"
        "model:\n  channels: 8\n"
        "train:\n  batch_size: 8\n  clip_seconds: 1.0\n"
        "  trainer:\n    max_epochs: 1\n    accelerator: cpu\n    devices: 1\n"
        "    limit_train_batches: 2\n    limit_val_batches: 1\n"
        "wandb:\n  enabled: false\n"
    )


@pytest.mark.slow
def test_repro_rebuilds_a_model_from_synthetic_data(tmp_path: Path) -> None:
    env = _env()
    probe = subprocess.run(
        [str(BIN / "knd"), "train", "--help"], env=env, capture_output=True, text=True
    )
    if probe.returncode != 0 or "not yet available" in probe.stdout + probe.stderr:
        pytest.skip("knd train is not available yet")
    repo = _repo(tmp_path, env)
    # The stages depend on the code that makes each output.
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    _tiny_config(repo / "configs" / "exp1.yaml")
    _run([str(BIN / "knd"), "data", "synth", "--out", "data/raw", "--actors", "4"], repo, env)
    _run([str(BIN / "dvc"), "commit", "--force", "data.dvc"], repo, env)
    _run([str(BIN / "dvc"), "repro"], repo, env)
    assert (repo / "data" / "prepared").is_dir()
    assert (repo / "models" / "dvc" / "bundle.json").is_file()
    assert (repo / "metrics" / "evaluate.json").read_text().strip().startswith("{")
    # Nothing changed: a second repro runs no stage.
    again = _run([str(BIN / "dvc"), "repro"], repo, env)
    assert "didn't change" in again or "up to date" in again
