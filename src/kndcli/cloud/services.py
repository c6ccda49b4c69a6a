"""Cloud Run services that run `knd serve` from the serve image.

`build_service` is pure (options in, Service dict out); `deploy_service` creates or updates
the service in one call (`update_service` with `allow_missing`), waits for the rollout and
returns the URL. The container learns where things are from environment variables:
KND_MODEL (the bundle directory), KND_LOG_SINK (the prediction log: a gs:// prefix) and
KND_API_TOKEN (the API token, from Secret Manager). A gs:// model is mounted read-only with a
Cloud Storage volume, so loading it needs no Google libraries.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kndcli.config import CloudConfig
from kndcli.errors import KndError

PORT = 8080
MODEL_MOUNT = "/mnt/models"
INVOKER_ROLE = "roles/run.invoker"
PUBLIC_MEMBER = "allUsers"
_SERVICE_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,47}[a-z0-9])?$")
_RESERVED_ENV = {"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"}


@dataclass
class ServiceOptions:
    """Everything a Cloud Run service is built from; CLI flags over env over `cloud:`."""

    project: str
    region: str
    service: str
    image: str
    model: str = ""
    log_sink: str = ""
    token_secret: str = ""
    cpu: str = "2"
    memory: str = "2Gi"
    min_instances: int = 0
    max_instances: int = 10
    concurrency: int = 32
    request_timeout_s: int = 60
    service_account: str = ""
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    # None leaves the IAM policy alone; True grants allUsers run.invoker; False revokes it.
    allow_unauthenticated: bool | None = None


def service_options(
    cloud: CloudConfig,
    *,
    log_sink_default: str = "",
    project: str | None = None,
    region: str | None = None,
    service: str | None = None,
    image: str | None = None,
    model: str | None = None,
    log_sink: str | None = None,
    token_secret: str | None = None,
    cpu: str | None = None,
    memory: str | None = None,
    min_instances: int | None = None,
    max_instances: int | None = None,
    concurrency: int | None = None,
    request_timeout_s: int | None = None,
    service_account: str | None = None,
    env: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    allow_unauthenticated: bool | None = None,
) -> ServiceOptions:
    """Merge flags, KND_PROJECT / KND_REGION and the `cloud:` section into ServiceOptions.

    The config's `serve.log_sink` is used only when it is durable (gs://): the container's
    own disk is gone when the instance scales down.
    """
    from kndcli.cloud.jobs import pick

    sink = log_sink if log_sink is not None else log_sink_default
    return ServiceOptions(
        project=pick(project, "KND_PROJECT", cloud.project),
        region=pick(region, "KND_REGION", cloud.region),
        service=pick(service, None, cloud.service),
        image=pick(image, None, cloud.serve_image),
        model=model or "",
        log_sink=sink if sink.startswith("gs://") or log_sink is not None else "",
        token_secret=token_secret or "",
        cpu=str(pick(cpu, None, cloud.cpu)),
        memory=str(pick(memory, None, cloud.memory)),
        min_instances=int(pick(min_instances, None, cloud.min_instances)),
        max_instances=int(pick(max_instances, None, cloud.max_instances)),
        concurrency=int(pick(concurrency, None, cloud.concurrency)),
        request_timeout_s=int(pick(request_timeout_s, None, cloud.request_timeout_s)),
        service_account=pick(service_account, None, cloud.service_account),
        env=dict(env or {}),
        labels=dict(labels or {}),
        allow_unauthenticated=allow_unauthenticated,
    )


def split_gs(uri: str, what: str) -> tuple[str, str]:
    """gs://bucket/some/path -> ("bucket", "some/path")."""
    rest = uri.removeprefix("gs://")
    bucket, _, path = rest.partition("/")
    if not uri.startswith("gs://") or not bucket:
        raise KndError(f"{what} {uri!r} is not a gs://bucket/path URI")
    return bucket, path.strip("/")


def _check(opts: ServiceOptions) -> None:
    if not opts.project:
        raise KndError("no Google Cloud project: pass --project, set KND_PROJECT or cloud.project")
    if not opts.region:
        raise KndError("no region: pass --region, set KND_REGION or cloud.region")
    if not opts.image:
        raise KndError(
            "no serve image: pass --image or set cloud.serve_image "
            "(build it with docker/cloudbuild.yaml)"
        )
    if not _SERVICE_NAME.match(opts.service):
        raise KndError(
            f"service name {opts.service!r}: use lowercase letters, digits and '-', "
            "starting with a letter, at most 49 characters"
        )
    if opts.min_instances < 0 or opts.max_instances < 1:
        raise KndError("--min-instances must be >= 0 and --max-instances >= 1")
    if opts.min_instances > opts.max_instances:
        raise KndError(
            f"--min-instances {opts.min_instances} exceeds --max-instances {opts.max_instances}"
        )
    if not 1 <= opts.concurrency <= 1000:
        raise KndError(f"--concurrency must be between 1 and 1000, got {opts.concurrency}")
    if not 1 <= opts.request_timeout_s <= 3600:
        raise KndError(
            f"--timeout must be between 1 and 3600 seconds, got {opts.request_timeout_s}"
        )
    reserved = _RESERVED_ENV & set(opts.env)
    if reserved:
        raise KndError(f"--env {sorted(reserved)[0]} is set by Cloud Run and cannot be changed")


def service_name(opts: ServiceOptions) -> str:
    return f"projects/{opts.project}/locations/{opts.region}/services/{opts.service}"


def build_service(opts: ServiceOptions) -> dict[str, Any]:
    """The Cloud Run v2 Service (proto field names) for `update_service(allow_missing=True)`."""
    _check(opts)
    env: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if opts.model:
        if opts.model.startswith("gs://"):
            bucket, path = split_gs(opts.model, "--model")
            volumes.append({"name": "models", "gcs": {"bucket": bucket, "read_only": True}})
            mounts.append({"name": "models", "mount_path": MODEL_MOUNT})
            env.append({"name": "KND_MODEL", "value": f"{MODEL_MOUNT}/{path}".rstrip("/")})
        else:
            env.append({"name": "KND_MODEL", "value": opts.model})
    if opts.log_sink:
        if opts.log_sink.startswith("gs://"):
            split_gs(opts.log_sink, "--log-sink")
        # Verbatim: the prediction log writes gs:// objects itself (JSON lines through gcsfs);
        # SQLite on a mounted bucket would lose its locking.
        env.append({"name": "KND_LOG_SINK", "value": opts.log_sink})
    if opts.token_secret:
        secret, _, version = opts.token_secret.partition(":")
        env.append(
            {
                "name": "KND_API_TOKEN",
                "value_source": {
                    "secret_key_ref": {"secret": secret, "version": version or "latest"}
                },
            }
        )
    env += [{"name": k, "value": v} for k, v in sorted(opts.env.items())]
    container: dict[str, Any] = {
        "image": opts.image,
        "ports": [{"name": "http1", "container_port": PORT}],
        "env": env,
        "resources": {
            "limits": {"cpu": opts.cpu, "memory": opts.memory},
            "startup_cpu_boost": True,
            "cpu_idle": True,
        },
        # The model loads in the app's lifespan; /ready answers 200 once it can predict.
        "startup_probe": {
            "http_get": {"path": "/ready", "port": PORT},
            "initial_delay_seconds": 0,
            "period_seconds": 5,
            "timeout_seconds": 3,
            "failure_threshold": 24,
        },
        "volume_mounts": mounts,
    }
    template: dict[str, Any] = {
        "containers": [container],
        "scaling": {
            "min_instance_count": opts.min_instances,
            "max_instance_count": opts.max_instances,
        },
        "max_instance_request_concurrency": opts.concurrency,
        "timeout": f"{opts.request_timeout_s}s",
        "volumes": volumes,
    }
    if opts.service_account:
        template["service_account"] = opts.service_account
    return {
        "name": service_name(opts),
        "labels": {"created-by": "knd", **opts.labels},
        "template": template,
    }


def _request(opts: ServiceOptions) -> Any:
    from google.cloud import run_v2

    try:
        return run_v2.UpdateServiceRequest(service=build_service(opts), allow_missing=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise KndError(f"invalid Cloud Run service: {exc}") from None


def request_json(opts: ServiceOptions) -> str:
    """The exact UpdateService request as JSON, as `--dry-run` prints it."""
    request = _request(opts)
    return type(request).to_json(
        request, use_integers_for_enums=False, always_print_fields_with_no_presence=False
    )


def deploy_service(
    opts: ServiceOptions,
    *,
    echo: Callable[[str], None] = print,
    client: Any = None,
    timeout_s: float = 900.0,
    poll_s: float = 1.0,
) -> dict[str, Any]:
    """Create or update the service, wait for the rollout, then apply the invoker policy."""
    from google.api_core.future.polling import DEFAULT_POLLING

    from kndcli.cloud.clients import google_errors, services_client

    request = _request(opts)
    client = client or services_client()
    with google_errors("Cloud Run deploy"):
        operation = client.update_service(request=request)
        echo(f"deploying {request.service.name} ...")
        polling = DEFAULT_POLLING.with_delay(initial=poll_s, maximum=max(poll_s, 20.0))
        service = operation.result(timeout=timeout_s, polling=polling)
    if opts.allow_unauthenticated is not None:
        set_public(client, service.name, opts.allow_unauthenticated)
        echo("public: anyone can call it" if opts.allow_unauthenticated else "private")
    summary = service_summary(service)
    if summary["state"] == "CONDITION_FAILED":
        raise KndError(f"service {service.name} failed to deploy: {summary.get('message', '')}")
    echo(f"url: {summary['url']}")
    return summary


def set_public(client: Any, name: str, public: bool) -> None:
    """Grant (or revoke) roles/run.invoker for allUsers, keeping every other binding."""
    from kndcli.cloud.clients import google_errors

    with google_errors("Cloud Run IAM"):
        policy = client.get_iam_policy(request={"resource": name})
        binding = next((b for b in policy.bindings if b.role == INVOKER_ROLE), None)
        present = binding is not None and PUBLIC_MEMBER in binding.members
        if public == present:
            return
        if public:
            if binding is None:
                binding = policy.bindings.add(role=INVOKER_ROLE)
            binding.members.append(PUBLIC_MEMBER)
        else:
            binding.members.remove(PUBLIC_MEMBER)
            if not binding.members:
                policy.bindings.remove(binding)
        client.set_iam_policy(request={"resource": name, "policy": policy})


def service_summary(service: Any) -> dict[str, Any]:
    """URL, rollout state, revisions and times of a service, for deploy and status."""
    from kndcli.cloud.jobs import format_time

    condition = service.terminal_condition
    containers = service.template.containers
    summary = {
        "kind": "service",
        "name": service.name,
        "url": service.uri,
        "state": condition.state.name if condition else "",
        "latest_ready_revision": service.latest_ready_revision,
        "latest_created_revision": service.latest_created_revision,
        "image": containers[0].image if containers else "",
        "create_time": format_time(service.create_time),
        "update_time": format_time(service.update_time),
    }
    if condition and condition.message:
        summary["message"] = condition.message
    return summary


def resolve_service_name(target: str, project: str, region: str) -> str:
    """A full service resource name, or a short name expanded with project and region."""
    if re.fullmatch(r"projects/[^/]+/locations/[^/]+/services/[^/]+", target):
        return target
    if not project:
        raise KndError("a service name needs a project: pass --project or set KND_PROJECT")
    return f"projects/{project}/locations/{region}/services/{target}"


def service_status(name: str, client: Any = None) -> dict[str, Any]:
    from kndcli.cloud.clients import google_errors, services_client

    client = client or services_client()
    with google_errors("Cloud Run status"):
        return service_summary(client.get_service(name=name))
