"""The way in, through the installed `knd` entry point: usage errors, exit codes, guards.

Every command is run as a user runs it (a subprocess of the console script), because
exit codes and what reaches stderr are the behaviour under test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KND = Path(sys.executable).parent / "knd"  # the installed console script


def knd(*args: str | Path, cwd: Path = REPO, env: dict | None = None, timeout: float = 120):
    return subprocess.run(
        [KND, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def leaf_commands() -> list[list[str]]:
    """Every command path of the app (`data prepare`, `predict`, ...), read from the app."""
    import typer

    from kndcli.cli.main import app

    def walk(command, path):
        children = getattr(command, "commands", None)
        if children is None:
            return [path]
        return [p for name, sub in sorted(children.items()) for p in walk(sub, [*path, name])]

    return walk(typer.main.get_command(app), [])


def groups() -> list[list[str]]:
    paths = {tuple(p[:-1]) for p in leaf_commands() if len(p) > 1}
    return [list(p) for p in sorted(paths)]


def assert_usage_error(proc: subprocess.CompletedProcess, command: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: "), proc.stderr
    assert lines[-1].startswith(f"usage: {command}"), proc.stderr
    assert f"{command} --help" in lines[-1]
    assert len(lines) == 2, proc.stderr


def test_every_command_and_option_is_in_the_readme_table():
    import typer

    from kndcli.cli.main import app

    readme = (REPO / "README.md").read_text().splitlines()
    root = typer.main.get_command(app)
    config_trio = {"--config", "--set", "--print-config"}
    for path in leaf_commands():
        command = root
        for name in path:
            command = command.commands[name]
        row = next((line for line in readme if line.startswith(f"| `knd {' '.join(path)}` |")), "")
        assert row, f"README's command table lacks knd {' '.join(path)}"
        flags = {p.opts[0] for p in command.params if p.param_type_name == "option"} - {"--help"}
        if config_trio <= flags:
            assert "*config*" in row
            flags -= config_trio
        for flag in flags:
            assert f"`{flag}" in row, f"knd {' '.join(path)}: {flag} missing from README"


def test_a_flag_that_sets_a_key_sets_it_in_every_command_that_has_it():
    """`load` maps a flag to its key by name alone: a plain option of the same name in
    another command (invoke's old `--timeout`) would be written into that key."""
    import typer

    from kndcli.cli.main import app
    from kndcli.cli.options import FLAG_KEYS

    root = typer.main.get_command(app)
    for path in leaf_commands():
        command = root
        for name in path:
            command = command.commands[name]
        for param in command.params:
            key = FLAG_KEYS.get(param.opts[0]) if param.param_type_name == "option" else None
            if key is not None:
                assert f"(sets {key})" in (param.help or ""), (
                    f"knd {' '.join(path)} {param.opts[0]}: a plain option named like the "
                    f"flag that sets {key}"
                )


def test_cloud_invoke_max_time_is_its_own_option_not_the_jobs_timeout(tmp_path):
    clip = tmp_path / "a.wav"
    clip.write_bytes(b"RIFF")
    shown = knd("cloud", "invoke", "svc", clip, "--max-time", "0.5", "--print-config")
    assert shown.returncode == 0, shown.stderr
    assert "\n  timeout: 24h\n" in shown.stdout  # cloud.timeout untouched
    assert_usage_error(knd("cloud", "invoke", "svc", clip, "--max-time", "0"), "knd cloud invoke")


def test_demo_with_too_few_actors_is_a_usage_error(tmp_path):
    proc = knd("demo", "--actors", "2", "--out", tmp_path / "demo")
    assert_usage_error(proc, "knd demo")
    assert "--actors" in proc.stderr and not (tmp_path / "demo").exists()


def test_help_paragraphs_wrap_to_the_terminal_not_to_the_source():
    """Every paragraph of every command's help is one line of text, which the terminal
    wraps; a source line break would print mid-sentence (`knd evaluate --help` did)."""
    import typer

    from kndcli.cli.main import app

    root = typer.main.get_command(app)
    for path in leaf_commands():
        command = root
        for name in path:
            command = command.commands[name]
        for paragraph in (command.help or "").split("\n\n"):
            assert "\n" not in paragraph, f"knd {' '.join(path)}: {paragraph!r}"
    wide = knd("evaluate", "--help", env={**os.environ, "COLUMNS": "200"}).stdout
    assert "unless --prepared names another, and refuses a split the bundle" in wide


@pytest.mark.parametrize("path", leaf_commands(), ids=" ".join)
def test_unknown_option_is_a_usage_error_for_every_command(path):
    assert_usage_error(knd(*path, "--no-such-option"), "knd " + " ".join(path))


@pytest.mark.parametrize("path", [[], *groups()], ids=lambda p: " ".join(p) or "knd")
def test_a_group_alone_shows_its_help_and_exits_2(path):
    proc = knd(*path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "Commands" in proc.stdout + proc.stderr


def test_the_typos_of_the_issue_are_usage_errors(tiny_bundle, wav_factory):
    clip = wav_factory("c.wav", seconds=1.0)
    assert_usage_error(knd("trian"), "knd")
    assert_usage_error(knd("predict", "-m", tiny_bundle, "--jsn", clip), "knd predict")
    assert_usage_error(knd("predict", "-m", tiny_bundle), "knd predict")
    assert_usage_error(knd("data", "split-report", "--data", "X"), "knd data split-report")
    assert_usage_error(knd("cloud", "status", "knd", "--dry-run"), "knd cloud status")
    assert_usage_error(knd("evaluate", "-m", tiny_bundle, "--split", "tets"), "knd evaluate")
    positional = knd("train", "train.trainer.max_epochs=5")
    assert_usage_error(positional, "knd train")
    assert "--set KEY=VALUE" in positional.stderr


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["config", "show", "--set", "train.lr=fast"], "train.lr"),
        (["config", "show", "--set", "train.nope=1"], "train.nope"),
        (["train", "--set", "train.trainer.precision=fp64"], "train.trainer.precision"),
        (["train", "--set", "train.trim_method=silero"], "train.trim_method"),
        (["serve", "--port", "70000"], "serve.port"),
        (["predict", "--min-confidence", "1.5", "x.wav"], "inference.min_confidence"),
        (["config", "show", "--set", "cloud.memory=2GB"], "cloud.memory"),
        # Ranges the perturbation layer checks, refused before any work as well.
        (
            ["config", "show", "--set", "train.augment.conditions.noise_prob=2"],
            "train.augment.conditions.noise_prob",
        ),
        (["train", "--print-config", "--set", "robustness.rt60_s=[0.05]"], "robustness.rt60_s"),
        (["config", "show", "--set", "robustness.seed=-1"], "robustness.seed"),
        (["config", "show", "--set", "train.augment.gain_db=-3"], "train.augment.gain_db"),
        (["config", "show", "--set", "train.augment.speeds=[0.9,0]"], "train.augment.speeds"),
        # data: values judged before any clip is read (they used to fail mid-prepare, exit 3)
        (["data", "prepare", "--set", "data.store_dtype=float64"], "data.store_dtype"),
        (["data", "prepare", "--set", "data.split.val_fraction=-0.1"], "data.split.val_fraction"),
        (
            [
                "data",
                "prepare",
                "--set",
                "data.split.val_fraction=0.6",
                "--set",
                "data.split.test_fraction=0.4",
            ],
            "data.split.test_fraction",
        ),
    ],
)
def test_config_errors_name_the_key_and_exit_2(args, key):
    proc = knd(*args)
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_gpu_accelerator_without_a_gpu_is_a_config_error(synth_prepared, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: accelerator=gpu is valid here")
    proc = knd(
        "train", "--prepared", synth_prepared,
        "--set", "train.trainer.accelerator=gpu", "--set", f"train.output_dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "train.trainer.accelerator" in proc.stderr and "no CUDA GPU" in proc.stderr
    # torch's own reason, with the CUDA the wheel was built for (the driver it needs).
    assert "is built for CUDA" in proc.stderr or "without CUDA" in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing is written before the config is checked"


def test_a_training_lowpass_above_the_clips_nyquist_is_refused_before_writing(
    synth_prepared, tmp_path
):
    proc = knd(
        "train", "--prepared", synth_prepared, "--set", f"train.output_dir={tmp_path}",
        "--set", "train.augment.conditions.lowpass_hz=[2000,8000]",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "train.augment.conditions.lowpass_hz': 8000 Hz is not below 8000 Hz" in proc.stderr
    assert f"the prepared set {synth_prepared}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing is written before the config is checked"


def test_two_output_formats_and_unknown_formats_exit_2(tiny_bundle, wav_factory):
    clip = wav_factory("c.wav", seconds=1.0)
    both = knd("predict", "-m", tiny_bundle, "--json", "--csv", clip)
    assert both.returncode == 2 and "choose one of --json and --csv" in both.stderr
    tflite = knd("export", "-m", tiny_bundle, "--format", "tflite")
    assert tflite.returncode == 2 and "only onnx" in tflite.stderr


def test_a_missing_bundle_is_a_usage_error_not_a_verdict(tmp_path, wav_factory):
    clip = wav_factory("c.wav", seconds=1.0)
    for args in (
        ["predict", "-m", tmp_path / "nope", clip],
        ["drift", "check", "-m", tmp_path / "nope", "--audio", tmp_path],
        ["evaluate", "-m", tmp_path / "nope"],
    ):
        proc = knd(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert f"no bundle at {tmp_path / 'nope'}" in proc.stderr


def test_failed_files_are_the_commands_verdict_exit_1(tiny_bundle, wav_factory, tmp_path):
    good = wav_factory("good.wav", seconds=1.0)
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    proc = knd("predict", "-m", tiny_bundle, "--json", good, bad)
    assert proc.returncode == 1
    document = json.loads(proc.stdout)
    assert document["files"] == 2 and document["failed"] == 1
    assert [p.get("error") is None for p in document["predictions"]] == [True, False]


def test_predict_json_is_one_document_for_many_files(tiny_bundle, wav_factory):
    clips = [wav_factory(f"c{i}.wav", seconds=1.0 + i, freq=200 + 50 * i) for i in range(3)]
    document = json.loads(knd("predict", "-m", tiny_bundle, "--json", *clips).stdout)
    assert document["model"] == str(tiny_bundle)
    assert [Path(p["file"]).name for p in document["predictions"]] == [c.name for c in clips]
    lines = knd("predict", "-m", tiny_bundle, "--jsonl", *clips).stdout.splitlines()
    assert [json.loads(line) for line in lines] == document["predictions"]


def test_flags_are_config_keys_and_print_config_shows_them(tiny_bundle):
    proc = knd("serve", "-m", tiny_bundle, "--port", "9123", "--print-config")
    assert proc.returncode == 0
    assert "port: 9123" in proc.stdout and f"model: {tiny_bundle}" in proc.stdout
    same = knd("serve", "--set", "serve.port=9123", "--set", f"inference.model={tiny_bundle}",
               "--print-config")  # fmt: skip
    assert same.stdout == proc.stdout
    env = {**__import__("os").environ, "PORT": "7001", "KND_PROJECT": "proj"}
    from_env = knd("config", "show", env=env).stdout
    assert "port: 7001" in from_env and "project: proj" in from_env
    flag_wins = knd("serve", "--port", "7002", "--print-config", env=env).stdout
    assert "port: 7002" in flag_wins


def _bundle_trained_on(tiny_bundle: Path, prepared: Path, dest: Path, fit: list[str]) -> Path:
    """tiny_bundle with the `data` summary training writes: fitted on `fit` of `prepared`."""
    from kndcli.data.store import PreparedSet
    from kndcli.inference.bundle import DataSummary, update_bundle

    shutil.copytree(tiny_bundle, dest)
    ps = PreparedSet.open(prepared)
    summary = DataSummary(
        dataset="synth",
        prepared=str(prepared.resolve()),
        clips={s: len(ps.indices(s)) for s in ("train", "val", "test")},
        speakers=ps.info.get("speakers"),
        fit_splits=fit,
    )
    update_bundle(dest, {"data": asdict(summary)})
    return dest


def test_evaluate_scores_the_bundles_own_set_not_the_default(tiny_bundle, synth_prepared, tmp_path):
    bundle = _bundle_trained_on(tiny_bundle, synth_prepared, tmp_path / "b", ["train"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # no ./data/prepared here: the recorded set must be used
    proc = knd("evaluate", "-m", bundle, "--json", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    from kndcli.data.store import PreparedSet

    summary = json.loads(proc.stdout)
    assert summary["n_clips"] == len(PreparedSet.open(synth_prepared).indices("test"))
    assert (bundle / "eval" / "test_metrics.json").is_file()


def test_evaluate_refuses_splits_the_bundle_learned_from(tiny_bundle, synth_prepared, tmp_path):
    refit = _bundle_trained_on(tiny_bundle, synth_prepared, tmp_path / "r", ["train", "test"])
    for split in ("train", "test"):
        proc = knd("evaluate", "-m", refit, "--split", split)
        assert proc.returncode == 2, proc.stderr
        assert "not held out" in proc.stderr
    assert not (refit / "eval").exists()
    assert knd("evaluate", "-m", refit, "--split", "val", "--json").returncode == 0


def test_evaluate_on_another_set_keeps_the_bundles_eval(tiny_bundle, synth_prepared, tmp_path):
    bundle = _bundle_trained_on(tiny_bundle, synth_prepared, tmp_path / "b", ["train"])
    other = tmp_path / "other-set"
    shutil.copytree(synth_prepared, other)
    proc = knd("evaluate", "-m", bundle, "--prepared", other)
    assert proc.returncode == 0, proc.stderr
    assert "not " in proc.stderr and str(synth_prepared.resolve()) in proc.stderr
    assert (bundle / "eval-other-set").is_dir()
    assert not (bundle / "eval").exists()


def test_resume_of_a_finished_run_changes_nothing(tiny_bundle, tmp_path):
    run = tmp_path / "runs" / "done"
    shutil.copytree(tiny_bundle, run)
    (run / "config.yaml").write_text("train:\n  run_name: done\n")
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    proc = knd("train", "--resume", run)
    assert proc.returncode == 0, proc.stderr
    assert "finished" in proc.stderr and "nothing to resume" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_int8_export_is_kept_only_when_not_worse(tiny_bundle, synth_prepared, tmp_path):
    out = tmp_path / "int8"
    proc = knd(
        "export", "-m", tiny_bundle, "--quantize", "int8", "--prepared", synth_prepared,
        "--out", out, "--json", timeout=300,
    )  # fmt: skip
    report = json.loads(proc.stdout)
    assert {"accuracy_before", "accuracy_after", "ms_per_clip_before", "ms_per_clip_after"} <= set(
        report
    )
    assert report["kept"] == (not report["refused"])
    assert proc.returncode == (0 if report["kept"] else 1)
    assert out.is_dir() == report["kept"]
    forced = knd(
        "export", "-m", tiny_bundle, "--quantize", "int8", "--prepared", synth_prepared,
        "--out", out, "--force", "--json", timeout=300,
    )  # fmt: skip
    assert forced.returncode == 0 and out.is_dir()


def test_int8_judgement():
    from kndcli.training.export import _worse

    same = {"accuracy_before": 0.7, "accuracy_after": 0.7}
    assert _worse({**same, "ms_per_clip_before": 5.0, "ms_per_clip_after": 3.0}) == []
    slower = _worse({**same, "ms_per_clip_before": 5.6, "ms_per_clip_after": 30.0})
    assert slower and "slower" in slower[0]
    worse = {"accuracy_before": 0.775, "accuracy_after": 0.517}
    assert "25.8 points" in _worse({**worse, "ms_per_clip_before": 5, "ms_per_clip_after": 4})[0]


def test_int8_without_a_set_to_measure_on_is_refused(tiny_bundle, tmp_path):
    proc = knd("export", "-m", tiny_bundle, "--quantize", "int8", "--out", tmp_path / "q")
    assert proc.returncode == 2
    assert "--prepared" in proc.stderr and "--force" in proc.stderr
    assert not (tmp_path / "q").exists()


def test_predict_and_serve_agree_on_real_clips_under_one_config(
    tiny_bundle, ravdess_root, tmp_path
):
    """The same config file drives both: window, hop and min_confidence reach the
    service's scoring workers exactly as they reach `knd predict`, and both apply the
    bundle's temperature before the threshold."""
    import httpx
    from tests.conftest import free_port, ravdess_clips, wait_ready

    from kndcli.inference.bundle import update_bundle

    bundle = tmp_path / "calibrated"
    shutil.copytree(tiny_bundle, bundle)
    update_bundle(bundle, {"calibration": {"method": "temperature", "temperature": 0.5}})
    clips = ravdess_clips(ravdess_root, [1])[:3] + ravdess_clips(ravdess_root, [5])[:2]
    windows = ["--set", "inference.window_s=1.0", "--set", "inference.hop_s=0.5"]
    loose = knd("predict", "-m", bundle, "--json", *windows, *clips)
    confidences = sorted(p["confidence"] for p in json.loads(loose.stdout)["predictions"])
    assert confidences[1] < confidences[2], confidences
    threshold = (confidences[1] + confidences[2]) / 2  # two of the five answers fall below
    config = tmp_path / "same.yaml"
    config.write_text(
        f"inference:\n  model: {bundle}\n  window_s: 1.0\n  hop_s: 0.5\n"
        f"  min_confidence: {threshold}\n"
        f"serve:\n  scoring_processes: 1\n  log_sink: {tmp_path / 'log.sqlite'}\n"
    )
    predicted = json.loads(knd("predict", "-c", config, "--json", *clips).stdout)["predictions"]
    labels = [p["label"] for p in predicted]
    assert labels.count("uncertain") == 2, labels
    port = free_port()
    server = subprocess.Popen(
        [KND, "serve", "-c", config, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server)
        for clip, local in zip(clips, predicted, strict=True):
            with clip.open("rb") as handle:
                answer = httpx.post(
                    url + "/predict", files={"file": (clip.name, handle)}, timeout=30
                )
            assert answer.status_code == 200, answer.text
            served = answer.json()
            assert served["label"] == local["label"], clip
            for label, p in local["probabilities"].items():
                assert served["probabilities"][label] == pytest.approx(p, abs=1e-5)
    finally:
        server.terminate()
        err, _ = server.communicate(timeout=30)
    assert "model    tiny@" in err and "listen   http://127.0.0.1" in err  # startup lines


def test_tables_fit_80_columns_when_piped(drift_bundle, ravdess_root, synth_prepared, tmp_path):
    clips = ravdess_root / "Actor_02"
    bundle = _bundle_trained_on(drift_bundle, synth_prepared, tmp_path / "b", ["train"])
    outputs = {
        "drift": knd("drift", "check", "-m", drift_bundle, "--audio", clips),
        "predict": knd("predict", "-m", drift_bundle, *sorted(clips.iterdir())[:3]),
        "evaluate": knd("evaluate", "-m", bundle),
        "split-report": knd("data", "split-report", "--prepared", synth_prepared),
    }
    for name, proc in outputs.items():
        assert proc.returncode in (0, 1), (name, proc.stderr)
        assert proc.stdout.strip(), name
        for line in proc.stdout.splitlines():
            assert len(line.rstrip()) <= 80, (name, line)
        assert "…" not in proc.stdout, (name, proc.stdout)  # nothing cut short
    assert "duration_s" in outputs["drift"].stdout and " -> " in outputs["drift"].stdout


def test_a_corrupt_bundle_is_a_runtime_failure_exit_3(tiny_bundle, wav_factory, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    with (broken / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    proc = knd("predict", "-m", broken, wav_factory("c.wav", seconds=1.0))
    assert proc.returncode == 3, proc.stderr
    assert "does not match bundle.json" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["../secret.txt", "/etc/hostname", "link.txt"])
def test_a_bundle_listing_files_outside_itself_is_refused(tiny_bundle, wav_factory, tmp_path, name):
    """A bundle from someone else must not make knd hash (and quote) other files."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any bundle")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "link.txt").symlink_to(secret)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["files"][name] = "0" * 64
    (bundle / "bundle.json").write_text(json.dumps(meta))
    proc = knd("predict", "-m", bundle, wav_factory("c.wav", seconds=1.0))
    assert proc.returncode == 3, proc.stderr
    assert f"file '{name}' in 'files' points outside the bundle" in proc.stderr
    assert "sha256" not in proc.stderr


@pytest.mark.parametrize("metrics_need_token", [False, True])
def test_the_serve_banner_names_the_routes_a_token_does_not_guard(
    tiny_bundle, capsys, metrics_need_token
):
    from kndcli.cli.serve import _announce
    from kndcli.config import load_config
    from kndcli.inference.bundle import load_bundle
    from kndcli.serving.settings import ServeSettings

    cfg = load_config(overrides=[f"serve.metrics_need_token={metrics_need_token}"])
    settings = ServeSettings.from_config(cfg, tiny_bundle)
    settings.api_token = "t0k3n"
    _announce(settings, load_bundle(tiny_bundle))
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("token"))
    assert "required (KND_API_TOKEN), except on /health, /ready, /docs, /openapi.json" in line
    assert ("/metrics" in line) is not metrics_need_token
    assert "t0k3n" not in line
