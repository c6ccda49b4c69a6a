"""Typed configuration: files, overrides, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kndcli.config import KndConfig, load_config
from kndcli.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_file_matches_schema():
    assert load_config([REPO / "configs" / "default.yaml"]) == KndConfig()
    # ... and lists every key, so it is the reference a user reads
    from kndcli.config import to_yaml

    listed = (REPO / "configs" / "default.yaml").read_text().split("\n", 3)[3]
    assert listed == to_yaml(KndConfig())


def test_experiment_configs_load():
    for name in ("exp1.yaml", "exp2.yaml", "release.yaml"):
        cfg = load_config([REPO / "configs" / name])
        assert isinstance(cfg, KndConfig)
    for name in ("ssl-frozen.yaml", "ssl-full.yaml"):
        with pytest.raises(ConfigError, match="model.encoder"):
            load_config([REPO / "configs" / name])  # the encoder is the user's to name
        cfg = load_config([REPO / "configs" / name], overrides=["model.encoder=/enc"])
        assert cfg.model.name == "ssl" and cfg.model.encoder == "/enc"


def test_later_files_and_overrides_win(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("train:\n  lr: 0.1\n  batch_size: 8\n")
    b.write_text("train:\n  lr: 0.2\n")
    cfg = load_config([a, b], ["train.batch_size=4", "data.split.test_speakers=[01,02]"])
    assert cfg.train.lr == 0.2
    assert cfg.train.batch_size == 4
    assert [int(s) for s in cfg.data.split.test_speakers] == [1, 2]


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.learning_rate'"):
        load_config([bad])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"key 'train.lr'.*'fast'"):
        load_config(overrides=["train.lr=fast"])


def test_missing_file():
    with pytest.raises(ConfigError, match="nothere.yaml: config file not found"):
        load_config(["nothere.yaml"])


def test_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: top level must be a mapping"):
        load_config([bad])


def test_override_without_equals():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(overrides=["train.lr"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.nope=1"], "unknown key 'train.nope'"),
        (["--set", "train.batch_size=big"], "key 'train.batch_size'"),
        (["--config", "missing.yaml"], "missing.yaml: config file not found"),
        (["--set", "data.workers=-1"], "key 'data.workers'"),
        (["--set", "train.num_workers=-2"], "key 'train.num_workers'"),
        (["--set", "audio.sample_rate=0"], "key 'audio.sample_rate'"),
        (["--set", "drift.p_value=5"], "key 'drift.p_value'"),
    ],
)
def test_cli_config_errors_are_one_line_exit_2(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "kndcli", "config", "show", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_config_cannot_copy_a_secret_from_the_environment(tmp_path):
    """A config file from someone else naming ${oc.env:KND_API_TOKEN} would print the
    token with the config and store it in run names: refused, with the variable named
    and its value nowhere; other variables still resolve."""
    foreign = tmp_path / "exp.yaml"
    foreign.write_text(
        "data:\n  raw: ${oc.env:DATA_ROOT}\ntrain:\n  run_name: r-${oc.env:KND_API_TOKEN}\n"
    )
    env = {**os.environ, "KND_API_TOKEN": "hunter2-secret", "DATA_ROOT": "/srv/audio"}
    show = [sys.executable, "-m", "kndcli", "config", "show", "--config", str(foreign)]
    proc = subprocess.run(show, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "key 'train.run_name'" in proc.stderr and "KND_API_TOKEN" in proc.stderr
    assert "looks like a secret" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout
    foreign.write_text("data:\n  raw: ${oc.env:DATA_ROOT}\n")
    proc = subprocess.run(show, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert proc.returncode == 0 and "raw: /srv/audio" in proc.stdout


def test_config_show_prints_resolved_yaml():
    proc = subprocess.run(
        [sys.executable, "-m", "kndcli", "config", "show", "--set", "train.lr=0.5"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "lr: 0.5" in proc.stdout
    assert "sample_rate: 16000" in proc.stdout


def test_split_fractions_are_judged_only_when_they_decide_the_split():
    """With speaker lists the fractions are unused, so leftover values that would leave no
    speaker to train on are no error; without lists they are."""
    lists = load_config(
        None,
        [
            "data.split.val_speakers=['01']",
            "data.split.val_fraction=0.7",
            "data.split.test_fraction=0.5",
        ],
    )
    assert lists.data.split.val_speakers == ["01"]
    with pytest.raises(ConfigError, match="data.split.test_fraction"):
        load_config(None, ["data.split.val_fraction=0.7", "data.split.test_fraction=0.5"])
