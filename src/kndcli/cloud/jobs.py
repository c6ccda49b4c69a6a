"""Vertex AI CustomJobs that run `knd train` in the training image, on one or many nodes.

`build_custom_job` is pure (options in, request dict out) so the exact request can be
printed by `--dry-run` and checked in tests; `submit_job` sends it with the SDK. The
machine, image and scheduling come from the resolved `cloud:` section (`JobOptions.cloud`,
already merged from files, the environment, `--set` and flags by `config.load_config`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kndcli.cloud.machines import check_machine
from kndcli.config import CloudConfig, parse_duration
from kndcli.errors import ConfigError, KndError, UsageError

TERMINAL_JOB_STATES = {
    "JOB_STATE_SUCCEEDED",
    "JOB_STATE_FAILED",
    "JOB_STATE_CANCELLED",
    "JOB_STATE_EXPIRED",
    "JOB_STATE_PARTIALLY_SUCCEEDED",
}
NUM_NODES_KEY = "train.trainer.num_nodes"
ACCELERATOR_KEY = "train.trainer.accelerator"
_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ACCELERATOR = re.compile(r"[A-Z][A-Z0-9_]+")


@dataclass
class JobOptions:
    """A CustomJob: the resolved `cloud:` section plus what is not configuration.

    `config_files` and `overrides` (`key=value`, as `--set` takes them) are handed to the
    container's `knd train`, so the remote run resolves the config the dry run printed.
    """

    cloud: CloudConfig
    display_name: str
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    config_files: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    # KND_SECRET__NAME -> a Secret Manager version name (`secrets.job_secret_env`): the job
    # reads the values itself, so none is ever in the spec.
    secret_env: dict[str, str] = field(default_factory=dict)
    # Another command than `knd train` (`knd cloud predict`): its image and arguments.
    image: str = ""
    args: list[str] | None = None
    # A training job's run name (`submission_run_name`): its directory under the base
    # output directory, and `train.run_name` of the remote run.
    run: str = ""


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """`KEY=VALUE` items (from repeatable --label / --env) as a dict; later ones win."""
    pairs: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what} {item!r} is not of the form KEY=VALUE")
        pairs[key.strip()] = value
    return pairs


def require_location(cloud: CloudConfig) -> None:
    """A project and a region, or a usage error saying how to give them."""
    if not cloud.project:
        raise ConfigError(
            "no Google Cloud project: pass --project, set KND_PROJECT or cloud.project"
        )
    if not cloud.region:
        raise ConfigError("no region: pass --region, set KND_REGION or cloud.region")


def check_labels(labels: dict[str, str]) -> None:
    for key, value in labels.items():
        if not _LABEL.match(key) or not _LABEL_VALUE.match(value):
            raise UsageError(
                f"--label {key}={value!r}: keys and values must be lowercase letters, digits, "
                "'_' or '-' (keys start with a letter; at most 63 characters)"
            )


def check_env_names(env: dict[str, str], instead: str = "--secret-env {name}=SECRET_ID") -> None:
    """Valid names, and no credential: --env values are plain text in the resource spec.

    `instead` says what to pass for a credential (formatted with its `name`).
    """
    from kndcli.cloud.secrets import SECRET_ENV_PREFIX, looks_secret

    for name in env:
        if not _ENV_NAME.match(name):
            raise UsageError(f"--env {name!r} is not a valid environment variable name")
        if looks_secret(name) or name.startswith(SECRET_ENV_PREFIX):
            raise UsageError(
                f"--env {name}: a credential in --env is stored in plain text in the spec "
                "(console, API, --dry-run): put it in Secret Manager and pass "
                f"{instead.format(name=name)} instead"
            )


def _check(opts: JobOptions) -> None:
    """What the config schema cannot check alone (its values are checked by load_config)."""
    c = opts.cloud
    require_location(c)
    if not (opts.image or c.train_image):
        raise ConfigError(
            "no training image: pass --train-image or set cloud.train_image "
            "(build it with docker/cloudbuild.yaml)"
        )
    if c.accelerator_count and not c.accelerator:
        raise ConfigError(
            "key 'cloud.accelerator_count' needs cloud.accelerator: pass --accelerator "
            "(e.g. NVIDIA_L4)"
        )
    if c.accelerator and not _ACCELERATOR.fullmatch(c.accelerator):
        raise ConfigError(
            f"key 'cloud.accelerator': {c.accelerator!r} is not a Vertex accelerator type "
            "(e.g. NVIDIA_L4, NVIDIA_TESLA_A100)"
        )
    check_machine(c.machine, c.accelerator, c.accelerator_count)
    if c.base_output_dir and not c.base_output_dir.startswith("gs://"):
        raise ConfigError(f"key 'cloud.base_output_dir': {c.base_output_dir!r} must be a gs:// URI")
    check_labels(opts.labels)
    check_env_names(opts.env)
    if opts.args is None:  # a training job: it needs a durable home
        job_home(c, opts.run)


def job_home(cloud: CloudConfig, run: str) -> str:
    """This submission's own base output directory: `<root>/<run>`, under
    `cloud.base_output_dir` or `gs://<cloud.bucket>/runs`. Its own, so a job never
    resumes from (or overwrites) another job's checkpoints: Vertex AI puts them at
    `<base>/checkpoints` for every job that shares a base."""
    root = cloud.base_output_dir
    if not root and cloud.bucket:
        bucket = cloud.bucket.removeprefix("gs://").strip("/")
        root = f"gs://{bucket}/runs"
    if not root:
        raise ConfigError(
            "no place for the trained model: set cloud.base_output_dir (--base-output-dir "
            "gs://...) or cloud.bucket (--bucket); without one Vertex AI sets no "
            "AIP_MODEL_DIR and the model and checkpoints would be lost with the job"
        )
    if not root.startswith("gs://"):
        raise ConfigError(f"key 'cloud.base_output_dir': {root!r} must be a gs:// URI")
    return f"{root.rstrip('/')}/{run}" if run else root.rstrip("/")


def submission_run_name(run_name: str, now: float | None = None) -> str:
    """`<run>-<UTC timestamp>`: one name per submission, for its directory and bundle."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{run_name or 'run'}-{stamp}"


def container_args(opts: JobOptions) -> list[str]:
    """`knd train --config F ... --set k=v ...`: the user's files (paths inside the image)
    and overrides, so the job resolves the same configuration as this command."""
    args = ["train"]
    for file in opts.config_files:
        args += ["--config", file]
    for override in opts.overrides:
        args += ["--set", override]
    # Lightning also learns num_nodes from the environment (vertex_env); saying it here keeps
    # the resolved config that travels with the bundle truthful.
    replicas = opts.cloud.replicas
    if replicas > 1 and not any(o.startswith(f"{NUM_NODES_KEY}=") for o in opts.overrides):
        args += ["--set", f"{NUM_NODES_KEY}={replicas}"]
    # A GPU job must train on its GPUs: with `auto`, a CUDA that cannot start (a host
    # driver older than the wheel's CUDA) would quietly train on the CPU for hours.
    gpu = opts.cloud.accelerator.startswith("NVIDIA_")
    if gpu and not any(o.startswith(f"{ACCELERATOR_KEY}=") for o in opts.overrides):
        args += ["--set", f"{ACCELERATOR_KEY}=gpu"]
    if opts.run:  # the job directory's name: the bundle and W&B say which job made them
        args += ["--set", f"train.run_name={opts.run}"]
    return args


def build_custom_job(opts: JobOptions) -> dict[str, Any]:
    """The CustomJob (proto field names): pool 0 the primary, pool 1 the other N-1 nodes."""
    _check(opts)
    c = opts.cloud
    machine_spec: dict[str, Any] = {"machine_type": c.machine}
    if c.accelerator:
        machine_spec["accelerator_type"] = c.accelerator
        machine_spec["accelerator_count"] = c.accelerator_count or 1
    container = {
        "image_uri": opts.image or c.train_image,
        "args": container_args(opts) if opts.args is None else opts.args,
        "env": [
            {"name": k, "value": v} for k, v in sorted({**opts.env, **opts.secret_env}.items())
        ],
    }
    pools = [{"machine_spec": machine_spec, "replica_count": 1, "container_spec": container}]
    if c.replicas > 1:
        pools.append(
            {
                "machine_spec": dict(machine_spec),
                "replica_count": c.replicas - 1,
                "container_spec": json.loads(json.dumps(container)),
            }
        )
    scheduling: dict[str, Any] = {"timeout": f"{parse_duration(c.timeout, 'cloud.timeout')}s"}
    if c.spot:
        scheduling["strategy"] = "SPOT"
    if c.replicas > 1 and opts.args is None:
        # DDP cannot continue with a node missing: restart every node together, and the
        # restarted job resumes from AIP_CHECKPOINT_DIR.
        scheduling["restart_job_on_worker_restart"] = True
    spec: dict[str, Any] = {"worker_pool_specs": pools, "scheduling": scheduling}
    if c.service_account:
        spec["service_account"] = c.service_account
    if opts.args is None:
        spec["base_output_directory"] = {"output_uri_prefix": job_home(c, opts.run)}
    labels = {"created-by": "knd", **opts.labels}
    return {"display_name": opts.display_name, "job_spec": spec, "labels": labels}


def parent(opts: JobOptions) -> str:
    return f"projects/{opts.cloud.project}/locations/{opts.cloud.region}"


def request_json(opts: JobOptions) -> str:
    """The exact CreateCustomJob request as JSON, as `--dry-run` prints it."""
    request = _request(opts)
    return type(request).to_json(
        request, use_integers_for_enums=False, always_print_fields_with_no_presence=False
    )


def _request(opts: JobOptions) -> Any:
    from google.cloud import aiplatform_v1

    job = build_custom_job(opts)
    accelerator = opts.cloud.accelerator
    known = [
        n for n in aiplatform_v1.AcceleratorType.__members__ if n != "ACCELERATOR_TYPE_UNSPECIFIED"
    ]
    if accelerator and accelerator not in known:
        raise ConfigError(
            f"key 'cloud.accelerator': {accelerator!r} is not a Vertex accelerator type; "
            f"choose one of {', '.join(known)}"
        )
    try:
        return aiplatform_v1.CreateCustomJobRequest(parent=parent(opts), custom_job=job)
    except (ValueError, KeyError, TypeError) as exc:
        raise KndError(f"invalid CustomJob: {exc}") from None


def job_console_url(name: str) -> str:
    parts = name.split("/")
    project, region, job_id = parts[1], parts[3], parts[-1]
    return (
        f"https://console.cloud.google.com/vertex-ai/locations/{region}/training/{job_id}"
        f"/cpu?project={project}"
    )


def submit_job(
    opts: JobOptions,
    *,
    wait: bool = False,
    poll_s: float = 30.0,
    echo: Callable[[str], None] = print,
    client: Any = None,
) -> dict[str, Any]:
    """Create the CustomJob; with `wait`, follow it to a terminal state. Returns its summary."""
    from kndcli.cloud.clients import google_errors, job_client

    request = _request(opts)
    client = client or job_client(opts.cloud.region)
    with google_errors("Vertex AI submit"):
        job = client.create_custom_job(request=request)
    echo(f"submitted {job.name}")
    echo(f"  console: {job_console_url(job.name)}")
    if wait:
        job = wait_for_job(client, job.name, poll_s=poll_s, echo=echo)
    summary = job_summary(job)
    if wait and summary["state"] != "JOB_STATE_SUCCEEDED":
        detail = f": {summary['error']}" if summary.get("error") else ""
        raise KndError(f"job {job.name} ended {summary['state']}{detail}")
    return summary


def wait_for_job(
    client: Any, name: str, *, poll_s: float, echo: Callable[[str], None] = print
) -> Any:
    """Poll `get_custom_job` until the job reaches a terminal state, echoing each change."""
    from kndcli.cloud.clients import google_errors

    last = ""
    while True:
        with google_errors("Vertex AI status"):
            job = client.get_custom_job(name=name)
        state = job.state.name
        if state != last:
            echo(f"  {state}")
            last = state
        if state in TERMINAL_JOB_STATES:
            return job
        time.sleep(poll_s)


def format_time(value: Any) -> str:
    """ISO time, or '' for an unset protobuf timestamp."""
    if not value:
        return ""
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return "" if text.startswith("1970-01-01") else text


def job_summary(job: Any) -> dict[str, Any]:
    """State, times and error of a CustomJob, for `knd cloud status` and `--wait`."""
    summary = {
        "kind": "job",
        "name": job.name,
        "display_name": job.display_name,
        "state": job.state.name,
        "create_time": format_time(job.create_time),
        "start_time": format_time(job.start_time),
        "end_time": format_time(job.end_time),
        "console": job_console_url(job.name) if job.name.count("/") >= 5 else "",
    }
    if job.error and job.error.message:
        summary["error"] = job.error.message
    return summary


def job_status(name: str, region: str, client: Any = None) -> dict[str, Any]:
    from kndcli.cloud.clients import google_errors, job_client

    client = client or job_client(region)
    with google_errors("Vertex AI status"):
        return job_summary(client.get_custom_job(name=name))


def default_display_name(run_name: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"knd-train-{run_name}-{stamp}" if run_name else f"knd-train-{stamp}"


def resolve_job_name(target: str, project: str, region: str) -> str | None:
    """A full CustomJob resource name, or a bare numeric job id expanded; else None."""
    if re.fullmatch(r"projects/[^/]+/locations/[^/]+/customJobs/[^/]+", target):
        return target
    if target.isdigit():
        if not project:
            raise ConfigError(
                "a bare job id needs a project: pass --project, set KND_PROJECT or cloud.project"
            )
        return f"projects/{project}/locations/{region}/customJobs/{target}"
    return None


def region_of(name: str, default: str) -> str:
    parts = name.split("/")
    return parts[3] if len(parts) > 3 and parts[2] == "locations" else default


# Vertex AI mounts the buckets a job's service account can read under /gcs (Cloud Storage
# FUSE), so a gs:// bundle is a directory inside the container.
GCS_MOUNT = "/gcs"


# Audio seconds one vCPU scores per second in `knd predict --out --processes N` (one
# process per vCPU, 16 kHz model): 442 measured on this project's 2-vCPU Xeon
# (bench/results/predict_archive.json), halved for an older n1 vCPU (a hyperthread of a
# 2.0-2.2 GHz Skylake/Broadwell core). An assumption, not a measurement on n1: the
# estimate says so.
AUDIO_S_PER_VCPU_S = 200.0


def machine_vcpus(machine: str) -> int:
    """vCPUs of a predefined Compute Engine machine type (the number at its end)."""
    _, _, tail = machine.rpartition("-")
    if not tail.isdigit() or int(tail) < 1:
        raise UsageError(
            f"machine {machine!r}: cannot tell its vCPUs from the name; pass --processes"
        )
    return int(tail)


@dataclass
class ArchiveEstimate:
    """How long an archive job should take and what it should cost, before it runs."""

    files: int
    clip_s: float
    replicas: int
    vcpus: int
    hours: float
    machine_hours: float
    usd: float | None

    def describe(self) -> str:
        cost = f", about ${self.usd:,.2f}" if self.usd is not None else ""
        return (
            f"estimate: {self.files:,} clips of {self.clip_s:g} s on {self.replicas} x "
            f"{self.vcpus} vCPUs: about {self.hours * 60:,.0f} min of scoring, "
            f"{self.machine_hours:,.2f} machine-hours{cost} (assumes "
            f"{AUDIO_S_PER_VCPU_S:g} s of audio per vCPU-second; add replica start-up of "
            "a few minutes, and object reads if the bucket is far away)"
        )


def estimate_archive(
    files: int, clip_s: float, vcpus: int, replicas: int, price_per_hour: float | None
) -> ArchiveEstimate:
    """`vcpus` is the scoring processes per replica (one vCPU each)."""
    hours = files * clip_s / (AUDIO_S_PER_VCPU_S * vcpus * replicas) / 3600
    machine_hours = hours * replicas
    usd = machine_hours * price_per_hour if price_per_hour is not None else None
    return ArchiveEstimate(files, clip_s, replicas, vcpus, hours, machine_hours, usd)


def predict_job_options(
    cloud: CloudConfig,
    *,
    sources: list[str],
    out: str,
    model: str,
    part_size: int,
    processes: int,
    display_name: str,
    labels: dict[str, str],
    env: dict[str, str],
    overrides: list[str],
) -> JobOptions:
    """A CustomJob whose replicas each run `knd predict SOURCES --shard auto --out OUT`.

    It runs the serving image (torch-free, the same Predictor as `knd serve`); every
    replica lists the same sources and keeps its own shard (`inference/archive.py`).
    """
    bad = [s for s in sources if not s.startswith("gs://")]
    if bad:
        raise UsageError(f"{bad[0]}: knd cloud predict reads gs:// prefixes (or use --local)")
    if not out.startswith("gs://"):
        raise UsageError(f"--out {out!r}: the job writes to a gs:// prefix")
    if not cloud.serve_image:
        raise ConfigError(
            "no serving image: pass --serve-image or set cloud.serve_image "
            "(build it with docker/cloudbuild.yaml)"
        )
    if model.startswith("gs://"):
        model = f"{GCS_MOUNT}/{model[5:]}"
    elif not model.startswith("/"):
        raise UsageError(
            f"--model {model!r}: give the bundle as gs://... (or an absolute path inside the "
            "image); a local path does not exist in the job"
        )
    args = ["predict", *sources, "--out", out, "--shard", "auto"]
    args += ["--part-size", str(part_size), "--processes", str(processes)]
    args += ["--model", model, "--no-progress"]
    for override in overrides:
        args += ["--set", override]
    return JobOptions(
        cloud=cloud,
        display_name=display_name,
        labels=labels,
        env=env,
        image=cloud.serve_image,
        args=args,
    )
