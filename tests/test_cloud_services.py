"""`knd cloud deploy` / `status` for Cloud Run: the real ServicesClient (REST) against a
loopback fake that records the requests and runs the long-running operation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gcp_fake import FakeGoogle, error_body
from kndcli.cli.main import app
from kndcli.cloud import services
from kndcli.config import ENV_KEYS, CloudConfig, load_config
from kndcli.errors import ConfigError, KndError, UsageError

NAME = "projects/p1/locations/europe-west1/services/emotions"
SERVICE = f"/v2/{NAME}"
OPERATION = r"/v2/projects/p1/locations/europe-west1/operations/op-(\d+)"
URL = "https://emotions-abc-ew.a.run.app"
# A public service needs a token (or an explicit --insecure-no-token).
PUBLIC = ["--allow-unauthenticated", "--token-secret", "knd-token"]
BASE_ARGS = [
    "cloud",
    "deploy",
    "--project",
    "p1",
    "--region",
    "europe-west1",
    "--service",
    "emotions",
    "--serve-image",
    "europe-docker.pkg.dev/p1/knd/serve:abc",
    "--log-sink",
    "gs://knd-logs/predictions",
]
POLLS_BEFORE_DONE = 2


def _deployed(body: dict, ready: bool = True) -> dict:
    condition = {
        "type": "Ready",
        "state": "CONDITION_SUCCEEDED" if ready else "CONDITION_FAILED",
        "message": "" if ready else "container failed the startup probe on /ready",
    }
    return {
        **body,
        "@type": "type.googleapis.com/google.cloud.run.v2.Service",
        "name": NAME,
        "uri": URL,
        "latestReadyRevision": f"{NAME}/revisions/emotions-00002-abc",
        "latestCreatedRevision": f"{NAME}/revisions/emotions-00002-abc",
        "terminalCondition": condition,
        "createTime": "2025-02-01T09:00:00Z",
        "updateTime": "2025-02-02T09:00:00Z",
    }


def _cloud_run_refuses(service: dict) -> str | None:
    """The fake's own reading of Cloud Run's documented limits (not knd's checks): why the
    Admin API would refuse this service, or None. Sources: Cloud Run "CPU limits", "Memory
    limits", "Maximum concurrent requests", "Request timeout" and "Health checks" pages."""
    template = service["template"]
    [container] = template["containers"]
    limits = container["resources"]["limits"]
    cpu, memory = float(limits["cpu"]), limits["memory"]
    gib = float(memory[:-2]) / (1024 if memory.endswith("Mi") else 1)
    concurrency = template.get("maxInstanceRequestConcurrency", 80)
    if not (0.08 <= cpu < 1 or cpu in (1, 2, 4, 6, 8)):
        return f"cpu {limits['cpu']} is not a supported value"
    if (cpu < 1 and gib > 1) or (cpu >= 1 and gib > 4 * cpu):
        return f"memory {memory} is above the maximum for {limits['cpu']} CPU"
    if (cpu == 4 and gib < 2) or (cpu >= 6 and gib < 4):
        return f"{limits['cpu']} CPU needs at least {2 if cpu == 4 else 4} GiB of memory"
    if not 1 <= concurrency <= 1000 or (cpu < 1 and concurrency > 1):
        return f"concurrency {concurrency} is not allowed with {limits['cpu']} CPU"
    if int(template.get("timeout", "300s").rstrip("s")) > 3600:
        return "timeout must be at most 3600s"
    probe = container.get("startupProbe", {})
    period, failures = probe.get("periodSeconds", 10), probe.get("failureThreshold", 3)
    if period * failures > 240 or probe.get("timeoutSeconds", 1) > period:
        return "startup probe: periodSeconds x failureThreshold must be at most 240 s"
    return None


def _run_service_api(fake: FakeGoogle, ready: bool = True, policy: dict | None = None) -> None:
    """PATCH starts an operation that is done after POLLS_BEFORE_DONE polls; IAM is kept.
    A service outside Cloud Run's limits is refused with 400, as the Admin API does."""
    state: dict = {"polls": 0, "body": {}, "policy": policy or {"etag": "BwE="}}

    def update(request, _m):
        refused = _cloud_run_refuses(request.body)
        if refused:
            return 400, error_body(400, refused)
        state["body"] = request.body
        return 200, {"name": "projects/p1/locations/europe-west1/operations/op-1", "done": False}

    def poll(_request, match):
        state["polls"] += 1
        operation = {"name": f"projects/p1/locations/europe-west1/operations/op-{match[1]}"}
        if state["polls"] <= POLLS_BEFORE_DONE:
            return 200, {**operation, "done": False}
        return 200, {**operation, "done": True, "response": _deployed(state["body"], ready)}

    def set_policy(request, _m):
        state["policy"] = request.body["policy"]
        return 200, state["policy"]

    fake.route("PATCH", SERVICE, update)
    fake.route("GET", OPERATION, poll)
    fake.route("GET", SERVICE + ":getIamPolicy", lambda _r, _m: (200, state["policy"]))
    fake.route("POST", SERVICE + ":setIamPolicy", set_policy)
    fake.route("GET", SERVICE, lambda _r, _m: (200, _deployed(state["body"], ready)))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    server = FakeGoogle().start()
    monkeypatch.setenv("KND_RUN_ENDPOINT", server.endpoint)
    monkeypatch.setenv("KND_SECRETS_ENDPOINT", server.endpoint)
    # Secret Manager: knd-token's latest version is 7.
    server.reply(
        "GET",
        r"/v1/projects/p1/secrets/knd-token/versions/latest",
        200,
        {"name": "projects/p1/secrets/knd-token/versions/7", "state": "ENABLED"},
    )
    for name in ("KND_PROJECT", "KND_REGION"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.stop()


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueSource")) for e in container["env"]}


def test_deploy_creates_or_updates_in_one_call_and_waits(fake: FakeGoogle) -> None:
    _run_service_api(fake)
    args = [
        *BASE_ARGS,
        "--model",
        "gs://knd-models/runs/exp1/bundle",
        "--log-sink",
        "gs://knd-logs/predictions",
        "--token-secret",
        "knd-token:3",
        "--cpu",
        "4",
        "--memory",
        "4Gi",
        "--min-instances",
        "1",
        "--max-instances",
        "20",
        "--concurrency",
        "16",
        "--request-timeout",
        "120",
        "--service-account",
        "serve@p1.iam.gserviceaccount.com",
        "--env",
        "LOG_LEVEL=info",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert URL in result.output

    [patch] = fake.calls("PATCH", SERVICE)
    assert patch.query["allowMissing"] == ["true"]  # create or update, one call
    template = patch.body["template"]
    [container] = template["containers"]
    assert container["image"] == "europe-docker.pkg.dev/p1/knd/serve:abc"
    assert container["ports"] == [{"name": "http1", "containerPort": 8080}]
    # The gs:// log uploads its spool between requests: CPU outside requests too
    # (cpuIdle false, which JSON leaves out; with resources set, absent means false).
    assert container["resources"] == {
        "limits": {"cpu": "4", "memory": "4Gi"},
        "startupCpuBoost": True,
    }
    probe = container["startupProbe"]
    assert probe["httpGet"] == {"path": "/ready", "port": 8080}
    assert template["scaling"] == {"minInstanceCount": 1, "maxInstanceCount": 20}
    assert template["maxInstanceRequestConcurrency"] == 16
    assert template["timeout"] == "120s"
    assert template["serviceAccount"] == "serve@p1.iam.gserviceaccount.com"
    env = _env(container)
    assert env["KND_MODEL"] == "/mnt/models/runs/exp1/bundle"
    assert env["KND_LOG_SINK"] == "gs://knd-logs/predictions"
    assert env["KND_API_TOKEN"] == {"secretKeyRef": {"secret": "knd-token", "version": "3"}}
    assert env["LOG_LEVEL"] == "info"
    # The app answers before Cloud Run's 120 s cut, and shuts down inside its 10 s window.
    assert env["KND_REQUEST_TIMEOUT_S"] == "118" and env["KND_SHUTDOWN_TIMEOUT_S"] == "5"
    assert template["volumes"] == [
        {"name": "models", "gcs": {"bucket": "knd-models", "readOnly": True}}
    ]
    assert container["volumeMounts"] == [{"name": "models", "mountPath": "/mnt/models"}]
    # The long-running operation was polled until done; IAM was left alone (private).
    assert len(fake.calls("GET", OPERATION)) == POLLS_BEFORE_DONE + 1
    assert not fake.calls("GET", SERVICE + ":getIamPolicy")
    assert not fake.calls("POST", SERVICE + ":setIamPolicy")


def test_allow_unauthenticated_adds_the_invoker_binding(fake: FakeGoogle) -> None:
    owner = {"role": "roles/run.admin", "members": ["user:ops@example.com"]}
    _run_service_api(fake, policy={"bindings": [owner], "etag": "BwE="})
    result = CliRunner().invoke(app, [*BASE_ARGS, *PUBLIC])
    assert result.exit_code == 0, result.output
    [call] = fake.calls("POST", SERVICE + ":setIamPolicy")
    bindings = call.body["policy"]["bindings"]
    assert {"role": "roles/run.invoker", "members": ["allUsers"]} in bindings
    # The token secret's `latest` was pinned: every instance of the revision has one token.
    [container] = fake.calls("PATCH", SERVICE)[0].body["template"]["containers"]
    ref = _env(container)["KND_API_TOKEN"]["secretKeyRef"]
    assert ref == {"secret": "knd-token", "version": "7"}
    assert owner in bindings  # nothing else is dropped
    assert call.body["policy"]["etag"] == "BwE="

    # Deploying again with the flag changes nothing; --no-allow-unauthenticated revokes it.
    assert CliRunner().invoke(app, [*BASE_ARGS, *PUBLIC]).exit_code == 0
    assert len(fake.calls("POST", SERVICE + ":setIamPolicy")) == 1
    result = CliRunner().invoke(app, [*BASE_ARGS, "--no-allow-unauthenticated"])
    assert result.exit_code == 0, result.output
    revoked = fake.calls("POST", SERVICE + ":setIamPolicy")[-1].body["policy"]["bindings"]
    assert revoked == [owner]


def test_config_log_sink_used_only_when_durable() -> None:
    cfg = load_config(overrides=["serve.log_sink=gs://logs/knd", "cloud.serve_image=img"])
    cfg.cloud.project = "p"
    opts = services.service_options(cfg)
    assert opts.log_sink == "gs://logs/knd"
    cfg = load_config(overrides=["cloud.serve_image=img"])  # predictions.sqlite: the image's
    cfg.cloud.project = "p"
    opts = services.service_options(cfg)
    assert opts.log_sink == "" and opts.model == ""
    # On the instance's in-memory disk the log would vanish: refused unless the user says so.
    with pytest.raises(UsageError, match="no --log-sink.*--ephemeral-log"):
        services.build_service(opts)
    opts = services.service_options(cfg, ephemeral_log=True)
    container = services.build_service(opts)["template"]["containers"][0]
    names = [e["name"] for e in container["env"]]
    assert "KND_LOG_SINK" not in names and "KND_MODEL" not in names
    assert container["resources"]["cpu_idle"] is True  # nothing to upload between requests


def test_min_confidence_reaches_the_service_through_its_environment() -> None:
    """The image runs plain `knd serve`: the threshold travels as KND_MIN_CONFIDENCE, a
    config key of ENV_KEYS, so the deployed service answers "uncertain" as serve does here."""
    sets = ["cloud.serve_image=img", "serve.log_sink=gs://logs/knd"]
    cfg = load_config(overrides=[*sets, "inference.min_confidence=0.6"])
    cfg.cloud.project = "p"
    container = services.build_service(services.service_options(cfg))["template"]["containers"][0]
    [value] = [e["value"] for e in container["env"] if e["name"] == "KND_MIN_CONFIDENCE"]
    served = load_config(environ={"KND_MIN_CONFIDENCE": value})  # what the instance loads
    assert served.inference.min_confidence == 0.6
    cfg = load_config(overrides=sets)
    cfg.cloud.project = "p"
    container = services.build_service(services.service_options(cfg))["template"]["containers"][0]
    assert "KND_MIN_CONFIDENCE" not in [e["name"] for e in container["env"]]


def test_the_instance_loads_every_variable_deploy_sets_as_typed_config() -> None:
    """With --ephemeral-log the image's CMD passes no --set, so `knd serve` loads its
    config from the environment alone: each value must arrive as its key's type (a float
    timeout read as the text "118" stopped the service at start-up)."""
    cfg = load_config(overrides=["cloud.serve_image=img", "inference.min_confidence=0.25"])
    cfg.cloud.project = "p"
    opts = services.service_options(cfg, ephemeral_log=True)
    container = services.build_service(opts)["template"]["containers"][0]
    environ = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert set(environ) & set(ENV_KEYS) == {
        "KND_ALLOW_NO_TOKEN", "KND_REQUEST_TIMEOUT_S", "KND_SHUTDOWN_TIMEOUT_S",
        "KND_MIN_CONFIDENCE",
    }  # fmt: skip
    served = load_config(environ=environ)
    assert served.serve.request_timeout_s == float(cfg.cloud.request_timeout_s - 2)
    assert served.serve.shutdown_timeout_s == services.CLOUD_RUN_SHUTDOWN_S
    assert served.serve.allow_no_token is True
    assert served.inference.min_confidence == 0.25


def test_a_local_log_sink_is_refused() -> None:
    cfg = load_config(overrides=["serve.log_sink=logs/predictions.sqlite"])
    with pytest.raises(ConfigError, match="serve.log_sink.*gs://BUCKET/PREFIX"):
        services.service_options(cfg)


def test_failed_rollout_is_an_error(fake: FakeGoogle) -> None:
    _run_service_api(fake, ready=False)
    result = CliRunner().invoke(app, BASE_ARGS)
    assert isinstance(result.exception, KndError)
    assert result.exception.exit_code == 3
    assert "startup probe on /ready" in str(result.exception)


def test_dry_run_prints_the_request_and_calls_nothing(fake: FakeGoogle) -> None:
    result = CliRunner().invoke(app, [*BASE_ARGS, "--dry-run"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert set(document) == {"service"}  # IAM is left alone: no policy request
    request = document["service"]
    assert request["allowMissing"] is True
    assert request["service"]["name"] == NAME
    assert request["service"]["template"]["containers"][0]["startupProbe"]["httpGet"] == {
        "path": "/ready",
        "port": 8080,
    }
    assert fake.requests == []


@pytest.mark.parametrize(
    ("flag", "action"),
    [("--allow-unauthenticated", "ADD"), ("--no-allow-unauthenticated", "REMOVE")],
)
def test_dry_run_shows_the_iam_change(fake: FakeGoogle, flag: str, action: str) -> None:
    result = CliRunner().invoke(app, [*BASE_ARGS, flag, "--token-secret", "t", "--dry-run"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["service"]["service"]["name"] == NAME
    assert document["iam"] == {
        "method": "setIamPolicy",
        "resource": NAME,
        "policyDelta": {
            "bindingDeltas": [{"action": action, "role": "roles/run.invoker", "member": "allUsers"}]
        },
    }
    assert fake.requests == []


def test_dry_run_with_model_and_config(fake: FakeGoogle, tmp_path) -> None:
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text("cloud:\n  cpu: '4'\n  memory: 8Gi\nserve:\n  log_sink: gs://logs/p\n")
    args = [
        *BASE_ARGS[:-2],  # the log sink comes from the file
        "-c",
        str(cfg),
        "-m",
        "/opt/knd-image/models/exp1",
        "--set",
        "cloud.concurrency=8",
    ]
    result = CliRunner().invoke(app, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    template = json.loads(result.output)["service"]["service"]["template"]
    [container] = template["containers"]
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
    assert template["maxInstanceRequestConcurrency"] == 8
    env = _env(container)
    assert env["KND_MODEL"] == "/opt/knd-image/models/exp1"  # a path inside the image, verbatim
    assert env["KND_LOG_SINK"] == "gs://logs/p"
    assert "volumes" not in template or template["volumes"] == []


@pytest.mark.parametrize("model", ["models/exp1", "./bundle", "LOCAL_ABSOLUTE"])
def test_a_local_model_is_refused(fake: FakeGoogle, tmp_path, model: str) -> None:
    if model == "LOCAL_ABSOLUTE":
        model = str(tmp_path)  # absolute, but it exists on this machine
    result = CliRunner().invoke(app, [*BASE_ARGS, "--model", model, "--dry-run"])
    assert isinstance(result.exception, UsageError), result.output
    message = str(result.exception)
    assert f"--model {model} is a path on this machine" in message
    assert "gsutil cp -r" in message and "absolute path" in message
    assert fake.requests == []


def test_a_local_model_through_the_entry_point_is_exit_2(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KND_PROJECT", "KND_REGION")}
    args = [*BASE_ARGS, "--model", "models/exp1", "--dry-run"]
    proc = subprocess.run(
        [sys.executable, "-m", "kndcli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --model models/exp1 is a path on this machine")
    assert "gsutil cp -r models/exp1 gs://BUCKET/" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (["--memory", "2GB"], "cloud.memory"),
        (["--cpu", "3"], "cloud.cpu"),
        (["--concurrency", "0"], "cloud.concurrency"),
        (["--request-timeout", "7200"], "cloud.request_timeout_s"),
        (["--min-instances", "5", "--max-instances", "2"], "cloud.max_instances"),
        (["--service", "Bad_Name"], "cloud.service"),
        (["--log-sink", "/var/log/p.sqlite"], "serve.log_sink"),
    ],
)
def test_bad_values_are_usage_errors_naming_the_key(
    fake: FakeGoogle, flags: list[str], key: str
) -> None:
    result = CliRunner().invoke(app, [*BASE_ARGS, *flags, "--dry-run"])
    assert isinstance(result.exception, ConfigError), result.output
    assert result.exception.exit_code == 2
    assert key in str(result.exception)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("code", "words"), [(403, "permission denied (403)"), (429, "quota exceeded (429)")]
)
def test_google_errors_become_one_line(fake: FakeGoogle, code: int, words: str) -> None:
    fake.reply("PATCH", SERVICE, code, error_body(code, "the fake says no"))
    result = CliRunner().invoke(app, BASE_ARGS)
    assert result.exception.exit_code == 3
    assert words in str(result.exception) and "the fake says no" in str(result.exception)


def test_status_of_a_service(fake: FakeGoogle) -> None:
    _run_service_api(fake)
    args = ["cloud", "status", "emotions", "--project", "p1", "--region", "europe-west1"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["url"] == URL
    assert summary["state"] == "CONDITION_SUCCEEDED"
    assert summary["latest_ready_revision"].endswith("emotions-00002-abc")
    assert summary["update_time"].startswith("2025-02-02T09:00:00")
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0 and URL in table.output


def test_status_of_a_missing_service_is_one_line(fake: FakeGoogle) -> None:
    fake.reply("GET", SERVICE, 404, error_body(404, f"Resource '{NAME}' was not found"))
    args = ["cloud", "status", NAME]
    result = CliRunner().invoke(app, args)
    assert result.exception.exit_code == 3
    assert "not found (404)" in str(result.exception)


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"cloud": {"serve_image": ""}}, ConfigError, "no serve image"),
        ({"cloud": {"project": ""}}, ConfigError, "no Google Cloud project"),
        ({"cloud": {"service": "Bad_Name"}}, ConfigError, "cloud.service"),
        ({"env": {"PORT": "9000"}}, UsageError, "set by Cloud Run"),
        ({"env": {"1BAD": "x"}}, UsageError, "--env '1BAD'"),
        ({"labels": {"Team": "x"}}, UsageError, "--label Team"),
        ({"model": "gs://"}, UsageError, "gs://bucket/path"),
        ({"model": "models/exp1"}, UsageError, "path on this machine"),
        ({"log_sink": "predictions.sqlite"}, ConfigError, "serve.log_sink"),
    ],
)
def test_bad_options_name_the_problem(change: dict, error: type, words: str) -> None:
    cloud = CloudConfig(
        **{"project": "p", "region": "r", "service": "knd", "serve_image": "img"}
        | change.pop("cloud", {})
    )
    opts = services.ServiceOptions(cloud=cloud, **change)
    with pytest.raises(error, match=words):
        services.build_service(opts)


def test_a_public_service_without_a_token_is_refused(fake: FakeGoogle) -> None:
    refused = CliRunner().invoke(app, [*BASE_ARGS, "--allow-unauthenticated", "--dry-run"])
    assert isinstance(refused.exception, UsageError)
    assert "--token-secret" in str(refused.exception)
    forced = CliRunner().invoke(
        app, [*BASE_ARGS, "--allow-unauthenticated", "--insecure-no-token", "--dry-run"]
    )
    assert forced.exit_code == 0, forced.output
    assert fake.requests == []


def test_redeploying_a_public_service_without_a_token_is_refused(fake: FakeGoogle) -> None:
    """Without --[no-]allow-unauthenticated deploy leaves IAM alone: on a service that is
    public already, dropping the token would open it to everyone."""
    public = {"role": "roles/run.invoker", "members": ["allUsers"]}
    _run_service_api(fake, policy={"bindings": [public], "etag": "BwE="})
    refused = CliRunner().invoke(app, BASE_ARGS)
    assert isinstance(refused.exception, UsageError), refused.output
    assert "is public (allUsers may invoke it)" in str(refused.exception)
    assert "--token-secret" in str(refused.exception)
    assert not fake.calls("PATCH", SERVICE)
    private = CliRunner().invoke(app, [*BASE_ARGS, "--no-allow-unauthenticated"])
    assert private.exit_code == 0, private.output
    [call] = fake.calls("POST", SERVICE + ":setIamPolicy")
    assert call.body["policy"].get("bindings", []) == []


def test_without_a_token_the_container_is_told_iam_guards_it(fake: FakeGoogle) -> None:
    """The image binds 0.0.0.0, which knd serve refuses without a token unless told."""
    private = json.loads(CliRunner().invoke(app, [*BASE_ARGS, "--dry-run"]).output)
    env = {
        e["name"]: e.get("value")
        for e in private["service"]["service"]["template"]["containers"][0]["env"]
    }
    assert env["KND_ALLOW_NO_TOKEN"] == "true"
    tokened = json.loads(
        CliRunner().invoke(app, [*BASE_ARGS, "--token-secret", "t", "--dry-run"]).output
    )
    names = [e["name"] for e in tokened["service"]["service"]["template"]["containers"][0]["env"]]
    assert "KND_API_TOKEN" in names and "KND_ALLOW_NO_TOKEN" not in names


# cpu, memory, concurrency: the issue's examples and the edges of Cloud Run's table.
RUN_SIZES = [
    ("0.5", "512Mi", 1000),
    ("0.5", "512Mi", 1),
    ("0.5", "2Gi", 1),
    ("1", "4Gi", 80),
    ("1", "8Gi", 80),
    ("2", "8Gi", 32),
    ("2", "16Gi", 32),
    ("4", "1Gi", 32),
    ("4", "2Gi", 32),
    ("6", "4Gi", 32),
    ("8", "32Gi", 1000),
    ("3", "4Gi", 32),
]


@pytest.mark.parametrize(("cpu", "memory", "concurrency"), RUN_SIZES)
def test_knd_and_the_api_agree_on_cloud_run_sizes(
    fake: FakeGoogle, cpu: str, memory: str, concurrency: int
) -> None:
    """What knd refuses before any request is exactly what the fake (Cloud Run's rules)
    refuses when knd's own check is skipped."""
    _run_service_api(fake)
    sizes = ["--cpu", cpu, "--memory", memory, "--concurrency", str(concurrency)]
    checked = CliRunner().invoke(app, [*BASE_ARGS, *sizes, "--dry-run"])
    knd_accepts = checked.exit_code == 0
    if not knd_accepts:
        assert isinstance(checked.exception, ConfigError), checked.output
    assert fake.requests == []  # knd's verdict comes before any request
    cloud = CloudConfig(
        project="p1", region="europe-west1", service="emotions", serve_image="img:1",
        cpu=cpu, memory=memory, concurrency=concurrency,
    )  # fmt: skip
    unchecked = services.ServiceOptions(cloud=cloud, log_sink="gs://knd-logs/p")
    try:
        services.deploy_service(unchecked, echo=lambda _l: None, poll_s=0.01)
        api_accepts = True
    except KndError as exc:
        assert "(400)" in str(exc)
        api_accepts = False
    assert knd_accepts == api_accepts, (checked.output, cpu, memory, concurrency)


def test_the_startup_probe_fits_cloud_runs_budget(fake: FakeGoogle) -> None:
    _run_service_api(fake)
    assert CliRunner().invoke(app, BASE_ARGS).exit_code == 0
    [patch] = fake.calls("PATCH", SERVICE)
    probe = patch.body["template"]["containers"][0]["startupProbe"]
    # Long enough for a cold start that loads a large bundle, inside the 240 s limit.
    assert 60 <= probe["periodSeconds"] * probe["failureThreshold"] <= 240
