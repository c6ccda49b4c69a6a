"""Secrets for Vertex AI jobs: Secret Manager references in the job, values only inside it.

A CustomJob's environment is plain text: it is shown in the console, returned by the API
and printed by `knd cloud submit --dry-run`. So a secret (the W&B key) never goes there.
`--secret-env WANDB_API_KEY=wandb-key` puts a reference instead,
`KND_SECRET__WANDB_API_KEY=projects/P/secrets/wandb-key/versions/N`, and `knd train`
inside the job reads the value from Secret Manager with the job's service account (which
needs roles/secretmanager.secretAccessor on that secret) before anything else runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

from kndcli.cloud.clients import google_errors, secrets_client
from kndcli.errors import UsageError

SECRET_ENV_PREFIX = "KND_SECRET__"
_VERSION_NAME = re.compile(r"projects/[^/]+/secrets/[^/]+/versions/[^/]+")
_SECRET_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names whose value is a credential: refused in --env, where it would be stored in the clear.
_SECRET_NAME = re.compile(
    r"(^|_)(API_?KEY|KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)", re.IGNORECASE
)


def looks_secret(name: str) -> bool:
    """Whether an environment variable's name says it holds a credential."""
    return bool(_SECRET_NAME.search(name))


def secret_version_name(reference: str, project: str) -> str:
    """`SECRET`, `SECRET:VERSION` or a full version name -> projects/P/secrets/S/versions/V."""
    if _VERSION_NAME.fullmatch(reference):
        return reference
    secret, _, version = reference.partition(":")
    if not _SECRET_ID.fullmatch(secret) or not re.fullmatch(r"\d+|latest|", version):
        raise UsageError(
            f"--secret-env: {reference!r} is not SECRET, SECRET:VERSION or "
            "projects/P/secrets/S/versions/V"
        )
    return f"projects/{project}/secrets/{secret}/versions/{version or 'latest'}"


def pin_version(name: str) -> str:
    """`latest` resolved to its version number now, so a job keeps the secret it started
    with (a rotated secret does not change a running or restarted job)."""
    if not name.endswith("/versions/latest"):
        return name
    with google_errors("Secret Manager"):
        return secrets_client().get_secret_version(name=name).name


def job_secret_env(secret_env: dict[str, str], project: str, *, pin: bool) -> dict[str, str]:
    """The job's reference variables for `NAME=REFERENCE` pairs (no value is read here)."""
    env = {}
    for name, reference in sorted(secret_env.items()):
        if not _ENV_NAME.fullmatch(name):
            raise UsageError(f"--secret-env {name!r} is not a valid environment variable name")
        version = secret_version_name(reference, project)
        env[SECRET_ENV_PREFIX + name] = pin_version(version) if pin else version
    return env


def resolve_secret_env(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Inside a job: set every NAME that has a KND_SECRET__NAME reference from Secret
    Manager, and drop the reference. Returns the names set."""
    env = os.environ if environ is None else environ
    references = {k: v for k, v in env.items() if k.startswith(SECRET_ENV_PREFIX)}
    if not references:
        return []
    client = None
    resolved = []
    for variable, version in sorted(references.items()):
        name = variable.removeprefix(SECRET_ENV_PREFIX)
        with google_errors(f"Secret Manager ({version}, for {name})"):
            client = client or secrets_client()
            payload = client.access_secret_version(name=version).payload.data
        env[name] = payload.decode("utf-8")
        del env[variable]
        resolved.append(name)
    return resolved


def read_secret(reference: str, project: str) -> str:
    """The value of `SECRET[:VERSION]` (or a full version name), e.g. the service token
    `knd cloud invoke` sends; never printed."""
    version = secret_version_name(reference, project)
    with google_errors(f"Secret Manager ({version})"):
        payload = secrets_client().access_secret_version(name=version).payload.data
    return payload.decode("utf-8").strip()
