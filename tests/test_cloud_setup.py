"""`knd cloud setup`: the real IAM (gRPC), Storage, Artifact Registry, Secret Manager and
Resource Manager clients against a loopback fake project that keeps state and enforces
the rules those APIs enforce (etags, members that must exist, eventual consistency)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from google.cloud.artifactregistry_v1 import Repository
from typer.testing import CliRunner

from gcp_fake import FakeGoogle, error_body
from gcp_project_fake import FakeProject
from kndcli.cli.main import app
from kndcli.cloud.clients import CloudError
from kndcli.errors import ConfigError, UsageError

ARGS = ["cloud", "setup", "--project", "p1", "--region", "europe-west4", "--bucket", "p1-knd"]
DEPLOYER = "user:alice@example.com"
TRAINER = "serviceAccount:knd-trainer@p1.iam.gserviceaccount.com"
SERVER = "serviceAccount:knd-serve@p1.iam.gserviceaccount.com"
ENDPOINTS = (
    "KND_STORAGE_ENDPOINT",
    "KND_REGISTRY_ENDPOINT",
    "KND_SECRETS_ENDPOINT",
    "KND_PROJECTS_ENDPOINT",
)


@pytest.fixture
def project(monkeypatch: pytest.MonkeyPatch):
    fake = FakeGoogle().start()
    state = FakeProject()
    state.install(fake)
    iam, iam_endpoint = state.serve_iam()
    for name in ENDPOINTS:
        monkeypatch.setenv(name, fake.endpoint)
    monkeypatch.setenv("KND_IAM_ENDPOINT", iam_endpoint)
    for name in ("KND_PROJECT", "KND_REGION"):
        monkeypatch.delenv(name, raising=False)
    state.fake = fake  # type: ignore[attr-defined]
    yield state
    iam.stop(grace=None)
    fake.stop()


def _setup(*flags: str) -> object:
    return CliRunner().invoke(app, [*ARGS, *flags])


def test_a_dry_run_on_an_empty_project_lists_every_change_and_makes_none(
    project: FakeProject,
) -> None:
    result = _setup("--deployer", DEPLOYER)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "ok      project p1: number 123456789012, ACTIVE" in lines
    for resource in (
        "service account knd-trainer@p1.iam.gserviceaccount.com",
        "service account knd-serve@p1.iam.gserviceaccount.com",
        "bucket gs://p1-knd",
        "repository europe-west4-docker.pkg.dev/p1/knd",
        "secret knd-token",
    ):
        assert any(line.startswith(f"create  {resource}") for line in lines), resource
    grants = [line for line in lines if line.startswith("grant")]
    assert len(grants) == 6  # 3 on the bucket, 1 on the secret, act-as on 2 accounts
    assert "12 changes; nothing was changed" in result.output
    assert (
        "gcloud storage buckets create gs://p1-knd --project p1 --location europe-west4 "
        "--uniform-bucket-level-access --public-access-prevention"
    ) in result.output
    assert (
        f"gcloud secrets add-iam-policy-binding knd-token --project p1 --member {SERVER} "
        "--role roles/secretmanager.secretAccessor"
    ) in result.output
    assert project.changes == []


def test_apply_makes_the_path_with_least_privilege_and_a_rerun_changes_nothing(
    project: FakeProject,
) -> None:
    result = _setup("--deployer", DEPLOYER, "--apply")
    assert result.exit_code == 0, result.output
    assert "12 changes made." in result.output
    assert set(project.accounts) == {
        "knd-trainer@p1.iam.gserviceaccount.com",
        "knd-serve@p1.iam.gserviceaccount.com",
    }
    bucket = project.buckets["p1-knd"]
    assert bucket["location"] == "europe-west4"
    assert bucket["iamConfiguration"]["uniformBucketLevelAccess"]["enabled"] is True
    assert bucket["iamConfiguration"]["publicAccessPrevention"] == "enforced"
    [repository] = project.repositories.values()
    assert repository["name"].endswith("/locations/europe-west4/repositories/knd")
    # The REST transport sends enums as numbers, as the API accepts.
    assert Repository.Format(repository["format"]) == Repository.Format.DOCKER
    # The token: one version, 64 hex digits, never printed.
    [token] = project.versions["knd-token"]
    assert len(token) == 64 and int(token, 16) >= 0
    assert token.decode() not in result.output
    # Least privilege: each account holds only these roles, each on one resource.
    assert project.roles_of(TRAINER) == {"b/p1-knd": {"roles/storage.objectUser"}}
    assert project.roles_of(SERVER) == {
        "b/p1-knd": {"roles/storage.objectViewer", "roles/storage.objectCreator"},
        "secrets/knd-token": {"roles/secretmanager.secretAccessor"},
    }
    accounts = "projects/p1/serviceAccounts/"
    assert project.roles_of(DEPLOYER) == {
        f"{accounts}knd-trainer@p1.iam.gserviceaccount.com": {"roles/iam.serviceAccountUser"},
        f"{accounts}knd-serve@p1.iam.gserviceaccount.com": {"roles/iam.serviceAccountUser"},
    }
    assert "knd cloud deploy --serve-image europe-west4-docker.pkg.dev/p1/knd/serve:TAG" in (
        result.output
    )

    made = len(project.changes)
    again = _setup("--deployer", DEPLOYER, "--apply")
    assert again.exit_code == 0, again.output
    assert "0 changes made." in again.output
    lines = [line for line in again.output.splitlines() if line]
    assert all(line.startswith(("ok ", "0 changes", "Next", "  knd")) for line in lines)
    assert len(project.changes) == made


def test_bindings_already_there_are_kept(project: FakeProject) -> None:
    project.buckets["p1-knd"] = {"name": "p1-knd", "location": "EUROPE-WEST4"}
    project.policies["b/p1-knd"] = {
        "bindings": [
            {"role": "roles/storage.objectViewer", "members": ["group:analysts@example.com"]},
            {"role": "roles/storage.admin", "members": ["user:owner@example.com"]},
        ],
        "etag": "ZXRhZy0w",
    }
    result = _setup("--apply")
    assert result.exit_code == 0, result.output
    assert "ok      bucket gs://p1-knd: exists in EUROPE-WEST4" in result.output
    viewers = project.members("b/p1-knd", "roles/storage.objectViewer")
    assert viewers == {"group:analysts@example.com", SERVER}
    assert project.members("b/p1-knd", "roles/storage.admin") == {"user:owner@example.com"}


def test_grants_wait_for_new_accounts_to_propagate(project: FakeProject) -> None:
    # The first policy write naming each new account is refused, and the first read of
    # each new account's own policy is a 404, as IAM answers before it has caught up.
    project.lag = 1
    result = _setup("--deployer", DEPLOYER, "--apply")
    assert result.exit_code == 0, result.output
    assert sorted(set(project.refused)) == [
        "knd-serve@p1.iam.gserviceaccount.com",
        "knd-trainer@p1.iam.gserviceaccount.com",
    ]
    assert project.members("b/p1-knd", "roles/storage.objectUser") == {TRAINER}
    acts_as = list(project.roles_of(DEPLOYER).values())
    assert acts_as == [{"roles/iam.serviceAccountUser"}] * 2


def test_a_deployer_iam_does_not_know_fails_at_once(project: FakeProject) -> None:
    import time

    _setup("--apply")  # the accounts exist
    start = time.monotonic()
    result = _setup("--deployer", "user:ghost@example.com", "--apply")
    assert isinstance(result.exception, CloudError)
    assert "User ghost@example.com does not exist" in str(result.exception)
    assert time.monotonic() - start < 5  # not retried as if it were a new account


def test_policies_are_read_as_version_3(project: FakeProject) -> None:
    """Version 1 reads would drop (or refuse) conditional bindings on the way back."""
    assert _setup("--deployer", DEPLOYER, "--apply").exit_code == 0
    assert project.policy_reads and {v for _r, v in project.policy_reads} == {3}


def test_without_a_deployer_act_as_is_skipped_and_printed(project: FakeProject) -> None:
    result = _setup("--apply")
    assert result.exit_code == 0, result.output
    assert "10 changes made." in result.output
    assert (
        "Still to do by hand: gcloud iam service-accounts add-iam-policy-binding "
        "knd-serve@p1.iam.gserviceaccount.com --project p1 --member user:YOU@EXAMPLE.COM "
        "--role roles/iam.serviceAccountUser"
    ) in result.output


def test_a_failure_says_how_far_it_got_and_a_rerun_finishes(project: FakeProject) -> None:
    fake = project.fake  # type: ignore[attr-defined]
    fake.reply(
        "POST",
        r"/v1/projects/p1/locations/europe-west4/repositories",
        403,
        error_body(403, "Artifact Registry API has not been used in project p1"),
    )
    failed = _setup("--apply")
    assert isinstance(failed.exception, CloudError), failed.output
    message = str(failed.exception)
    assert "permission denied (403)" in message and "Artifact Registry API" in message
    assert "at: create repository europe-west4-docker.pkg.dev/p1/knd" in message
    assert "3 earlier changes were made" in message
    assert len(project.accounts) == 2 and "p1-knd" in project.buckets

    fake.routes.pop()  # the API is enabled now
    done = _setup("--apply")
    assert done.exit_code == 0, done.output
    assert len(project.repositories) == 1 and project.versions["knd-token"]


def test_an_existing_secret_with_a_version_keeps_its_token(project: FakeProject) -> None:
    project.secrets["knd-token"] = {"name": "projects/123456789012/secrets/knd-token"}
    project.versions["knd-token"] = [b"the-teams-token"]
    result = _setup("--apply")
    assert result.exit_code == 0, result.output
    assert "ok      secret knd-token version: 1 enabled" in result.output
    assert project.versions["knd-token"] == [b"the-teams-token"]


def test_a_bucket_name_taken_by_another_project_is_one_line(project: FakeProject) -> None:
    fake = project.fake  # type: ignore[attr-defined]
    fake.reply("GET", r"/storage/v1/b/p1-knd", 403, error_body(403, "no access"))
    result = _setup()
    assert isinstance(result.exception, CloudError)
    assert "bucket names are global" in str(result.exception)


@pytest.mark.parametrize(
    ("flags", "error", "words"),
    [
        (["--bucket", "Bad_Bucket"], ConfigError, "cloud.bucket"),
        (["--deployer", "alice@example.com"], UsageError, "user:EMAIL"),
        (["--trainer-account", "t"], UsageError, "--trainer-account"),
    ],
)
def test_bad_names_are_refused_before_any_request(
    project: FakeProject, flags: list[str], error: type, words: str
) -> None:
    result = _setup(*flags)
    assert isinstance(result.exception, error), result.output
    assert words in str(result.exception)
    assert project.fake.requests == []  # type: ignore[attr-defined]


def test_the_entry_point_prints_json_and_exits_0(project: FakeProject) -> None:
    env = {**os.environ, "PYTHONPATH": ""}
    run = subprocess.run(
        [sys.executable, "-m", "kndcli", *ARGS, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    assert document["applied"] is False and document["changes"] == 10
    actions = {s["resource"]: s["action"] for s in document["steps"]}
    assert actions["bucket gs://p1-knd"] == "create"
    assert actions["roles/iam.serviceAccountUser on knd-serve@p1.iam.gserviceaccount.com"] == (
        "skip"
    )
    assert project.changes == []
