"""Calling a private Cloud Run service that also checks knd's token (issue 18).

Cloud Run's front is played by a loopback proxy that, like IAM, admits only a request with
the right Google ID token in `X-Serverless-Authorization`; behind it runs a real `knd
serve` with a token. `knd cloud invoke` asks the Cloud Run API (the loopback fake) for the
URL and mints the ID token through google-auth from a service-account key whose token
endpoint is the fake, as on a real project.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from tests.conftest import free_port, wait_ready
from tests.gcp_fake import FakeGoogle
from tests.test_serve import knd_serve, wav_bytes

TOKEN = "knd-service-token"
SERVICE = "/v2/projects/p1/locations/europe-west1/services/emotions"


def service_account_key(path: Path, token_uri: str) -> dict:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "p1",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "caller@p1.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info))
    return info


def jwt_payload(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


class IamFront:
    """Cloud Run's front door: 403 without the expected ID token in
    X-Serverless-Authorization, else the request goes on to the container unchanged."""

    def __init__(self, backend: str) -> None:
        self.id_token = ""
        self.seen: list[dict[str, str]] = []
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                front.seen.append(headers)
                body = self.rfile.read(int(headers.get("content-length", 0)))
                if headers.get("x-serverless-authorization") != f"Bearer {front.id_token}":
                    status, data = 403, b'{"error": "IAM: not an invoker"}'
                else:
                    passed = {
                        k: v
                        for k, v in headers.items()
                        if k not in ("host", "x-serverless-authorization", "content-length")
                    }
                    answer = httpx.post(backend + self.path, content=body, headers=passed)
                    status, data = answer.status_code, answer.content
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def backend(tiny_bundle: Path, tmp_path_factory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("invoke")
    port = free_port()
    args = ["--model", str(tiny_bundle), "--port", str(port)]
    args += ["--set", f"serve.log_sink={tmp / 'log.sqlite'}"]
    with knd_serve(args, {"KND_API_TOKEN": TOKEN}, tmp) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        yield url


@pytest.fixture
def cloud(backend: str, tmp_path: Path) -> Iterator[tuple[FakeGoogle, IamFront, dict]]:
    from google.auth import crypt, jwt

    fake = FakeGoogle().start()
    front = IamFront(backend)
    key = service_account_key(tmp_path / "sa.json", fake.endpoint + "/token")

    def mint(request, _match):
        audience = jwt_payload(request.body["assertion"])["target_audience"]
        now = int(time.time())
        claims = {"aud": audience, "iat": now, "exp": now + 3600, "email": key["client_email"]}
        front.id_token = jwt.encode(crypt.RSASigner.from_service_account_info(key), claims).decode()
        return 200, {"id_token": front.id_token}

    fake.route("POST", "/token", mint)
    fake.reply("GET", SERVICE, 200, {"name": SERVICE[4:], "uri": front.url})
    env = {
        **os.environ,
        "KND_RUN_ENDPOINT": fake.endpoint,
        "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "sa.json"),
        "KND_API_TOKEN": TOKEN,
    }
    yield fake, front, env
    front.server.shutdown()
    fake.stop()


def invoke(env: dict, *files: Path) -> subprocess.CompletedProcess[str]:
    args = ["cloud", "invoke", "emotions", *map(str, files)]
    args += ["--project", "p1", "--region", "europe-west1"]
    return subprocess.run(
        [sys.executable, "-m", "kndcli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_invoke_passes_iam_and_knd_token_in_their_own_headers(cloud, tmp_path) -> None:
    fake, front, env = cloud
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(1.0))
    done = invoke(env, clip)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["status"] == 200 and answer["label"] and answer["probabilities"]
    [grant] = fake.calls("POST", "/token")  # an ID token minted for the service's URL
    assert jwt_payload(grant.body["assertion"])["target_audience"] == front.url
    [seen] = front.seen
    assert seen["authorization"] == f"Bearer {TOKEN}"  # knd's token, untouched by IAM
    assert TOKEN not in json.dumps(answer) and TOKEN not in done.stderr

    without = {k: v for k, v in env.items() if k != "KND_API_TOKEN"}
    refused = invoke(without, clip)
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["status"] == 401  # past IAM, stopped by knd


def test_knd_takes_its_token_in_x_knd_token_beside_an_id_token(backend: str) -> None:
    clip = {"file": ("clip.wav", wav_bytes(0.5), "audio/wav")}
    id_token = {"Authorization": "Bearer eyJhbGciOi.not-knd.token"}
    both = httpx.post(backend + "/predict", files=clip, headers={**id_token, "X-KND-Token": TOKEN})
    assert both.status_code == 200, both.text
    alone = httpx.post(backend + "/predict", files=clip, headers=id_token)
    assert alone.status_code == 401
    wrong = httpx.post(backend + "/predict", files=clip, headers={"X-KND-Token": "nope"})
    assert wrong.status_code == 401
