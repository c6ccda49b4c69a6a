"""Cloud Run services that run `knd serve` from the serve image.

`build_service` is pure (options in, Service dict out); `deploy_service` creates or updates
the service in one call (`update_service` with `allow_missing`), waits for the rollout and
returns the URL. Sizes, scaling and names come from the resolved `cloud:` section
(`ServiceOptions.cloud`). The container learns where things are from environment
variables: KND_MODEL (the bundle directory), KND_LOG_SINK (the prediction log: a gs://
prefix) and KND_API_TOKEN (the API token, from Secret Manager). A gs:// model is mounted
read-only with a Cloud Storage volume, so loading it needs no Google libraries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kndcli.config import CloudConfig, InferenceConfig, KndConfig, ServeConfig
from kndcli.errors import ConfigError, KndError, UsageError

PORT = 8080
MODEL_MOUNT = "/mnt/models"
INVOKER_ROLE = "roles/run.invoker"
PUBLIC_MEMBER = "allUsers"
_SERVICE_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,47}[a-z0-9])?$")
_RESERVED_ENV = {"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"}
# Cloud Run sends SIGKILL 10 s after SIGTERM. uvicorn waits this long for requests in
# flight; the batcher, the log upload and the pool close come after it, in what is left.
CLOUD_RUN_SHUTDOWN_S = 5


@dataclass
class ServiceOptions:
    """A Cloud Run service: the resolved `cloud:` section plus what it serves and logs to.

    `model` and `log_sink` are what the container gets (KND_MODEL, KND_LOG_SINK); '' leaves
    the image's own default. `service_options` derives them from the configuration.
    """

    cloud: CloudConfig
    model: str = ""
    log_sink: str = ""
    # inference.min_confidence: the service answers "uncertain" below it (0: never).
    min_confidence: float = 0.0
    token_secret: str = ""
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    # None leaves the IAM policy alone; True grants allUsers run.invoker; False revokes it.
    allow_unauthenticated: bool | None = None
    # serve.allow_no_token: a public service without a token only when the user says so.
    allow_no_token: bool = False
    # No gs:// log sink: the log lives (and dies) on the instance, only when the user says so.
    ephemeral_log: bool = False


def service_options(
    cfg: KndConfig,
    *,
    token_secret: str = "",
    env: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    allow_unauthenticated: bool | None = None,
    ephemeral_log: bool = False,
) -> ServiceOptions:
    """The service for a resolved configuration: `cloud:`, `inference.model`,
    `inference.min_confidence` and `serve.log_sink`."""
    return ServiceOptions(
        ephemeral_log=ephemeral_log,
        cloud=cfg.cloud,
        model=deployed_model(cfg.inference.model),
        log_sink=deployed_log_sink(cfg.serve.log_sink),
        min_confidence=cfg.inference.min_confidence,
        token_secret=token_secret or "",
        env=dict(env or {}),
        labels=dict(labels or {}),
        allow_unauthenticated=allow_unauthenticated,
        allow_no_token=cfg.serve.allow_no_token,
    )


def deployed_model(model: str) -> str:
    """The bundle the service loads (KND_MODEL), from `inference.model`.

    The schema's default (`models/latest`, a path on this machine) gives '': the image's own
    KND_MODEL. Anything else must be a gs:// URI or an absolute path inside the image.
    """
    model = str(model or "")
    if model == InferenceConfig().model:
        return ""
    check_model(model)
    return model


def check_model(model: str) -> None:
    """Refuse a bundle on this machine (relative, or a path that exists here): the service
    cannot read it. A gs:// URI is mounted; an absolute path is taken to be in the image."""
    if not model or model.startswith("gs://"):
        if model:
            split_gs(model, "--model")
        return
    if not model.startswith("/") or Path(model).exists():
        name = Path(model).name or "bundle"
        raise UsageError(
            f"--model {model} is a path on this machine (inference.model): the service cannot "
            f"read it. Upload it (gsutil cp -r {model} gs://BUCKET/models/{name}) and pass "
            f"--model gs://BUCKET/models/{name}, or bake it into the serve image and pass its "
            "absolute path there"
        )


def deployed_log_sink(sink: str) -> str:
    """The prediction log the service writes (KND_LOG_SINK), from `serve.log_sink`.

    The schema's default (a SQLite file) gives '': the image's own default. Anything else
    must be a gs:// prefix: a local path would be on the instance's disk, gone when Cloud
    Run scales it down.
    """
    sink = str(sink or "")
    if sink == ServeConfig().log_sink:
        return ""
    check_log_sink(sink)
    return sink


def check_log_sink(sink: str) -> None:
    if sink and not sink.startswith("gs://"):
        raise ConfigError(
            f"key 'serve.log_sink': {sink!r} would be on the service instance's disk, lost "
            "when it scales down: pass --log-sink gs://BUCKET/PREFIX"
        )
    if sink:
        split_gs(sink, "--log-sink")


def split_gs(uri: str, what: str) -> tuple[str, str]:
    """gs://bucket/some/path -> ("bucket", "some/path")."""
    rest = uri.removeprefix("gs://")
    bucket, _, path = rest.partition("/")
    if not uri.startswith("gs://") or not bucket:
        raise UsageError(f"{what} {uri!r} is not a gs://bucket/path URI")
    return bucket, path.strip("/")


def _check(opts: ServiceOptions) -> None:
    """What the config schema cannot check alone (its values are checked by load_config)."""
    from kndcli.cloud.jobs import check_env_names, check_labels, require_location

    c = opts.cloud
    require_location(c)
    if not c.serve_image:
        raise ConfigError(
            "no serve image: pass --serve-image or set cloud.serve_image "
            "(build it with docker/cloudbuild.yaml)"
        )
    if not _SERVICE_NAME.match(c.service):
        raise ConfigError(
            f"key 'cloud.service': {c.service!r}: use lowercase letters, digits and '-', "
            "starting with a letter, at most 49 characters"
        )
    check_model(opts.model)
    check_log_sink(opts.log_sink)
    check_labels(opts.labels)
    check_env_names(opts.env, instead="--token-secret SECRET for the API token")
    if opts.allow_unauthenticated and not opts.token_secret and not opts.allow_no_token:
        raise UsageError(
            "--allow-unauthenticated without --token-secret would let anyone on the internet "
            "use the service: add --token-secret SECRET, or pass --insecure-no-token"
        )
    reserved = _RESERVED_ENV & set(opts.env)
    if reserved:
        raise UsageError(f"--env {sorted(reserved)[0]} is set by Cloud Run and cannot be changed")
    if not opts.log_sink and not opts.ephemeral_log:
        raise UsageError(
            "no --log-sink: the prediction log would be a file on the instance's in-memory "
            "disk, gone when it scales down, and drift reports would see nothing. Pass "
            "--log-sink gs://BUCKET/PREFIX, or --ephemeral-log to accept that"
        )


def pinned_token_secret(opts: ServiceOptions) -> str:
    """`--token-secret SECRET[:latest]` with `latest` resolved to its version number."""
    if not opts.token_secret:
        return ""
    from kndcli.cloud.secrets import pin_version

    secret, _, version = opts.token_secret.partition(":")
    if version and version != "latest":
        return opts.token_secret
    name = f"projects/{opts.cloud.project}/secrets/{secret}/versions/latest"
    return f"{secret}:{pin_version(name).rsplit('/', 1)[-1]}"


def service_name(opts: ServiceOptions) -> str:
    c = opts.cloud
    return f"projects/{c.project}/locations/{c.region}/services/{c.service}"


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
        # Verbatim: the prediction log writes gs:// objects itself (JSON lines through gcsfs);
        # SQLite on a mounted bucket would lose its locking.
        env.append({"name": "KND_LOG_SINK", "value": opts.log_sink})
    if opts.min_confidence > 0:
        # A config key the app reads from its environment (config.ENV_KEYS), so the
        # service answers "uncertain" exactly where `knd serve` here would.
        env.append({"name": "KND_MIN_CONFIDENCE", "value": repr(opts.min_confidence)})
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
    else:
        # The container binds 0.0.0.0, which `knd serve` refuses without a token unless
        # told that something in front checks callers: Cloud Run IAM on a private service,
        # or the user's explicit --insecure-no-token on a public one (refused in _check
        # otherwise).
        env.append({"name": "KND_ALLOW_NO_TOKEN", "value": "true"})
    # The app answers before Cloud Run cuts the request, and finishes within the 10 s
    # Cloud Run allows after SIGTERM (the log is flushed before the scoring pool stops).
    app_timeout = max(1, opts.cloud.request_timeout_s - 2)
    env.append({"name": "KND_REQUEST_TIMEOUT_S", "value": str(app_timeout)})
    env.append({"name": "KND_SHUTDOWN_TIMEOUT_S", "value": str(CLOUD_RUN_SHUTDOWN_S)})
    env += [{"name": k, "value": v} for k, v in sorted(opts.env.items())]
    container: dict[str, Any] = {
        "image": opts.cloud.serve_image,
        "ports": [{"name": "http1", "container_port": PORT}],
        "env": env,
        "resources": {
            "limits": {"cpu": opts.cloud.cpu, "memory": opts.cloud.memory},
            "startup_cpu_boost": True,
            # A gs:// log uploads its spool in the background between requests, which
            # needs CPU outside requests: instance-based billing then.
            "cpu_idle": not opts.log_sink.startswith("gs://"),
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
            "min_instance_count": opts.cloud.min_instances,
            "max_instance_count": opts.cloud.max_instances,
        },
        "max_instance_request_concurrency": opts.cloud.concurrency,
        "timeout": f"{opts.cloud.request_timeout_s}s",
        "volumes": volumes,
    }
    if opts.cloud.service_account:
        template["service_account"] = opts.cloud.service_account
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


def iam_change(opts: ServiceOptions) -> dict[str, Any] | None:
    """The invoker-policy change `deploy_service` makes, or None when it leaves IAM alone.

    `set_public` reads the policy (getIamPolicy), applies this delta keeping every other
    binding, and calls setIamPolicy only if that changes something.
    """
    if opts.allow_unauthenticated is None:
        return None
    action = "ADD" if opts.allow_unauthenticated else "REMOVE"
    return {
        "method": "setIamPolicy",
        "resource": service_name(opts),
        "policyDelta": {
            "bindingDeltas": [{"action": action, "role": INVOKER_ROLE, "member": PUBLIC_MEMBER}]
        },
    }


def request_json(opts: ServiceOptions) -> str:
    """Every request deploy sends, as `--dry-run` prints them: one JSON document with the
    exact UpdateService request ("service") and, with --[no-]allow-unauthenticated, the
    IAM policy change ("iam")."""
    request = _request(opts)
    document: dict[str, Any] = {
        "service": json.loads(
            type(request).to_json(
                request, use_integers_for_enums=False, always_print_fields_with_no_presence=False
            )
        )
    }
    iam = iam_change(opts)
    if iam is not None:
        document["iam"] = iam
    return json.dumps(document, indent=2)


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
    if opts.allow_unauthenticated is None and not opts.token_secret and not opts.allow_no_token:
        _refuse_if_public(client, request.service.name)
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


def _refuse_if_public(client: Any, name: str) -> None:
    """A deploy without a token leaves IAM as it is: on a service that anyone may call
    already, that would drop the token and leave it open to the internet."""
    from google.api_core import exceptions as api

    from kndcli.cloud.clients import google_errors

    with google_errors("Cloud Run IAM"):
        try:
            policy = client.get_iam_policy(request={"resource": name})
        except api.NotFound:  # a new service: private until told otherwise
            return
    if any(b.role == INVOKER_ROLE and PUBLIC_MEMBER in b.members for b in policy.bindings):
        raise UsageError(
            f"{name} is public (allUsers may invoke it), and this deploy has no "
            "--token-secret: anyone on the internet could use it. Add --token-secret "
            "SECRET, pass --no-allow-unauthenticated to make it private, or "
            "--insecure-no-token"
        )


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
        raise ConfigError(
            "a service name needs a project: pass --project, set KND_PROJECT or cloud.project"
        )
    return f"projects/{project}/locations/{region}/services/{target}"


def service_status(name: str, client: Any = None) -> dict[str, Any]:
    from kndcli.cloud.clients import google_errors, services_client

    client = client or services_client()
    with google_errors("Cloud Run status"):
        return service_summary(client.get_service(name=name))
