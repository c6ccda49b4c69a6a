"""`knd cloud setup`: what the cloud path needs in a project, read first, changed on --apply.

A fresh project lacks what `knd cloud submit` and `knd cloud deploy` assume: a service
account for training jobs and one for the service, a Docker repository in the region, a
bucket, the service's API token in Secret Manager, and the grants between them. Every
grant is on one resource, never project-wide (least privilege):

- trainer: `roles/storage.objectUser` on the bucket (prepared data in; bundle and
  checkpoints out; `last.ckpt` is overwritten, so it needs delete too);
- serve: `roles/storage.objectViewer` on the bucket (the read-only model mount) and
  `roles/storage.objectCreator` (the prediction log only ever writes new objects);
  `roles/secretmanager.secretAccessor` on the token secret;
- the deployer (`--deployer user:EMAIL`): `roles/iam.serviceAccountUser` on both accounts,
  the act-as that running a job or a service as them needs.

Each step reads its resource and reports `ok` or the change it would make, with the gcloud
command that does the same. `--apply` makes the changes in order, accounts before the
grants that name them; running it again changes nothing.
"""

from __future__ import annotations

import re
import secrets as random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from kndcli.cloud.clients import CloudError, google_errors
from kndcli.config import KndConfig
from kndcli.errors import ConfigError, UsageError

TRAINER_BUCKET_ROLES = ("roles/storage.objectUser",)
SERVE_BUCKET_ROLES = ("roles/storage.objectViewer", "roles/storage.objectCreator")
SECRET_ROLE = "roles/secretmanager.secretAccessor"
ACT_AS_ROLE = "roles/iam.serviceAccountUser"
_MEMBER = re.compile(r"(user|group|serviceAccount|domain):\S+")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")
_ACCOUNT_ID = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]")
# A service account just created takes a while to be usable in other resources' policies.
PROPAGATION_S = 90.0


@dataclass
class SetupOptions:
    """The project's resources by name; `deployer` is the member allowed to act as both
    accounts (empty: that grant is skipped and printed)."""

    project: str
    region: str
    bucket: str
    repository: str = "knd"
    trainer: str = "knd-trainer"
    server: str = "knd-serve"
    token_secret: str = "knd-token"
    deployer: str = ""

    def email(self, account_id: str) -> str:
        return f"{account_id}@{self.project}.iam.gserviceaccount.com"

    @property
    def registry(self) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/{self.repository}"


def setup_options(cfg: KndConfig, **names: str) -> SetupOptions:
    """The options for a resolved configuration (`cloud.project`, `region`, `bucket`) and
    the command's own names; each name is checked here, before any request."""
    from kndcli.cloud.jobs import require_location

    c = cfg.cloud
    require_location(c)
    if not c.bucket:
        raise ConfigError("no bucket: pass --bucket or set cloud.bucket")
    bucket = c.bucket.removeprefix("gs://").strip("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(
            f"key 'cloud.bucket': {c.bucket!r} is not a bucket name (3-63 lowercase letters, "
            "digits, '-', '_' or '.')"
        )
    opts = SetupOptions(project=c.project, region=c.region, bucket=bucket, **names)
    for flag, account in (("--trainer-account", opts.trainer), ("--serve-account", opts.server)):
        if not _ACCOUNT_ID.fullmatch(account):
            raise UsageError(
                f"{flag} {account!r}: a service account id is 6-30 lowercase letters, digits "
                "and '-', starting with a letter"
            )
    if opts.deployer and not _MEMBER.fullmatch(opts.deployer):
        raise UsageError(
            f"--deployer {opts.deployer!r}: expected user:EMAIL, group:EMAIL or "
            "serviceAccount:EMAIL"
        )
    return opts


@dataclass
class Step:
    """One thing the path needs: `action` is ok, create, grant, add (a version) or skip."""

    resource: str
    action: str
    detail: str
    gcloud: str = ""
    apply: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @property
    def changes(self) -> bool:
        return self.action not in ("ok", "skip")

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if k != "apply"}


@dataclass
class Clients:
    """The SDK clients setup talks to (one of each, made on first use)."""

    project: str
    made: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        from kndcli.cloud import clients

        if name not in self.made:
            makers = {
                "iam": clients.iam_client,
                "registry": clients.registry_client,
                "secrets": clients.secrets_client,
                "projects": clients.projects_client,
                "storage": lambda: clients.storage_client(self.project),
            }
            self.made[name] = makers[name]()
        return self.made[name]


@contextmanager
def _missing_is(flag: list[bool]) -> Iterator[None]:
    """Inside: a NotFound from Google sets flag[0] instead of raising."""
    from google.api_core import exceptions as api

    try:
        yield
    except api.NotFound:
        flag[0] = True


def plan(opts: SetupOptions, clients: Clients | None = None) -> list[Step]:
    """Read everything the path needs and return the steps, changing nothing."""
    clients = clients or Clients(opts.project)
    steps = [_project(opts, clients)]
    steps += [
        _account(opts, clients, opts.trainer, "knd training jobs (Vertex AI)"),
        _account(opts, clients, opts.server, "knd service (Cloud Run)"),
        _bucket(opts, clients),
        _repository(opts, clients),
        *_secret(opts, clients),
    ]
    trainer = f"serviceAccount:{opts.email(opts.trainer)}"
    server = f"serviceAccount:{opts.email(opts.server)}"
    grants = [(trainer, role) for role in TRAINER_BUCKET_ROLES]
    grants += [(server, role) for role in SERVE_BUCKET_ROLES]
    steps += _bucket_grants(opts, clients, grants)
    steps.append(_secret_grant(opts, clients, server))
    steps += [_act_as(opts, clients, account) for account in (opts.trainer, opts.server)]
    return steps


def apply(
    steps: list[Step], echo: Callable[[str], None] = print, propagation_s: float = PROPAGATION_S
) -> int:
    """Make every change in order; the number made. A failure stops here with an error that
    says how far it got (what is made stays made; a rerun picks up from there)."""
    made = 0
    for step in steps:
        if not step.changes or step.apply is None:
            continue
        try:
            _retry_new_accounts(step.apply, propagation_s, step.resource)
        except CloudError as exc:
            raise CloudError(
                f"{exc} (at: {step.action} {step.resource}; {made} earlier changes were made, "
                "run knd cloud setup --apply again once fixed)"
            ) from None
        echo(f"done    {step.action} {step.resource}")
        made += 1
    return made


def _retry_new_accounts(change: Callable[[], None], propagation_s: float, what: str) -> None:
    """Run a change; while IAM does not know a just-created service account yet (a grant
    naming it: 400 "Service account ... does not exist"; its own policy: 404), retry with
    backoff for up to `propagation_s` (IAM is eventually consistent). Anything else, a
    missing user included, fails at once."""
    from google.api_core import exceptions as api

    deadline = time.monotonic() + propagation_s
    wait = 1.0
    while True:
        with google_errors(what):
            try:
                change()
                return
            except (api.BadRequest, api.NotFound) as exc:
                message = exc.message.lower()
                if isinstance(exc, api.NotFound):  # the policy of an account not seen yet
                    new_account = what.startswith(ACT_AS_ROLE)
                else:  # a grant naming one
                    new_account = "service account" in message and "does not exist" in message
                if not new_account or time.monotonic() + wait > deadline:
                    raise
            except TimeoutError:
                raise CloudError(f"{what}: no answer within its time limit") from None
        time.sleep(wait)
        wait = min(wait * 2, 10.0)


# ----------------------------------------------------------------------------- resources


def _project(opts: SetupOptions, clients: Clients) -> Step:
    with google_errors(f"project {opts.project}"):
        project = clients.get("projects").get_project(name=f"projects/{opts.project}")
    state = project.state.name
    if state != "ACTIVE":
        raise CloudError(f"project {opts.project} is {state}, not ACTIVE")
    number = project.name.rsplit("/", 1)[-1]
    return Step(f"project {opts.project}", "ok", f"number {number}, {state}")


def _account(opts: SetupOptions, clients: Clients, account_id: str, purpose: str) -> Step:
    email = opts.email(account_id)
    missing = [False]
    with google_errors("IAM"), _missing_is(missing):
        clients.get("iam").get_service_account(
            name=f"projects/{opts.project}/serviceAccounts/{email}"
        )
    resource = f"service account {email}"
    if not missing[0]:
        return Step(resource, "ok", "exists")

    def create() -> None:
        clients.get("iam").create_service_account(
            name=f"projects/{opts.project}",
            account_id=account_id,
            service_account={"display_name": purpose},
        )

    gcloud = (
        f"gcloud iam service-accounts create {account_id} --project {opts.project} "
        f'--display-name "{purpose}"'
    )
    return Step(resource, "create", purpose, gcloud, create)


def _bucket(opts: SetupOptions, clients: Clients) -> Step:
    from google.api_core import exceptions as api

    storage = clients.get("storage")
    resource = f"bucket gs://{opts.bucket}"
    with google_errors("Cloud Storage"):
        try:
            bucket = storage.lookup_bucket(opts.bucket)
        except api.Forbidden:
            raise CloudError(
                f"bucket gs://{opts.bucket} exists but this account cannot read it (403): "
                "bucket names are global, so it may be another project's; choose another "
                "--bucket or get access"
            ) from None
    if bucket is not None:
        where = f"exists in {bucket.location}"
        if bucket.location.lower() not in (opts.region.lower(), "us", "eu", "asia"):
            where += f" (not {opts.region}: jobs there read it across regions)"
        return Step(resource, "ok", where)

    def create() -> None:
        new = storage.bucket(opts.bucket)
        new.iam_configuration.uniform_bucket_level_access_enabled = True
        new.iam_configuration.public_access_prevention = "enforced"
        storage.create_bucket(new, location=opts.region)

    gcloud = (
        f"gcloud storage buckets create gs://{opts.bucket} --project {opts.project} "
        f"--location {opts.region} --uniform-bucket-level-access --public-access-prevention"
    )
    detail = f"in {opts.region}, uniform access, public access prevented"
    return Step(resource, "create", detail, gcloud, create)


def _repository(opts: SetupOptions, clients: Clients) -> Step:
    from google.cloud import artifactregistry_v1

    docker = artifactregistry_v1.Repository.Format.DOCKER
    parent = f"projects/{opts.project}/locations/{opts.region}"
    missing = [False]
    with google_errors("Artifact Registry"), _missing_is(missing):
        repository = clients.get("registry").get_repository(
            name=f"{parent}/repositories/{opts.repository}"
        )
    resource = f"repository {opts.registry}"
    if not missing[0]:
        if repository.format_ != docker:
            raise CloudError(
                f"repository {opts.repository} in {opts.region} is a "
                f"{repository.format_.name} repository, not DOCKER: pass --repository NAME"
            )
        return Step(resource, "ok", "Docker repository exists")

    def create() -> None:
        operation = clients.get("registry").create_repository(
            parent=parent,
            repository_id=opts.repository,
            repository={"format_": docker, "description": "knd train and serve images"},
        )
        operation.result(timeout=300)

    gcloud = (
        f"gcloud artifacts repositories create {opts.repository} --project {opts.project} "
        f"--repository-format docker --location {opts.region}"
    )
    return Step(resource, "create", "Docker repository for the images", gcloud, create)


def _secret(opts: SetupOptions, clients: Clients) -> list[Step]:
    name = f"projects/{opts.project}/secrets/{opts.token_secret}"
    missing = [False]
    enabled: list[Any] = []
    with google_errors("Secret Manager"), _missing_is(missing):
        client = clients.get("secrets")
        client.get_secret(name=name)
        enabled = list(
            client.list_secret_versions(request={"parent": name, "filter": "state:ENABLED"})
        )
    resource = f"secret {opts.token_secret}"
    steps = []
    if missing[0]:

        def create() -> None:
            clients.get("secrets").create_secret(
                parent=f"projects/{opts.project}",
                secret_id=opts.token_secret,
                secret={"replication": {"automatic": {}}},
            )

        gcloud = (
            f"gcloud secrets create {opts.token_secret} --project {opts.project} "
            "--replication-policy automatic"
        )
        steps.append(Step(resource, "create", "the service's API token", gcloud, create))
    if enabled:
        steps.append(Step(f"{resource} version", "ok", f"{len(enabled)} enabled"))
        return steps

    def add_version() -> None:
        token = random.token_hex(32)  # never printed; read it with gcloud secrets versions access
        clients.get("secrets").add_secret_version(parent=name, payload={"data": token.encode()})

    gcloud = (
        f"openssl rand -hex 32 | tr -d '\\n' | gcloud secrets versions add {opts.token_secret} "
        f"--project {opts.project} --data-file=-"
    )
    detail = "a random 256-bit token (not printed)"
    steps.append(Step(f"{resource} version", "add", detail, gcloud, add_version))
    return steps


# ----------------------------------------------------------------------------- grants


def _bucket_grants(
    opts: SetupOptions, clients: Clients, grants: list[tuple[str, str]]
) -> list[Step]:
    """The bucket's (member, role) grants, from one read of its policy (none yet: a
    bucket still to be created has no policy)."""
    storage = clients.get("storage")
    bindings: list[dict[str, Any]] = []
    with google_errors("Cloud Storage IAM"), _missing_is([False]):
        bindings = storage.bucket(opts.bucket).get_iam_policy(requested_policy_version=3).bindings
    granted = {
        (member, b["role"]) for b in bindings if not b.get("condition") for member in b["members"]
    }
    return [
        _bucket_grant(opts, storage, member, role, (member, role) in granted)
        for member, role in grants
    ]


def _bucket_grant(opts: SetupOptions, storage: Any, member: str, role: str, has: bool) -> Step:
    resource = f"{role} on gs://{opts.bucket} for {member}"
    if has:
        return Step(resource, "ok", "granted")

    def grant() -> None:
        bucket = storage.bucket(opts.bucket)
        policy = bucket.get_iam_policy(requested_policy_version=3)
        binding = next(
            (b for b in policy.bindings if b["role"] == role and not b.get("condition")), None
        )
        if binding is None:
            policy.bindings.append({"role": role, "members": {member}})
        elif member not in binding["members"]:
            binding["members"].add(member)
        else:
            return
        bucket.set_iam_policy(policy)

    gcloud = (
        f"gcloud storage buckets add-iam-policy-binding gs://{opts.bucket} "
        f"--member {member} --role {role}"
    )
    return Step(resource, "grant", "", gcloud, grant)


def _policy_grant(
    client: Any, resource_name: str, member: str, role: str, what: str
) -> tuple[bool, Callable[[], None]]:
    """Whether a protobuf IAM policy (secrets, service accounts) binds member to role,
    and the read-modify-write that adds it (the etag keeps a concurrent change safe)."""
    missing = [False]
    has = False
    read = {"resource": resource_name, "options": {"requested_policy_version": 3}}
    with google_errors(what), _missing_is(missing):
        policy = client.get_iam_policy(request=read)
        has = any(
            b.role == role and member in b.members and not b.condition.expression
            for b in policy.bindings
        )

    def grant() -> None:
        # Version 3 keeps conditional bindings intact through the read-modify-write.
        policy = client.get_iam_policy(request=read)
        policy.version = 3
        binding = next(
            (b for b in policy.bindings if b.role == role and not b.condition.expression), None
        )
        if binding is None:
            binding = policy.bindings.add(role=role)
        if member in binding.members:
            return
        binding.members.append(member)
        client.set_iam_policy(request={"resource": resource_name, "policy": policy})

    return has, grant


def _secret_grant(opts: SetupOptions, clients: Clients, member: str) -> Step:
    name = f"projects/{opts.project}/secrets/{opts.token_secret}"
    has, grant = _policy_grant(
        clients.get("secrets"), name, member, SECRET_ROLE, "Secret Manager IAM"
    )
    resource = f"{SECRET_ROLE} on secret {opts.token_secret} for {member}"
    if has:
        return Step(resource, "ok", "granted")
    gcloud = (
        f"gcloud secrets add-iam-policy-binding {opts.token_secret} --project {opts.project} "
        f"--member {member} --role {SECRET_ROLE}"
    )
    return Step(resource, "grant", "", gcloud, grant)


def _act_as(opts: SetupOptions, clients: Clients, account_id: str) -> Step:
    email = opts.email(account_id)
    gcloud = (
        f"gcloud iam service-accounts add-iam-policy-binding {email} --project {opts.project} "
        f"--member {opts.deployer or 'user:YOU@EXAMPLE.COM'} --role {ACT_AS_ROLE}"
    )
    if not opts.deployer:
        resource = f"{ACT_AS_ROLE} on {email}"
        detail = "no --deployer: whoever submits or deploys needs it (or roles/owner)"
        return Step(resource, "skip", detail, gcloud)
    name = f"projects/{opts.project}/serviceAccounts/{email}"
    has, grant = _policy_grant(clients.get("iam"), name, opts.deployer, ACT_AS_ROLE, "IAM")
    resource = f"{ACT_AS_ROLE} on {email} for {opts.deployer}"
    if has:
        return Step(resource, "ok", "granted")
    return Step(resource, "grant", "", gcloud, grant)


def next_commands(opts: SetupOptions) -> list[str]:
    """How submit and deploy use what setup made."""
    return [
        f"knd cloud submit --bucket {opts.bucket} --train-image {opts.registry}/train:TAG "
        f"--service-account {opts.email(opts.trainer)} ...",
        f"knd cloud deploy --serve-image {opts.registry}/serve:TAG "
        f"--model gs://{opts.bucket}/runs/RUN/model --log-sink gs://{opts.bucket}/predictions "
        f"--token-secret {opts.token_secret} --service-account {opts.email(opts.server)}",
    ]
