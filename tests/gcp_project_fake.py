"""A loopback fake of one Google Cloud project for `knd cloud setup`: its service accounts
(IAM Admin, over gRPC as the real client speaks it), buckets and their IAM policies (the
Cloud Storage JSON API), Docker repositories (Artifact Registry), secrets with versions and
policies (Secret Manager) and the project itself (Resource Manager), all over REST on a
`FakeGoogle`.

It keeps state, so a test can apply setup and run it again, and it enforces what the real
APIs enforce for these calls: a policy is written with the etag it was read with (409
otherwise), a policy can only name service accounts that exist (400 "does not exist",
also for `lag` writes after an account is created, as IAM is eventually consistent), and
creating what exists is 409.
"""

from __future__ import annotations

import base64
import itertools
import re
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.cloud.iam_admin_v1.types import iam as iam_types
from google.iam.v1 import iam_policy_pb2, policy_pb2

from gcp_fake import FakeGoogle, Request, error_body

PROJECT_NUMBER = "123456789012"


@dataclass
class FakeProject:
    project: str = "p1"
    # Policy writes naming a just-created account that fail before it "propagates".
    lag: int = 0
    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    buckets: dict[str, dict[str, Any]] = field(default_factory=dict)
    repositories: dict[str, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, list[bytes]] = field(default_factory=dict)
    # Policies by resource: {"bindings": [{"role", "members"}], "etag"}.
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Every change made: (what, name); reads are not recorded.
    changes: list[tuple[str, str]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    # Users IAM knows (a grant naming any other user is refused).
    users: set[str] = field(default_factory=lambda: {"alice@example.com", "owner@example.com"})
    # (resource, policy version asked for) of every policy read.
    policy_reads: list[tuple[str, int]] = field(default_factory=list)
    _unseen_policy: dict[str, int] = field(default_factory=dict)
    _unseen: dict[str, int] = field(default_factory=dict)
    _etags: itertools.count = field(default_factory=lambda: itertools.count(1))

    # ------------------------------------------------------------------ shared rules
    def policy(self, resource: str) -> dict[str, Any]:
        return self.policies.setdefault(resource, {"bindings": [], "etag": self._etag()})

    def _etag(self) -> str:
        """Etags are bytes, base64 in JSON (as Google's are)."""
        return base64.b64encode(f"etag-{next(self._etags)}".encode()).decode()

    def write_policy(self, resource: str, bindings: list[dict], etag: str) -> tuple[int, str]:
        """(status, message): the rules every setIamPolicy shares."""
        if etag and etag != self.policy(resource)["etag"]:
            return 409, "There were concurrent policy changes (etag mismatch)"
        ours = f"@{self.project}.iam.gserviceaccount.com"
        for binding in bindings:
            for member in binding["members"]:
                if member.startswith("user:") and member[5:] not in self.users:
                    return 400, f"User {member[5:]} does not exist."
                email = member.removeprefix("serviceAccount:")
                if not (member.startswith("serviceAccount:") and email.endswith(ours)):
                    continue
                if email not in self.accounts or self._unseen.get(email, 0) > 0:
                    self._unseen[email] = max(0, self._unseen.get(email, 0) - 1)
                    self.refused.append(email)
                    return 400, f"Service account {email} does not exist."
        bindings = [{"role": b["role"], "members": sorted(b["members"])} for b in bindings]
        self.policies[resource] = {"bindings": bindings, "etag": self._etag()}
        self.changes.append(("policy", resource))
        return 200, ""

    def members(self, resource: str, role: str) -> set[str]:
        bindings = self.policies.get(resource, {"bindings": []})["bindings"]
        return {m for b in bindings if b["role"] == role for m in b["members"]}

    def roles_of(self, member: str) -> dict[str, set[str]]:
        """Every role a member holds, by resource."""
        held: dict[str, set[str]] = {}
        for resource, policy in self.policies.items():
            for binding in policy["bindings"]:
                if member in binding["members"]:
                    held.setdefault(resource, set()).add(binding["role"])
        return held

    # ------------------------------------------------------------------ REST routes
    def install(self, fake: FakeGoogle) -> None:
        p = re.escape(self.project)
        fake.route("GET", rf"/v3/projects/{p}", self._get_project)
        fake.route("GET", r"/storage/v1/b/([^/]+)", self._get_bucket)
        fake.route("POST", r"/storage/v1/b", self._create_bucket)
        fake.route("GET", r"/storage/v1/b/([^/]+)/iam", self._get_bucket_policy)
        fake.route("PUT", r"/storage/v1/b/([^/]+)/iam", self._set_bucket_policy)
        repos = rf"/v1/projects/{p}/locations/([^/]+)/repositories"
        fake.route("GET", repos + r"/([^/]+)", self._get_repository)
        fake.route("POST", repos, self._create_repository)
        secrets = rf"/v1/projects/{p}/secrets"
        fake.route("GET", secrets + r"/([^/:]+)", self._get_secret)
        fake.route("POST", secrets, self._create_secret)
        fake.route("GET", secrets + r"/([^/:]+)/versions", self._list_versions)
        fake.route("POST", secrets + r"/([^/:]+):addVersion", self._add_version)
        for method in ("GET", "POST"):
            fake.route(method, secrets + r"/([^/:]+):getIamPolicy", self._get_secret_policy)
        fake.route("POST", secrets + r"/([^/:]+):setIamPolicy", self._set_secret_policy)

    def _get_project(self, _r: Request, _m: re.Match) -> tuple[int, dict]:
        return 200, {
            "name": f"projects/{PROJECT_NUMBER}",
            "projectId": self.project,
            "state": "ACTIVE",
        }

    def _get_bucket(self, _r: Request, m: re.Match) -> tuple[int, dict]:
        if m[1] not in self.buckets:
            return 404, error_body(404, f"The specified bucket {m[1]} does not exist.")
        return 200, self.buckets[m[1]]

    def _create_bucket(self, request: Request, _m: re.Match) -> tuple[int, dict]:
        body = request.body or {}
        name = body["name"]
        if name in self.buckets:
            return 409, error_body(409, f"The bucket {name} already exists.")
        self.buckets[name] = {"kind": "storage#bucket", "id": name, **body}
        self.changes.append(("bucket", name))
        return 200, self.buckets[name]

    def _get_bucket_policy(self, _r: Request, m: re.Match) -> tuple[int, dict]:
        if m[1] not in self.buckets:
            return 404, error_body(404, f"The specified bucket {m[1]} does not exist.")
        policy = self.policy(f"b/{m[1]}")
        return 200, {"kind": "storage#policy", "version": 1, **policy}

    def _set_bucket_policy(self, request: Request, m: re.Match) -> tuple[int, dict]:
        if m[1] not in self.buckets:
            return 404, error_body(404, f"The specified bucket {m[1]} does not exist.")
        body = request.body or {}
        status, message = self.write_policy(f"b/{m[1]}", body["bindings"], body.get("etag", ""))
        if status != 200:
            return status, error_body(status, message)
        return 200, {"kind": "storage#policy", **self.policies[f"b/{m[1]}"]}

    def _get_repository(self, _r: Request, m: re.Match) -> tuple[int, dict]:
        name = f"projects/{self.project}/locations/{m[1]}/repositories/{m[2]}"
        if name not in self.repositories:
            return 404, error_body(404, f"Requested entity was not found: {name}")
        return 200, self.repositories[name]

    def _create_repository(self, request: Request, m: re.Match) -> tuple[int, dict]:
        repository_id = request.query["repositoryId"][0]
        name = f"projects/{self.project}/locations/{m[1]}/repositories/{repository_id}"
        if name in self.repositories:
            return 409, error_body(409, f"the repository already exists: {name}")
        self.repositories[name] = {"name": name, **(request.body or {})}
        self.changes.append(("repository", name))
        response = {
            "@type": "type.googleapis.com/google.devtools.artifactregistry.v1.Repository",
            **self.repositories[name],
        }
        return 200, {"name": f"{name}/operations/op-1", "done": True, "response": response}

    def _get_secret(self, _r: Request, m: re.Match) -> tuple[int, dict]:
        name = f"projects/{PROJECT_NUMBER}/secrets/{m[1]}"
        if m[1] not in self.secrets:
            return 404, error_body(404, f"Secret [{name}] not found or has no versions.")
        return 200, self.secrets[m[1]]

    def _create_secret(self, request: Request, _m: re.Match) -> tuple[int, dict]:
        secret_id = request.query["secretId"][0]
        if secret_id in self.secrets:
            return 409, error_body(409, f"Secret [{secret_id}] already exists.")
        name = f"projects/{PROJECT_NUMBER}/secrets/{secret_id}"
        self.secrets[secret_id] = {"name": name, **(request.body or {})}
        self.versions[secret_id] = []
        self.changes.append(("secret", secret_id))
        return 200, self.secrets[secret_id]

    def _list_versions(self, _r: Request, m: re.Match) -> tuple[int, dict]:
        if m[1] not in self.secrets:
            return 404, error_body(404, f"Secret [{m[1]}] not found.")
        name = f"projects/{PROJECT_NUMBER}/secrets/{m[1]}"
        versions = [
            {"name": f"{name}/versions/{i}", "state": "ENABLED"}
            for i, _data in enumerate(self.versions[m[1]], 1)
        ]
        return 200, {"versions": versions, "totalSize": len(versions)}

    def _add_version(self, request: Request, m: re.Match) -> tuple[int, dict]:
        if m[1] not in self.secrets:
            return 404, error_body(404, f"Secret [{m[1]}] not found.")
        self.versions[m[1]].append(base64.b64decode((request.body or {})["payload"]["data"]))
        self.changes.append(("version", m[1]))
        number = len(self.versions[m[1]])
        name = f"projects/{PROJECT_NUMBER}/secrets/{m[1]}/versions/{number}"
        return 200, {"name": name, "state": "ENABLED"}

    def _get_secret_policy(self, request: Request, m: re.Match) -> tuple[int, dict]:
        version = int(request.query.get("options.requestedPolicyVersion", ["0"])[0])
        self.policy_reads.append((f"secrets/{m[1]}", version))
        if m[1] not in self.secrets:
            return 404, error_body(404, f"Secret [{m[1]}] not found.")
        return 200, self.policy(f"secrets/{m[1]}")

    def _set_secret_policy(self, request: Request, m: re.Match) -> tuple[int, dict]:
        if m[1] not in self.secrets:
            return 404, error_body(404, f"Secret [{m[1]}] not found.")
        policy = (request.body or {})["policy"]
        status, message = self.write_policy(
            f"secrets/{m[1]}", policy.get("bindings", []), policy.get("etag", "")
        )
        if status != 200:
            return status, error_body(status, message)
        return 200, self.policies[f"secrets/{m[1]}"]

    # ------------------------------------------------------------------ IAM over gRPC
    def serve_iam(self) -> tuple[grpc.Server, str]:
        """A gRPC server on 127.0.0.1 for google.iam.admin.v1.IAM; (server, endpoint)."""

        def email_of(name: str) -> str:
            return name.rsplit("/", 1)[-1]

        def get_account(request: Any, context: grpc.ServicerContext) -> Any:
            email = email_of(request.name)
            if email not in self.accounts:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Unknown service account {email}")
            return iam_types.ServiceAccount(**self.accounts[email])

        def create_account(request: Any, context: grpc.ServicerContext) -> Any:
            email = f"{request.account_id}@{self.project}.iam.gserviceaccount.com"
            if email in self.accounts:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{email} already exists")
            self.accounts[email] = {
                "name": f"projects/{self.project}/serviceAccounts/{email}",
                "email": email,
                "project_id": self.project,
                "display_name": request.service_account.display_name,
            }
            self._unseen[email] = self.lag
            self._unseen_policy[email] = self.lag
            self.changes.append(("account", email))
            return iam_types.ServiceAccount(**self.accounts[email])

        def get_policy(request: Any, context: grpc.ServicerContext) -> Any:
            email = email_of(request.resource)
            self.policy_reads.append((request.resource, request.options.requested_policy_version))
            if email not in self.accounts or self._unseen_policy.get(email, 0) > 0:
                self._unseen_policy[email] = max(0, self._unseen_policy.get(email, 0) - 1)
                context.abort(grpc.StatusCode.NOT_FOUND, f"Unknown {request.resource}")
            policy = self.policy(request.resource)
            return policy_pb2.Policy(
                bindings=[policy_pb2.Binding(**b) for b in policy["bindings"]],
                etag=base64.b64decode(policy["etag"]),
            )

        def set_policy(request: Any, context: grpc.ServicerContext) -> Any:
            if email_of(request.resource) not in self.accounts:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Unknown {request.resource}")
            bindings = [
                {"role": b.role, "members": list(b.members)} for b in request.policy.bindings
            ]
            status, message = self.write_policy(
                request.resource, bindings, base64.b64encode(request.policy.etag).decode()
            )
            if status != 200:
                code = (
                    grpc.StatusCode.ABORTED if status == 409 else grpc.StatusCode.INVALID_ARGUMENT
                )
                context.abort(code, message)
            policy = self.policy(request.resource)
            return policy_pb2.Policy(
                bindings=[policy_pb2.Binding(**b) for b in policy["bindings"]],
                etag=base64.b64decode(policy["etag"]),
            )

        def unary(fn: Any, request_type: Any, response_type: Any) -> grpc.RpcMethodHandler:
            decode = getattr(request_type, "deserialize", None) or request_type.FromString
            encode = getattr(response_type, "serialize", None) or response_type.SerializeToString
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=decode, response_serializer=encode
            )

        handlers = {
            "GetServiceAccount": unary(
                get_account, iam_types.GetServiceAccountRequest, iam_types.ServiceAccount
            ),
            "CreateServiceAccount": unary(
                create_account, iam_types.CreateServiceAccountRequest, iam_types.ServiceAccount
            ),
            "GetIamPolicy": unary(
                get_policy, iam_policy_pb2.GetIamPolicyRequest, policy_pb2.Policy
            ),
            "SetIamPolicy": unary(
                set_policy, iam_policy_pb2.SetIamPolicyRequest, policy_pb2.Policy
            ),
        }
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("google.iam.admin.v1.IAM", handlers),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        return server, f"http://127.0.0.1:{port}"
