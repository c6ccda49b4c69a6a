"""Vertex AI CustomJobs that run `knd train` in the training image, on one or many nodes.

`build_custom_job` is pure (options in, request dict out) so the exact request can be
printed by `--dry-run` and checked in tests; `submit_job` sends it with the SDK.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kndcli.config import CloudConfig
from kndcli.errors import KndError

TERMINAL_JOB_STATES = {
    "JOB_STATE_SUCCEEDED",
    "JOB_STATE_FAILED",
    "JOB_STATE_CANCELLED",
    "JOB_STATE_EXPIRED",
    "JOB_STATE_PARTIALLY_SUCCEEDED",
}
_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


@dataclass
class JobOptions:
    """Everything a CustomJob request is built from; CLI flags over env over `cloud:`."""

    project: str
    region: str
    image: str
    display_name: str
    machine: str = "n1-highcpu-32"
    accelerator: str = ""
    accelerator_count: int = 0
    replicas: int = 1
    spot: bool = False
    timeout: str = "24h"
    service_account: str = ""
    base_output_dir: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    config_files: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


def parse_duration(text: str, what: str = "timeout") -> int:
    """Seconds in '90s', '30m', '24h', '2d' or a bare number of seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise KndError(f"{what} {text!r} is not a duration like 3600, 90m, 24h or 2d")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    seconds = int(float(match.group(1)) * scale)
    if seconds <= 0:
        raise KndError(f"{what} {text!r} must be positive")
    return seconds


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """`KEY=VALUE` items (from repeatable --label / --env) as a dict; later ones win."""
    pairs: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KndError(f"{what} {item!r} is not of the form KEY=VALUE")
        pairs[key.strip()] = value
    return pairs


def pick(flag: Any, env_name: str | None, configured: Any) -> Any:
    """A CLI flag wins, then an environment variable, then the config file's value."""
    if flag not in (None, ""):
        return flag
    if env_name and os.environ.get(env_name):
        return os.environ[env_name]
    return configured


def job_options(
    cloud: CloudConfig,
    *,
    display_name: str,
    config_files: list[str],
    overrides: list[str],
    project: str | None = None,
    region: str | None = None,
    image: str | None = None,
    machine: str | None = None,
    accelerator: str | None = None,
    accelerator_count: int | None = None,
    replicas: int | None = None,
    spot: bool | None = None,
    timeout: str | None = None,
    service_account: str | None = None,
    base_output_dir: str | None = None,
    labels: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> JobOptions:
    """Merge flags, KND_PROJECT / KND_REGION and the `cloud:` section into JobOptions."""
    return JobOptions(
        project=pick(project, "KND_PROJECT", cloud.project),
        region=pick(region, "KND_REGION", cloud.region),
        image=pick(image, None, cloud.train_image),
        display_name=display_name,
        machine=pick(machine, None, cloud.machine),
        accelerator=pick(accelerator, None, cloud.accelerator),
        accelerator_count=int(pick(accelerator_count, None, cloud.accelerator_count)),
        replicas=int(pick(replicas, None, cloud.replicas)),
        spot=bool(cloud.spot if spot is None else spot),
        timeout=str(pick(timeout, None, cloud.timeout)),
        service_account=pick(service_account, None, cloud.service_account),
        base_output_dir=pick(base_output_dir, None, cloud.base_output_dir),
        labels=dict(labels or {}),
        env=dict(env or {}),
        config_files=list(config_files),
        overrides=list(overrides),
    )


def _check(opts: JobOptions) -> None:
    if not opts.project:
        raise KndError("no Google Cloud project: pass --project, set KND_PROJECT or cloud.project")
    if not opts.region:
        raise KndError("no region: pass --region, set KND_REGION or cloud.region")
    if not opts.image:
        raise KndError(
            "no training image: pass --image or set cloud.train_image "
            "(build it with docker/cloudbuild.yaml)"
        )
    if opts.replicas < 1:
        raise KndError(f"--replicas must be at least 1, got {opts.replicas}")
    if opts.accelerator_count < 0:
        raise KndError(f"--accelerator-count must not be negative, got {opts.accelerator_count}")
    if opts.accelerator_count and not opts.accelerator:
        raise KndError("--accelerator-count needs --accelerator (e.g. NVIDIA_L4)")
    if opts.accelerator and not re.fullmatch(r"[A-Z][A-Z0-9_]+", opts.accelerator):
        raise KndError(f"--accelerator {opts.accelerator!r} is not a Vertex accelerator type")
    if opts.base_output_dir and not opts.base_output_dir.startswith("gs://"):
        raise KndError(f"--base-output-dir {opts.base_output_dir!r} must be a gs:// URI")
    for key, value in opts.labels.items():
        if not _LABEL.match(key) or not _LABEL_VALUE.match(value):
            raise KndError(
                f"label {key}={value!r}: keys and values must be lowercase letters, digits, "
                "'_' or '-' (keys start with a letter; at most 63 characters)"
            )
    for name in opts.env:
        if not _ENV_NAME.match(name):
            raise KndError(f"--env {name!r} is not a valid environment variable name")


def container_args(opts: JobOptions) -> list[str]:
    """`knd train` arguments: the config files (paths inside the image) and the overrides."""
    args = ["train"]
    for file in opts.config_files:
        args += ["--config", file]
    args += opts.overrides
    # Lightning also learns num_nodes from the environment (vertex_env); saying it here keeps
    # the resolved config that travels with the bundle truthful.
    if opts.replicas > 1 and not any(
        o.startswith("train.trainer.num_nodes=") for o in opts.overrides
    ):
        args.append(f"train.trainer.num_nodes={opts.replicas}")
    return args


def build_custom_job(opts: JobOptions) -> dict[str, Any]:
    """The CustomJob (proto field names): pool 0 the primary, pool 1 the other N-1 nodes."""
    _check(opts)
    machine_spec: dict[str, Any] = {"machine_type": opts.machine}
    if opts.accelerator:
        machine_spec["accelerator_type"] = opts.accelerator
        machine_spec["accelerator_count"] = opts.accelerator_count or 1
    container = {
        "image_uri": opts.image,
        "args": container_args(opts),
        "env": [{"name": k, "value": v} for k, v in sorted(opts.env.items())],
    }
    pools = [{"machine_spec": machine_spec, "replica_count": 1, "container_spec": container}]
    if opts.replicas > 1:
        pools.append(
            {
                "machine_spec": dict(machine_spec),
                "replica_count": opts.replicas - 1,
                "container_spec": json.loads(json.dumps(container)),
            }
        )
    scheduling: dict[str, Any] = {"timeout": f"{parse_duration(opts.timeout)}s"}
    if opts.spot:
        scheduling["strategy"] = "SPOT"
    if opts.replicas > 1:
        # DDP cannot continue with a node missing: restart every node together, and the
        # restarted job resumes from AIP_CHECKPOINT_DIR.
        scheduling["restart_job_on_worker_restart"] = True
    spec: dict[str, Any] = {"worker_pool_specs": pools, "scheduling": scheduling}
    if opts.service_account:
        spec["service_account"] = opts.service_account
    if opts.base_output_dir:
        spec["base_output_directory"] = {"output_uri_prefix": opts.base_output_dir}
    labels = {"created-by": "knd", **opts.labels}
    return {"display_name": opts.display_name, "job_spec": spec, "labels": labels}


def parent(opts: JobOptions) -> str:
    return f"projects/{opts.project}/locations/{opts.region}"


def request_json(opts: JobOptions) -> str:
    """The exact CreateCustomJob request as JSON, as `--dry-run` prints it."""
    request = _request(opts)
    return type(request).to_json(
        request, use_integers_for_enums=False, always_print_fields_with_no_presence=False
    )


def _request(opts: JobOptions) -> Any:
    from google.cloud import aiplatform_v1

    job = build_custom_job(opts)
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
    client = client or job_client(opts.region)
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
            raise KndError("a bare job id needs a project: pass --project or set KND_PROJECT")
        return f"projects/{project}/locations/{region}/customJobs/{target}"
    return None


def region_of(name: str, default: str) -> str:
    parts = name.split("/")
    return parts[3] if len(parts) > 3 and parts[2] == "locations" else default
