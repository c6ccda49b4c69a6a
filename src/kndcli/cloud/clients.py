"""Google SDK clients and the mapping of Google's errors to one line a user can act on.

Clients use the REST transport everywhere, so the path tests exercise against a loopback
fake is the path that runs in production. `KND_VERTEX_ENDPOINT` / `KND_RUN_ENDPOINT` /
`KND_SECRETS_ENDPOINT` override the API hosts (private endpoints, fakes); a plaintext
`http://` endpoint gets anonymous credentials, so real credentials are never sent
unencrypted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kndcli.errors import KndError


class CloudError(KndError):
    """Google refused or failed a request (permissions, missing resource, quota, auth)."""

    exit_code = 3


def vertex_endpoint(region: str) -> str:
    return os.environ.get("KND_VERTEX_ENDPOINT") or f"{region}-aiplatform.googleapis.com"


def run_endpoint() -> str:
    """The Cloud Run Admin API v2 is served globally for every region."""
    return os.environ.get("KND_RUN_ENDPOINT") or "run.googleapis.com"


def secrets_endpoint() -> str:
    return os.environ.get("KND_SECRETS_ENDPOINT") or "secretmanager.googleapis.com"


def _client_kwargs(endpoint: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"client_options": {"api_endpoint": endpoint}, "transport": "rest"}
    if endpoint.startswith("http://"):
        from google.auth.credentials import AnonymousCredentials

        kwargs["credentials"] = AnonymousCredentials()
    return kwargs


def job_client(region: str) -> Any:
    """A Vertex AI `JobServiceClient` for the region's endpoint."""
    with google_errors("Vertex AI"):
        from google.cloud import aiplatform_v1

        return aiplatform_v1.JobServiceClient(**_client_kwargs(vertex_endpoint(region)))


def services_client() -> Any:
    """A Cloud Run v2 `ServicesClient` for the region's endpoint."""
    with google_errors("Cloud Run"):
        from google.cloud import run_v2

        return run_v2.ServicesClient(**_client_kwargs(run_endpoint()))


def secrets_client() -> Any:
    """A Secret Manager `SecretManagerServiceClient` (global endpoint)."""
    with google_errors("Secret Manager"):
        from google.cloud import secretmanager_v1

        return secretmanager_v1.SecretManagerServiceClient(**_client_kwargs(secrets_endpoint()))


def iam_client() -> Any:
    """An IAM Admin `IAMClient` (service accounts and their policies; gRPC only)."""
    endpoint = os.environ.get("KND_IAM_ENDPOINT") or "iam.googleapis.com"
    with google_errors("IAM"):
        from google.cloud import iam_admin_v1

        if endpoint.startswith("http://"):
            import grpc
            from google.cloud.iam_admin_v1.services.iam.transports import IAMGrpcTransport

            channel = grpc.insecure_channel(endpoint.removeprefix("http://"))
            return iam_admin_v1.IAMClient(transport=IAMGrpcTransport(channel=channel))
        return iam_admin_v1.IAMClient(client_options={"api_endpoint": endpoint})


def registry_client() -> Any:
    """An Artifact Registry `ArtifactRegistryClient`."""
    endpoint = os.environ.get("KND_REGISTRY_ENDPOINT") or "artifactregistry.googleapis.com"
    with google_errors("Artifact Registry"):
        from google.cloud import artifactregistry_v1

        return artifactregistry_v1.ArtifactRegistryClient(**_client_kwargs(endpoint))


def projects_client() -> Any:
    """A Resource Manager `ProjectsClient`."""
    endpoint = os.environ.get("KND_PROJECTS_ENDPOINT") or "cloudresourcemanager.googleapis.com"
    with google_errors("Resource Manager"):
        from google.cloud import resourcemanager_v3

        return resourcemanager_v3.ProjectsClient(**_client_kwargs(endpoint))


def storage_client(project: str) -> Any:
    """A Cloud Storage JSON API `Client` billed to `project`."""
    endpoint = os.environ.get("KND_STORAGE_ENDPOINT") or "https://storage.googleapis.com"
    with google_errors("Cloud Storage"):
        from google.cloud import storage

        kwargs = _client_kwargs(endpoint)
        kwargs.pop("transport")
        return storage.Client(project=project, **kwargs)


def _first_line(text: str) -> str:
    """The first line of Google's message, without the REST transport's 'POST https://...: '."""
    text = re.sub(r"^(GET|POST|PUT|PATCH|DELETE) \S+: ", "", (text or "").strip())
    return text.splitlines()[0] if text else ""


@contextmanager
def google_errors(action: str) -> Iterator[None]:
    """Turn google.api_core / google.auth exceptions raised inside into one CloudError line.

    REST calls raise the HTTP-named classes (Forbidden, TooManyRequests), gRPC the
    status-named ones (PermissionDenied, ResourceExhausted); both are handled.
    """
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    try:
        yield
    except auth.InvalidOperation:
        # A 401 makes the transport refresh the credentials; these ones cannot be refreshed.
        raise CloudError(
            f"{action}: not authenticated (401): the credentials were rejected; "
            "run 'gcloud auth application-default login'"
        ) from None
    except auth.DefaultCredentialsError:
        raise CloudError(
            f"{action}: no Google credentials found: run "
            "'gcloud auth application-default login' or set GOOGLE_APPLICATION_CREDENTIALS"
        ) from None
    except auth.GoogleAuthError as exc:
        raise CloudError(f"{action}: authentication failed: {_first_line(str(exc))}") from None
    except (api.Unauthenticated, api.Unauthorized) as exc:
        raise CloudError(
            f"{action}: not authenticated (401): {_first_line(exc.message)}; "
            "run 'gcloud auth application-default login'"
        ) from None
    except (api.PermissionDenied, api.Forbidden) as exc:
        raise CloudError(
            f"{action}: permission denied (403): {_first_line(exc.message)}; check that the "
            "API is enabled and your account has the needed role on the project"
        ) from None
    except api.NotFound as exc:
        raise CloudError(
            f"{action}: not found (404): {_first_line(exc.message)}; "
            "check the project, region and name"
        ) from None
    except (api.ResourceExhausted, api.TooManyRequests) as exc:
        raise CloudError(
            f"{action}: quota exceeded (429): {_first_line(exc.message)}; request more quota "
            "or choose another region, machine or accelerator"
        ) from None
    except api.GoogleAPICallError as exc:
        code = f" ({exc.code})" if exc.code else ""
        raise CloudError(f"{action}: request failed{code}: {_first_line(exc.message)}") from None
    except api.RetryError as exc:
        raise CloudError(f"{action}: gave up retrying: {_first_line(str(exc))}") from None
