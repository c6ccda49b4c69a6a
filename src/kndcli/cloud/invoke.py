"""Calling a private Cloud Run service that also checks knd's own token.

Two layers guard such a service. Cloud Run IAM wants a Google ID token for the service's
URL; knd wants its API token. Both cannot ride in `Authorization`, so the ID token goes in
`X-Serverless-Authorization` (Cloud Run checks it there and passes `Authorization` on
untouched) and knd's token in `Authorization: Bearer`. knd also takes its token in
`X-KND-Token`, for callers that must put the ID token in `Authorization`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from kndcli.errors import KndError


def identity_token(audience: str) -> str:
    """A Google ID token for `audience` (the service URL): from the application default
    credentials (a service-account key, or the metadata server on Google Cloud), else
    from `gcloud auth print-identity-token` (a user's own login, which cannot mint one)."""
    import google.auth.exceptions
    import google.auth.transport.requests
    import google.oauth2.id_token

    try:
        return google.oauth2.id_token.fetch_id_token(
            google.auth.transport.requests.Request(), audience
        )
    except google.auth.exceptions.DefaultCredentialsError:
        pass
    except google.auth.exceptions.GoogleAuthError as exc:
        raise KndError(f"cannot get an ID token for {audience}: {exc}") from None
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise KndError(
            f"cannot get an ID token for {audience}: no service-account credentials "
            "(GOOGLE_APPLICATION_CREDENTIALS) and no gcloud to ask"
        )
    done = subprocess.run(
        [gcloud, "auth", "print-identity-token"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise KndError(f"gcloud auth print-identity-token failed: {done.stderr.strip()}")
    return done.stdout.strip()


def invoke_headers(id_token: str | None, knd_token: str | None) -> dict[str, str]:
    headers = {}
    if id_token:
        headers["X-Serverless-Authorization"] = f"Bearer {id_token}"
    if knd_token:
        headers["Authorization"] = f"Bearer {knd_token}"
    return headers


def post_clip(url: str, path: Path, headers: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """POST one clip to `url`/predict: the service's JSON answer, or its error with the
    status."""
    import httpx

    try:
        response = httpx.post(
            url.rstrip("/") + "/predict",
            files={"file": (path.name, path.read_bytes(), "application/octet-stream")},
            headers=headers,
            timeout=timeout_s,
        )
    except (httpx.HTTPError, OSError) as exc:
        return {"file": str(path), "status": None, "error": f"{type(exc).__name__}: {exc}"}
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:200]}
    return {"file": str(path), "status": response.status_code, **body}
