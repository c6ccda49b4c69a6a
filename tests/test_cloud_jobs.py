"""`knd cloud submit` / `status` for Vertex AI: the real JobServiceClient (REST) against a
loopback fake that records what it sends."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gcp_fake import FakeGoogle, error_body
from kndcli.cli import options as opt
from kndcli.cli.cloud import Project, forwarded_overrides
from kndcli.cli.main import app
from kndcli.cloud import jobs
from kndcli.config import CloudConfig, load_config, parse_duration
from kndcli.errors import ConfigError, KndError, UsageError

JOBS = r"/v1/projects/p1/locations/europe-west4/customJobs"
JOB = r"/v1/projects/p1/locations/europe-west4/customJobs/(\d+)"
JOB_NAME = "projects/p1/locations/europe-west4/customJobs/4242"
BASE_ARGS = ["cloud", "submit", "--project", "p1", "--region", "europe-west4", "--bucket", "kb"]
RUN_SET = re.compile(r"train\.run_name=(\w[\w-]*)-\d{8}-\d{6}$")


def without_run(args: list[str]) -> list[str]:
    """Container args less the per-submission `--set train.run_name=<run>-<time>` at the end."""
    assert args[-2] == "--set" and RUN_SET.match(args[-1]), args
    return args[:-2]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    server = FakeGoogle().start()
    monkeypatch.setenv("KND_VERTEX_ENDPOINT", server.endpoint)
    for name in ("KND_PROJECT", "KND_REGION"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.stop()


def _job(state: str, **extra) -> dict:
    return {
        "name": JOB_NAME,
        "displayName": "knd-train",
        "state": state,
        "createTime": "2025-01-01T10:00:00Z",
        **extra,
    }


def _enum(enum: type, value: int | str) -> str:
    """The REST transport sends enums as numbers (enum-encoding=int); name them."""
    return enum(value).name if isinstance(value, int) else value


def _accelerator(value: int | str) -> str:
    from google.cloud import aiplatform_v1

    return _enum(aiplatform_v1.AcceleratorType, value)


def _strategy(value: int | str) -> str:
    from google.cloud import aiplatform_v1

    return _enum(aiplatform_v1.Scheduling.Strategy, value)


def _vertex_refuses(job: dict) -> str | None:
    """The fake's own reading of Vertex AI's machine rules (not knd's table): why a job
    would be refused, or None."""
    for pool in job["jobSpec"]["workerPoolSpecs"]:
        spec = pool["machineSpec"]
        machine = spec["machineType"]
        gpu = _accelerator(spec["acceleratorType"]) if "acceleratorType" in spec else ""
        count = int(spec.get("acceleratorCount", 0))
        family, _, size = machine.rpartition("-")
        if family == "g2-standard":
            wanted = ("NVIDIA_L4", {"24": 2, "48": 4, "96": 8}.get(size, 1))
        elif family in ("a2-highgpu", "a2-megagpu"):
            wanted = ("NVIDIA_TESLA_A100", int(size.rstrip("g")))
        elif family.startswith("n1-"):
            ok = not gpu or (gpu.startswith("NVIDIA_TESLA_") and count in (1, 2, 4, 8))
            wanted = (gpu, count) if ok else ("", -1)
        else:
            wanted = ("", 0)
        if (gpu, count) != wanted:
            return f"machine type {machine} does not support {count} x {gpu or 'no GPU'}"
    return None


def _created(fake: FakeGoogle) -> None:
    def create(request, _match):
        refused = _vertex_refuses(request.body)
        if refused:
            return 400, error_body(400, refused)
        return 200, {**request.body, **_job("JOB_STATE_PENDING")}

    fake.route("POST", JOBS, create)


def _states(fake: FakeGoogle, states: list[str], **final) -> None:
    """GET answers each state in turn, then the last one (with `final` fields) forever."""
    seen = iter(states[:-1])

    def answer(_r, _m):
        state = next(seen, None)
        return 200, _job(state) if state else _job(states[-1], **final)

    fake.route("GET", JOB, answer)


def test_submit_sends_the_custom_job(fake: FakeGoogle, tmp_path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("train:\n  run_name: exp\ncloud:\n  train_image: ignored-by-flag\n")
    _created(fake)
    args = [
        *BASE_ARGS,
        "--config",
        str(cfg),
        "--train-image",
        "europe-docker.pkg.dev/p1/knd/train:abc",
        "--machine",
        "g2-standard-24",
        "--accelerator",
        "NVIDIA_L4",
        "--accelerator-count",
        "2",
        "--replicas",
        "3",
        "--spot",
        "--timeout",
        "6h",
        "--service-account",
        "trainer@p1.iam.gserviceaccount.com",
        "--base-output-dir",
        "gs://bucket/runs/exp",
        "--label",
        "team=speech",
        "--env",
        "WANDB_MODE=offline",
        "--set",
        "train.trainer.max_epochs=5",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert JOB_NAME in result.output
    [call] = fake.calls("POST", JOBS)
    spec = call.body["jobSpec"]
    primary, workers = spec["workerPoolSpecs"]
    machine = primary["machineSpec"]
    assert machine["machineType"] == "g2-standard-24"
    assert _accelerator(machine["acceleratorType"]) == "NVIDIA_L4"
    assert machine["acceleratorCount"] == 2
    assert workers["machineSpec"] == machine
    assert int(primary["replicaCount"]) == 1
    assert int(workers["replicaCount"]) == 2
    container = primary["containerSpec"]
    assert container["imageUri"] == "europe-docker.pkg.dev/p1/knd/train:abc"
    assert without_run(container["args"]) == [
        "train",
        "--config",
        str(cfg),
        "--set",
        "train.trainer.max_epochs=5",
        "--set",
        "train.trainer.num_nodes=3",
        "--set",
        "train.trainer.accelerator=gpu",  # fail at once if CUDA cannot start, never CPU
    ]
    assert container["env"] == [{"name": "WANDB_MODE", "value": "offline"}]
    assert workers["containerSpec"] == container
    assert _strategy(spec["scheduling"]["strategy"]) == "SPOT"
    assert spec["scheduling"]["timeout"] == "21600s"
    assert spec["scheduling"]["restartJobOnWorkerRestart"] is True
    assert spec["serviceAccount"] == "trainer@p1.iam.gserviceaccount.com"
    # The job's own directory under the root given: no other job shares its checkpoints.
    home = spec["baseOutputDirectory"]["outputUriPrefix"]
    run = container["args"][-1].removeprefix("train.run_name=")
    assert home == f"gs://bucket/runs/exp/{run}" and run.startswith("exp-")  # run_name exp
    assert f"model: {home}/model/" in result.output
    assert call.body["labels"] == {"created-by": "knd", "team": "speech"}
    assert call.body["displayName"].startswith("knd-train-exp-")


def test_single_node_on_demand_has_one_pool_and_no_strategy(fake: FakeGoogle) -> None:
    _created(fake)
    result = CliRunner().invoke(app, [*BASE_ARGS, "--train-image", "img"])
    assert result.exit_code == 0, result.output
    [call] = fake.calls("POST", JOBS)
    spec = call.body["jobSpec"]
    [pool] = spec["workerPoolSpecs"]
    assert pool["machineSpec"] == {"machineType": "n1-highcpu-32"}
    assert without_run(pool["containerSpec"]["args"]) == ["train"]
    assert spec["baseOutputDirectory"]["outputUriPrefix"].startswith("gs://kb/runs/run-")
    assert "strategy" not in spec["scheduling"]
    assert spec["scheduling"]["timeout"] == "86400s"


def test_defaults_come_from_config_and_environment(fake: FakeGoogle, tmp_path, monkeypatch):
    cfg = tmp_path / "cloud.yaml"
    cfg.write_text(
        "cloud:\n  project: from-config\n  train_image: img:cfg\n  machine: a2-highgpu-1g\n"
        "  accelerator: NVIDIA_TESLA_A100\n  accelerator_count: 1\n  spot: true\n"
        "  bucket: gs://from-config/\n"
    )
    monkeypatch.setenv("KND_PROJECT", "p1")
    monkeypatch.setenv("KND_REGION", "europe-west4")
    _created(fake)
    result = CliRunner().invoke(app, ["cloud", "submit", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    [call] = fake.calls("POST", JOBS)  # the project and region from the environment won
    pool = call.body["jobSpec"]["workerPoolSpecs"][0]
    assert pool["containerSpec"]["imageUri"] == "img:cfg"
    assert _accelerator(pool["machineSpec"]["acceleratorType"]) == "NVIDIA_TESLA_A100"
    assert _strategy(call.body["jobSpec"]["scheduling"]["strategy"]) == "SPOT"
    home = call.body["jobSpec"]["baseOutputDirectory"]["outputUriPrefix"]
    assert re.fullmatch(r"gs://from-config/runs/run-\d{8}-\d{6}", home)


def test_dry_run_prints_the_request_and_calls_nothing(fake: FakeGoogle) -> None:
    args = [*BASE_ARGS, "--train-image", "img", "--spot", "--replicas", "2", "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    request = json.loads(result.output)
    assert request["parent"] == "projects/p1/locations/europe-west4"
    assert request["customJob"]["jobSpec"]["scheduling"]["strategy"] == "SPOT"
    assert len(request["customJob"]["jobSpec"]["workerPoolSpecs"]) == 2
    assert fake.requests == []


def test_wait_polls_until_the_job_ends(fake: FakeGoogle) -> None:
    _created(fake)
    _states(fake, ["JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"])
    result = CliRunner().invoke(
        app, [*BASE_ARGS, "--train-image", "img", "--wait", "--poll", "0.01"]
    )
    assert result.exit_code == 0, result.output
    assert len(fake.calls("GET", JOB)) == 3
    assert "JOB_STATE_RUNNING" in result.output
    assert "JOB_STATE_SUCCEEDED" in result.output


def test_wait_reports_a_failed_job(fake: FakeGoogle) -> None:
    _created(fake)
    _states(fake, ["JOB_STATE_FAILED"], error={"code": 13, "message": "CUDA out of memory"})
    result = CliRunner().invoke(
        app, [*BASE_ARGS, "--train-image", "img", "--wait", "--poll", "0.01"]
    )
    assert isinstance(result.exception, KndError)
    assert result.exception.exit_code == 3
    assert "JOB_STATE_FAILED" in str(result.exception)
    assert "CUDA out of memory" in str(result.exception)


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (403, "permission denied (403)"),
        (404, "not found (404)"),
        (429, "quota exceeded (429)"),
        (401, "not authenticated (401)"),
    ],
)
def test_google_errors_become_one_line(fake: FakeGoogle, code: int, words: str) -> None:
    fake.reply("POST", JOBS, code, error_body(code, "the fake says no"))
    result = CliRunner().invoke(app, [*BASE_ARGS, "--train-image", "img"])
    assert result.exception.exit_code == 3
    message = str(result.exception)
    assert words in message
    if code != 401:  # a 401 ends in the client's failed credential refresh, not the body
        assert "the fake says no" in message
    assert "\n" not in message


def test_error_through_the_entry_point_is_one_line(fake: FakeGoogle) -> None:
    fake.reply("POST", JOBS, 429, error_body(429, "Quota exceeded for NVIDIA_L4"))
    env = {**os.environ, "KND_VERTEX_ENDPOINT": fake.endpoint}
    knd = Path(sys.executable).parent / "knd"
    proc = subprocess.run(
        [str(knd), *BASE_ARGS, "--train-image", "img"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "quota exceeded (429)" in proc.stderr


def test_status_of_a_job(fake: FakeGoogle) -> None:
    _states(fake, ["JOB_STATE_RUNNING"])
    result = CliRunner().invoke(
        app, ["cloud", "status", JOB_NAME, "--project", "p1", "--region", "us-east1", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["state"] == "JOB_STATE_RUNNING"
    assert summary["create_time"].startswith("2025-01-01T10:00:00")
    assert fake.calls("GET", JOB)


def test_status_of_a_bare_job_id(fake: FakeGoogle) -> None:
    _states(fake, ["JOB_STATE_QUEUED"])
    args = ["cloud", "status", "4242", "--project", "p1", "--region", "europe-west4", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["state"] == "JOB_STATE_QUEUED"


def test_dry_run_forwards_config_files_and_sets(fake: FakeGoogle, tmp_path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("train:\n  trainer:\n    max_epochs: 3\n")
    args = [
        *BASE_ARGS,
        "--train-image",
        "img",
        "--replicas",
        "2",
        "-c",
        str(cfg),
        "--set",
        "train.trainer.num_nodes=2",
        "--set",
        "data.prepared=gs://b/prepared",
        "--dry-run",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    pools = json.loads(result.output)["customJob"]["jobSpec"]["workerPoolSpecs"]
    # The user's num_nodes is not said twice; the remote run gets the same files and sets.
    assert without_run(pools[0]["containerSpec"]["args"]) == [
        "train",
        "--config",
        str(cfg),
        "--set",
        "train.trainer.num_nodes=2",
        "--set",
        "data.prepared=gs://b/prepared",
    ]
    assert pools[1]["containerSpec"]["args"] == pools[0]["containerSpec"]["args"]
    assert fake.requests == []


def test_keyed_flags_outside_cloud_are_forwarded_as_sets() -> None:
    """A flag that sets a non-cloud key reaches the remote `knd train` as --set."""
    seen: list[list[str]] = []
    probe = typer.Typer()

    @probe.command()
    def run(
        ctx: typer.Context,
        project: Project = None,
        prepared: opt.Prepared = None,
        sets: opt.Sets = None,
    ) -> None:
        seen.append(forwarded_overrides(ctx))

    args = ["--project", "p1", "--prepared", "gs://b/set", "--set", "train.seed=7"]
    result = CliRunner().invoke(probe, args)
    assert result.exit_code == 0, result.output
    assert seen == [["train.seed=7", "data.prepared=gs://b/set"]]


def test_print_config_shows_what_the_job_would_use(fake: FakeGoogle) -> None:
    args = [*BASE_ARGS, "--machine", "g2-standard-8", "--spot", "--print-config"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "machine: g2-standard-8" in result.output
    assert "spot: true" in result.output
    assert "project: p1" in result.output
    assert fake.requests == []


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (["--timeout", "12hours"], "cloud.timeout"),
        (["--replicas", "0"], "cloud.replicas"),
        (["--accelerator-count", "-1"], "cloud.accelerator_count"),
        (["--accelerator", "NVIDIA_FOO"], "cloud.accelerator"),
        (["--accelerator", "nvidia-l4"], "cloud.accelerator"),
        (["--accelerator-count", "2"], "cloud.accelerator_count"),
        (["--base-output-dir", "/local/runs"], "cloud.base_output_dir"),
        (["--set", "cloud.machin=x"], "cloud.machin"),
    ],
)
def test_bad_cloud_values_are_usage_errors_naming_the_key(
    fake: FakeGoogle, flags: list[str], key: str
) -> None:
    result = CliRunner().invoke(app, [*BASE_ARGS, "--train-image", "img", *flags, "--dry-run"])
    assert isinstance(result.exception, ConfigError), result.output
    assert result.exception.exit_code == 2
    assert key in str(result.exception)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--label", "team"], "--label 'team' is not of the form KEY=VALUE"),
        (["--label", "Team=x"], "--label Team"),
        (["--env", "=x"], "--env '=x'"),
        (["--env", "1BAD=x"], "--env '1BAD'"),
    ],
)
def test_bad_labels_and_env_are_usage_errors(
    fake: FakeGoogle, flags: list[str], words: str
) -> None:
    result = CliRunner().invoke(app, [*BASE_ARGS, "--train-image", "img", *flags])
    assert isinstance(result.exception, UsageError), result.output
    assert result.exception.exit_code == 2
    assert words in str(result.exception)
    assert fake.requests == []


BAD_TIMEOUT = ["--timeout", "12hours", "--dry-run"]


def test_usage_error_through_the_entry_point_is_exit_2() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KND_PROJECT", "KND_REGION")}
    proc = subprocess.run(
        [sys.executable, "-m", "kndcli", *BASE_ARGS, "--train-image", "img", *BAD_TIMEOUT],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "cloud.timeout" in proc.stderr and "12hours" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"train_image": ""}, "no training image"),
        ({"project": ""}, "no Google Cloud project"),
        ({"region": ""}, "no region"),
        ({"accelerator_count": 2}, "needs cloud.accelerator"),
        ({"base_output_dir": "/local"}, "gs://"),
        ({"timeout": "soon"}, "cloud.timeout"),
        ({"bucket": ""}, "no place for the trained model"),
    ],
)
def test_bad_options_name_the_problem(change: dict, words: str) -> None:
    fine = {"project": "p", "region": "r", "train_image": "img", "bucket": "b"}
    cloud = CloudConfig(**{**fine, **change})
    opts = jobs.JobOptions(cloud=cloud, display_name="d")
    with pytest.raises(ConfigError, match=words):
        jobs.build_custom_job(opts)


def test_missing_project_through_the_cli_is_exit_2(fake: FakeGoogle) -> None:
    result = CliRunner().invoke(app, ["cloud", "submit", "--train-image", "img"])
    assert isinstance(result.exception, ConfigError)
    assert "--project" in str(result.exception)


def test_durations() -> None:
    assert parse_duration("90m") == 5400
    assert parse_duration("2d") == 172800
    assert parse_duration("3600") == 3600
    with pytest.raises(ConfigError, match="cloud.timeout"):
        parse_duration("12hours")


# ----------------------------------------------------------------------------- secrets

SECRET_VERSION = r"/v1/projects/p1/secrets/wandb-key/versions/(latest|\d+)"


@pytest.fixture
def secrets_fake(fake: FakeGoogle, monkeypatch: pytest.MonkeyPatch) -> FakeGoogle:
    """Secret Manager on the same fake: wandb-key's latest version is 3."""
    monkeypatch.setenv("KND_SECRETS_ENDPOINT", fake.endpoint)
    fake.reply(
        "GET",
        SECRET_VERSION,
        200,
        {"name": "projects/p1/secrets/wandb-key/versions/3", "state": "ENABLED"},
    )
    fake.reply(
        "GET",
        SECRET_VERSION + ":access",
        200,
        {
            "name": "projects/p1/secrets/wandb-key/versions/3",
            "payload": {"data": base64.b64encode(b"wandb-s3cret-value").decode()},
        },
    )
    return fake


def test_secret_env_sends_a_pinned_reference_never_the_value(secrets_fake: FakeGoogle) -> None:
    _created(secrets_fake)
    args = [*BASE_ARGS, "--train-image", "img", "--secret-env", "WANDB_API_KEY=wandb-key"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [call] = secrets_fake.calls("POST", JOBS)
    container = call.body["jobSpec"]["workerPoolSpecs"][0]["containerSpec"]
    env = {e["name"]: e["value"] for e in container["env"]}
    # latest was pinned to its version now: a rotated key does not change a restarted job
    assert env == {"KND_SECRET__WANDB_API_KEY": "projects/p1/secrets/wandb-key/versions/3"}
    assert "wandb-s3cret-value" not in json.dumps(call.body)
    assert secrets_fake.calls("GET", SECRET_VERSION + ":access") == []  # never read here


def test_dry_run_with_a_secret_reads_nothing(secrets_fake: FakeGoogle) -> None:
    args = [*BASE_ARGS, "--train-image", "img", "--secret-env", "WANDB_API_KEY=wandb-key:2"]
    result = CliRunner().invoke(app, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "projects/p1/secrets/wandb-key/versions/2" in result.output
    assert secrets_fake.requests == []


@pytest.mark.parametrize("name", ["WANDB_API_KEY", "HF_TOKEN", "DB_PASSWORD", "KND_SECRET__X"])
def test_a_credential_in_plain_env_is_refused(fake: FakeGoogle, name: str) -> None:
    result = CliRunner().invoke(app, [*BASE_ARGS, "--train-image", "img", "--env", f"{name}=x"])
    assert result.exception.exit_code == 2
    assert f"--secret-env {name}=SECRET_ID" in str(result.exception)
    assert fake.requests == []


def test_a_job_reads_its_secrets_from_secret_manager(secrets_fake: FakeGoogle) -> None:
    from kndcli.cloud.secrets import resolve_secret_env

    env = {"KND_SECRET__WANDB_API_KEY": "projects/p1/secrets/wandb-key/versions/3", "A": "1"}
    assert resolve_secret_env(env) == ["WANDB_API_KEY"]
    assert env == {"WANDB_API_KEY": "wandb-s3cret-value", "A": "1"}

    secrets_fake.reply("GET", SECRET_VERSION + ":access", 403, error_body(403, "no access"))
    env = {"KND_SECRET__WANDB_API_KEY": "projects/p1/secrets/wandb-key/versions/3"}
    with pytest.raises(KndError, match=r"Secret Manager .*wandb-key.* for WANDB_API_KEY.*403"):
        resolve_secret_env(env)


# ----------------------------------------------------------------------------- cloud predict


def test_cloud_predict_runs_sharded_replicas_of_the_serving_image(fake: FakeGoogle) -> None:
    _created(fake)
    args = [
        "cloud", "predict", "gs://calls/2026", "--out", "gs://calls-results/run-1",
        "--project", "p1", "--region", "europe-west4", "--replicas", "4",
        "--machine", "n1-highcpu-32", "--serve-image", "europe-docker.pkg.dev/p1/knd/serve:abc",
        "-m", "gs://knd-models/exp1", "--part-size", "500",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [call] = fake.calls("POST", JOBS)
    primary, workers = call.body["jobSpec"]["workerPoolSpecs"]
    assert int(workers["replicaCount"]) == 3  # 4 replicas: pool 0 plus 3, one shard each
    container = primary["containerSpec"]
    assert container["imageUri"] == "europe-docker.pkg.dev/p1/knd/serve:abc"
    assert container["args"] == [
        "predict", "gs://calls/2026", "--out", "gs://calls-results/run-1", "--shard", "auto",
        "--part-size", "500", "--processes", "32",  # one scoring process per vCPU
        "--model", "/gcs/knd-models/exp1", "--no-progress",
    ]  # fmt: skip
    assert workers["containerSpec"]["args"] == container["args"]
    # Replicas are independent (no DDP): one restarting does not restart the others.
    assert "restartJobOnWorkerRestart" not in call.body["jobSpec"]["scheduling"]


def test_cloud_predict_replicas_score_with_the_config_files_keys(
    fake: FakeGoogle, tmp_path
) -> None:
    """A replica cannot read this machine's --config file: its scoring keys travel as
    --set, so every replica answers "uncertain" where `knd predict -c` here would."""
    _created(fake)
    config = tmp_path / "scoring.yaml"
    config.write_text(
        "inference:\n  min_confidence: 0.7\n  window_s: 2.0\n  backend: torch\n  workers: 2\n"
        "audio:\n  formats: [WAV, FLAC]\ncloud:\n  replicas: 2\n"
    )
    args = [
        "cloud", "predict", "gs://calls/2026", "--out", "gs://r/run-1", "-c", str(config),
        "--project", "p1", "--region", "europe-west4", "--serve-image", "img",
        "-m", "gs://knd-models/exp1", "--set", "inference.hop_s=0.5",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [call] = fake.calls("POST", JOBS)
    container_args = call.body["jobSpec"]["workerPoolSpecs"][0]["containerSpec"]["args"]
    sets = [v for k, v in itertools.pairwise(container_args) if k == "--set"]
    # Not the model (it travels as --model), nor how this machine runs it: the serving
    # image has no torch, and a replica sizes its own workers.
    assert not any(s.startswith(("cloud.", "inference.model", "inference.backend")) for s in sets)
    assert not any(s.startswith("inference.workers") for s in sets)
    replica = load_config(overrides=sets)  # what each replica resolves
    assert replica.inference.min_confidence == 0.7
    assert replica.inference.window_s == 2.0 and replica.inference.hop_s == 0.5
    assert replica.audio.formats == ["WAV", "FLAC"]


def test_cloud_predict_refuses_what_a_job_cannot_reach(fake: FakeGoogle) -> None:
    base = ["cloud", "predict", "--project", "p1", "--region", "europe-west4"]
    base += ["--serve-image", "img", "--out", "gs://r/out"]
    local_model = CliRunner().invoke(app, [*base, "gs://a/in", "-m", "models/exp1"])
    assert local_model.exception.exit_code == 2
    assert "give the bundle as gs://" in str(local_model.exception)
    local_input = CliRunner().invoke(app, [*base, "/data/in", "-m", "gs://m/exp1"])
    assert "reads gs:// prefixes" in str(local_input.exception)
    assert fake.requests == []


def test_cloud_predict_local_runs_the_job_command_here(tmp_path, ravdess_root, tiny_bundle) -> None:
    from tests.conftest import ravdess_clips

    archive = tmp_path / "in"
    archive.mkdir()
    for clip in ravdess_clips(ravdess_root, [1])[:4]:
        (archive / clip.name).symlink_to(clip)
    out = tmp_path / "out"
    args = ["cloud", "predict", str(archive), "--out", str(out), "-m", str(tiny_bundle)]
    result = CliRunner().invoke(app, [*args, "--local", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["scored"] == 4
    assert len((out / "part-00000-of-00001-00000.jsonl").read_text().splitlines()) == 4


def test_cloud_predict_estimates_time_and_cost_before_it_submits(fake: FakeGoogle) -> None:
    args = [
        "cloud", "predict", "gs://calls/2026", "--out", "gs://r/run-1", "--project", "p1",
        "--region", "europe-west4", "--serve-image", "img", "-m", "gs://m/exp1", "--dry-run",
        "--machine", "n1-highcpu-32", "--replicas", "4", "--expect-files", "1000000",
    ]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--price-per-hour", "2.0"])
    assert result.exit_code == 0, result.output
    # 4e6 s of audio / (200 s per vCPU-second x 128 vCPUs) = 156 s; 4 machines that long
    assert "about 3 min of scoring, 0.17 machine-hours, about $0.35" in result.stderr
    assert json.loads(result.stdout)["customJob"]  # the dry run still prints the request
    assert fake.requests == []
    odd = CliRunner().invoke(app, [*args[:-5], "--machine", "custom", "--expect-files", "10"])
    assert odd.exception.exit_code == 2 and "pass --processes" in str(odd.exception)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--accelerator", "NVIDIA_L4"], "built into g2-standard"),  # on n1-highcpu-32
        (["--machine", "g2-standard-24", "--accelerator", "NVIDIA_L4"], "comes with 2 x NVIDIA_L4"),
        (["--machine", "g2-standard-8"], "pass --accelerator NVIDIA_L4"),
        (["--machine", "n1-standard-8", "--accelerator", "NVIDIA_TESLA_T4",
          "--accelerator-count", "3"], "takes 1, 2, 4"),
        (["--machine", "e2-standard-8", "--accelerator", "NVIDIA_TESLA_T4"], "N1 machine types"),
    ],
)  # fmt: skip
def test_a_machine_that_cannot_carry_the_gpus_is_refused_before_any_request(
    fake: FakeGoogle, flags: list[str], words: str, monkeypatch
) -> None:
    _created(fake)
    args = [*BASE_ARGS, "--train-image", "img", *flags]
    refused = CliRunner().invoke(app, args)
    assert isinstance(refused.exception, ConfigError) and words in str(refused.exception)
    assert fake.requests == []
    # Without knd's check the (fake) API refuses the same job: the rule is real, not an echo.
    monkeypatch.setattr(jobs, "check_machine", lambda *_args: None)
    sent = CliRunner().invoke(app, args)
    assert sent.exception.exit_code == 3 and "does not support" in str(sent.exception)


def test_gpu_machines_with_their_own_gpus_pass_knd_and_the_api(fake: FakeGoogle) -> None:
    _created(fake)
    for flags in (
        ["--machine", "g2-standard-24", "--accelerator", "NVIDIA_L4", "--accelerator-count", "2"],
        ["--machine", "a2-highgpu-4g", "--accelerator", "NVIDIA_TESLA_A100",
         "--accelerator-count", "4"],
        ["--machine", "n1-standard-16", "--accelerator", "NVIDIA_TESLA_V100",
         "--accelerator-count", "8"],
    ):  # fmt: skip
        result = CliRunner().invoke(app, [*BASE_ARGS, "--train-image", "img", *flags])
        assert result.exit_code == 0, result.output
