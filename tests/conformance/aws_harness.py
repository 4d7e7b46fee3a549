"""The conformance harness of the aws plugin (``iam_user``): moto's server mode with IAM auth on.

Registered in ``harnesses.HARNESSES`` as ``"tests.conformance.aws_harness:aws_harness"``.

moto accepts any key by default, which would make every "the key works / the
key stopped working" check meaningless. With ``INITIAL_NO_AUTH_ACTION_COUNT=N``
moto serves the first N actions unauthenticated and then checks every request:
the access key must exist in its IAM, the SigV4 signature must match the
secret, and the user's policies must allow the action. ``moto_with_auth`` uses
those N free calls to create an admin user with an access key (the mount's
``access_key`` + secret) and then proves that enforcement is on.

AWS has no sessions: every request is signed and checked on its own. A
"session" here is a pair of clients holding an issued key; it is "alive"
while a signed call with that key succeeds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from broker.backend import MountSpec, RoleSpec
from broker.conformance import BROKEN_ROLE, ROLE, BackendHarness, FixtureLookup
from tests.conftest import free_port, server_missing

__all__ = [
    "AUTH_FAILURES",
    "BOOTSTRAP_CALLS",
    "AWSHarness",
    "AWSSession",
    "LeastPrivilegeAWSHarness",
    "MotoAuth",
    "aws_harness",
    "least_privilege_aws_harness",
    "moto_with_auth",
]

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
#: The unauthenticated actions the bootstrap makes: create_user, put_user_policy,
#: create_access_key. moto counts every action, so this must match exactly: one
#: more and an unsigned request would still pass; one fewer and bootstrap fails.
BOOTSTRAP_CALLS = 3
#: Error codes meaning "this key/signature is not accepted" (not "not allowed").
AUTH_FAILURES = frozenset({"InvalidClientTokenId", "SignatureDoesNotMatch",
                           "InvalidAccessKeyId", "AuthFailure"})
ALLOW_ALL = {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
#: What ROLE grants, and so what ``exercise`` uses. Deliberately narrow:
#: ``exercise`` also checks an action outside it is refused.
ROLE_POLICY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["iam:GetUser", "sts:GetCallerIdentity"], "Resource": "*"}]}
#: A managed policy that does not exist: AWS refuses the attach (NoSuchEntity)
#: after the user was created, so BROKEN_ROLE fails mid-issue, non-retryably.
MISSING_POLICY_ARN = f"arn:aws:iam::{ACCOUNT}:policy/broker-kit-does-not-exist"


@dataclass(frozen=True)
class MotoAuth:
    """A moto server that checks credentials, and the admin key bootstrapped into it."""

    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)


def _client(endpoint: str, service: str, key: str, secret: str,
            token: str | None = None) -> Any:
    session = boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret,
                                    aws_session_token=token, region_name=REGION)
    # No retries: an auth failure must surface as it is, and fast.
    cfg = BotoConfig(retries={"mode": "standard", "max_attempts": 1},
                     connect_timeout=5, read_timeout=30)
    return session.client(service, endpoint_url=endpoint, config=cfg)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _bootstrap(endpoint: str) -> MotoAuth:
    """Spend the free actions on an admin user and key; prove auth is enforced afterwards."""
    iam = _client(endpoint, "iam", "bootstrap", "bootstrap")
    try:
        name = f"broker-kit-admin-{secrets.token_hex(3)}"
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="admin",
                            PolicyDocument=json.dumps(ALLOW_ALL))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        try:
            iam.list_users()
        except ClientError as exc:
            if _code(exc) not in AUTH_FAILURES:
                raise
        else:
            raise AssertionError("moto accepted an unknown access key after the bootstrap: "
                                 "INITIAL_NO_AUTH_ACTION_COUNT is not in effect")
    finally:
        iam.close()
    auth = MotoAuth(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    sts = _client(endpoint, "sts", auth.access_key, auth.secret_key)
    try:
        arn = sts.get_caller_identity()["Arn"]
    finally:
        sts.close()
    assert arn.endswith(f":user/{name}"), arn
    return auth


@contextmanager
def moto_with_auth() -> Iterator[MotoAuth]:
    """Run a moto server that enforces IAM auth; yield its admin credentials."""
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable),
                                                      "moto_server")
    if not os.path.exists(exe):
        server_missing("moto_server (pip install 'moto[server]')")
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(BOOTSTRAP_CALLS)}
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _tcp_open(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                server_missing("moto_server (with INITIAL_NO_AUTH_ACTION_COUNT) did not start")
            time.sleep(0.1)
        yield _bootstrap(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class AWSSession:
    """Clients holding one issued access key (AWS has no connection to keep open)."""

    access_key: str
    sts: Any
    iam: Any
    arn: str


def _role(name: str, **options: Any) -> RoleSpec:
    return RoleSpec(name=name, default_ttl=3600, max_ttl=86400,
                    options={"credential_type": "iam_user", **options})


class AWSHarness(BackendHarness):
    """The aws plugin issuing ``iam_user`` credentials under a path of its own, on moto with auth."""

    def __init__(self, auth: MotoAuth) -> None:
        self.auth = auth
        tag = secrets.token_hex(3)
        self.mount_name = f"kit{tag}"
        # Every user this mount creates lives under this path: cleanup by path, and
        # the plugin refuses to delete users outside it.
        self.iam_path = f"/broker-kit-{tag}/"
        self._iam: Any = None

    @classmethod
    def factory(cls, fixture: FixtureLookup) -> AWSHarness:
        return cls(fixture("moto_auth"))

    # -- admin side (own client, never the plugin's) ---------------------------

    @property
    def admin(self) -> Any:
        assert self._iam is not None, "setup() not run"
        return self._iam

    async def setup(self) -> None:
        self._iam = await asyncio.to_thread(
            _client, self.auth.endpoint, "iam", self.auth.access_key, self.auth.secret_key)

    async def teardown(self) -> None:
        if self._iam is None:
            return
        try:
            await asyncio.to_thread(self._remove_leftovers)
        finally:
            await asyncio.to_thread(self._iam.close)
            self._iam = None

    def _remove_leftovers(self) -> None:
        users = self.admin.list_users(PathPrefix=self.iam_path).get("Users", [])
        for user in users:
            name = user["UserName"]
            for key in self.admin.list_access_keys(UserName=name)["AccessKeyMetadata"]:
                self.admin.delete_access_key(UserName=name, AccessKeyId=key["AccessKeyId"])
            for policy in self.admin.list_user_policies(UserName=name)["PolicyNames"]:
                self.admin.delete_user_policy(UserName=name, PolicyName=policy)
            for att in self.admin.list_attached_user_policies(UserName=name)["AttachedPolicies"]:
                self.admin.detach_user_policy(UserName=name, PolicyArn=att["PolicyArn"])
            self.admin.delete_user(UserName=name)

    # -- BackendHarness -------------------------------------------------------

    def make_mount(self, *, reachable: bool = True, **options: Any) -> MountSpec:
        endpoint = self.auth.endpoint if reachable else f"http://127.0.0.1:{free_port()}"
        roles = {
            ROLE: _role(ROLE, policy_document=ROLE_POLICY),
            # The aws plugin takes no statements and AWS makes its own secrets, so
            # {{password}} cannot reach AWS: this role fails at AWS mid-issue instead.
            BROKEN_ROLE: _role(BROKEN_ROLE, policy_document=ROLE_POLICY,
                               policy_arns=[MISSING_POLICY_ARN]),
        }
        return MountSpec(
            name=self.mount_name,
            plugin="aws",
            roles=roles,
            secret=self.auth.secret_key,
            options={"region": REGION, "endpoint_url": endpoint,
                     "access_key": self.auth.access_key, "iam_path": self.iam_path,
                     **options},
        )

    def _open(self, data: Mapping[str, Any]) -> AWSSession:
        key, secret = str(data["access_key"]), str(data["secret_key"])
        token = data.get("security_token")
        sts = _client(self.auth.endpoint, "sts", key, secret, token)
        iam = _client(self.auth.endpoint, "iam", key, secret, token)
        try:
            arn = str(sts.get_caller_identity()["Arn"])
        except BaseException:
            sts.close()
            iam.close()
            raise
        return AWSSession(access_key=key, sts=sts, iam=iam, arn=arn)

    async def connect_as(self, data: Mapping[str, Any]) -> AWSSession:
        """A signed sts:GetCallerIdentity with the issued key (moto always allows it)."""
        return await asyncio.to_thread(self._open, data)

    def _exercise(self, session: AWSSession) -> None:
        user = session.iam.get_user()["User"]
        assert session.arn == user["Arn"], (session.arn, user["Arn"])
        assert user["Path"] == self.iam_path
        # Without this, a moto that allowed everything would pass the line above.
        try:
            session.iam.list_users()
        except ClientError as exc:
            if _code(exc) != "AccessDenied":
                raise
        else:
            raise AssertionError("iam:ListUsers is outside the role's policy but was allowed")

    async def exercise(self, session: AWSSession) -> None:
        """iam:GetUser (granted by the role's policy) works; iam:ListUsers (not granted) does not."""
        await asyncio.to_thread(self._exercise, session)

    def _alive(self, session: AWSSession) -> bool:
        try:
            session.sts.get_caller_identity()
        except ClientError as exc:
            if _code(exc) in AUTH_FAILURES:
                return False
            raise
        return True

    async def session_alive(self, session: AWSSession) -> bool:
        """Whether the held key still makes a signed call (AWS checks each request)."""
        return await asyncio.to_thread(self._alive, session)

    async def close_session(self, session: AWSSession) -> None:
        for client in (session.sts, session.iam):
            try:
                await asyncio.to_thread(client.close)
            except Exception:  # noqa: S110 - close must never raise
                pass

    def _user_exists(self, username: str) -> bool:
        try:
            self.admin.get_user(UserName=username)
        except ClientError as exc:
            if _code(exc) == "NoSuchEntity":
                return False
            raise
        return True

    async def user_exists(self, username: str) -> bool:
        return await asyncio.to_thread(self._user_exists, username)

    def wrong_credentials(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """The issued key id with a different secret key: the signature cannot match."""
        secret = str(data["secret_key"])
        wrong = secrets.token_urlsafe(len(secret))[: len(secret)]
        return {**data, "secret_key": wrong}

    def secret_values(self) -> list[str]:
        return [self.auth.secret_key]


def aws_harness(fixture: FixtureLookup) -> AWSHarness:
    """The factory ``harnesses.HARNESSES`` names (a plain function: a "module:attr" spec)."""
    return AWSHarness.factory(fixture)


#: The actions docs/aws.md lists for a mount issuing ``iam_user`` credentials.
LEASE_USER_ACTIONS = [
    "iam:CreateUser", "iam:TagUser", "iam:GetUser", "iam:DeleteUser",
    "iam:PutUserPolicy", "iam:DeleteUserPolicy", "iam:ListUserPolicies",
    "iam:AttachUserPolicy", "iam:DetachUserPolicy", "iam:ListAttachedUserPolicies",
    "iam:ListGroupsForUser", "iam:CreateAccessKey", "iam:DeleteAccessKey",
    "iam:ListAccessKeys", "iam:DeleteLoginProfile", "iam:ListMFADevices",
    "iam:DeactivateMFADevice", "iam:ListSigningCertificates",
    "iam:DeleteSigningCertificate", "iam:ListSSHPublicKeys", "iam:DeleteSSHPublicKey",
]
LEASE_GROUP_ACTIONS = ["iam:AddUserToGroup", "iam:RemoveUserFromGroup"]
ROTATE_ROOT_ACTIONS = ["iam:GetUser", "iam:ListAccessKeys", "iam:CreateAccessKey",
                       "iam:DeleteAccessKey"]


def broker_policy() -> dict[str, Any]:
    """docs/aws.md's policy with every resource ``*``.

    moto authorizes each IAM call against the resource ``*``, so a statement
    scoped to an ARN would never match there: this checks the actions only.
    """
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["sts:GetCallerIdentity"], "Resource": "*"},
        {"Effect": "Allow", "Action": LEASE_USER_ACTIONS, "Resource": "*"},
        {"Effect": "Allow", "Action": LEASE_GROUP_ACTIONS, "Resource": "*"},
        {"Effect": "Allow", "Action": ROTATE_ROOT_ACTIONS, "Resource": "*"},
    ]}


class LeastPrivilegeAWSHarness(AWSHarness):
    """The aws plugin signing as an IAM user holding only :func:`broker_policy`'s actions.

    moto checks a policy's actions, not its resource ARNs (see
    :func:`broker_policy`), so this proves the list of actions in docs/aws.md
    is enough, not its scope.
    """

    def __init__(self, auth: MotoAuth) -> None:
        super().__init__(auth)
        self.mount_user = f"broker-kit-lp-{self.iam_path.strip('/').rsplit('-', 1)[1]}"
        self._key: dict[str, str] = {}

    async def setup(self) -> None:
        await super().setup()
        await asyncio.to_thread(self._create_mount_user)

    def _create_mount_user(self) -> None:
        self.admin.create_user(UserName=self.mount_user)
        self.admin.put_user_policy(UserName=self.mount_user, PolicyName="broker",
                                   PolicyDocument=json.dumps(broker_policy()))
        key = self.admin.create_access_key(UserName=self.mount_user)["AccessKey"]
        self._key = {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}

    async def teardown(self) -> None:
        try:
            if self._iam is not None:
                await asyncio.to_thread(self._delete_mount_user)
        finally:
            await super().teardown()

    def _delete_mount_user(self) -> None:
        try:
            for key in self.admin.list_access_keys(UserName=self.mount_user)["AccessKeyMetadata"]:
                self.admin.delete_access_key(UserName=self.mount_user,
                                             AccessKeyId=key["AccessKeyId"])
            self.admin.delete_user_policy(UserName=self.mount_user, PolicyName="broker")
            self.admin.delete_user(UserName=self.mount_user)
        except ClientError as exc:
            if _code(exc) != "NoSuchEntity":  # setup failed before making it
                raise

    def make_mount(self, *, reachable: bool = True, **options: Any) -> MountSpec:
        mount = super().make_mount(reachable=reachable, **options)
        return dataclasses.replace(
            mount, secret=self._key["secret"],
            options={**mount.options, "access_key": self._key["id"], **options})

    def secret_values(self) -> list[str]:
        return [*super().secret_values(), self._key.get("secret", "")]


def least_privilege_aws_harness(fixture: FixtureLookup) -> AWSHarness:
    """``harnesses.HARNESSES``' "aws-least-privilege"."""
    return LeastPrivilegeAWSHarness.factory(fixture)
