"""The AWS backend: STS credentials (assumed_role, federation_token, session_token) and IAM users.

boto3 is blocking, so every AWS call runs in a worker thread via
``asyncio.to_thread``; each operation (issue, revoke, rotate) is one sync
function in ``plugins.aws_sts`` / ``plugins.aws_iam`` run in one thread hop.
Clients are created once per backend (they are thread-safe once created).

STS credentials cannot be revoked by AWS API; the mount declares that
(``can_revoke=False``) instead of pretending. For assumed roles an early revoke
still cuts the session off with a deny policy on the role (see docs/aws.md).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from broker.backend import (
    BackendError,
    Capabilities,
    DeleteUserRequest,
    DeleteUserResponse,
    MountSpec,
    NewUserRequest,
    NewUserResponse,
    PluginConfigError,
    RenewUserRequest,
    RenewUserResponse,
    RoleSpec,
    RotateRootRequest,
    RotateRootResponse,
)
from broker.durations import parse_duration
from plugins import aws_iam, aws_sts

__all__ = ["CREDENTIAL_TYPES", "AWSBackend", "AWSError", "AWSRole", "AWSRotateRootResponse"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Vault's names for the credential types.
CREDENTIAL_TYPES = ("assumed_role", "federation_token", "session_token", "iam_user")
STS_TYPES = frozenset({"assumed_role", "federation_token", "session_token"})
ENV_NAMES = {
    "access_key": "AWS_ACCESS_KEY_ID",
    "secret_key": "AWS_SECRET_ACCESS_KEY",
    "security_token": "AWS_SESSION_TOKEN",
}
_MOUNT_KEYS = {"region", "endpoint_url", "sts_endpoint_url", "iam_endpoint_url", "access_key",
               "iam_path"}
_POLICY_KEYS = {"policy_document", "policy", "policy_arns"}
_ROLE_KEYS: dict[str, set[str]] = {
    "assumed_role": {"role_arns", "session_tags", "tag_metadata", "external_id", "max_sts_ttl",
                     *_POLICY_KEYS},
    "federation_token": {"session_tags", "tag_metadata", "max_sts_ttl", *_POLICY_KEYS},
    "session_token": {"max_sts_ttl"},
    "iam_user": {"iam_groups", "permissions_boundary_arn", "tag_metadata", *_POLICY_KEYS},
}
#: (default, largest) STS duration per type, as AWS allows them.
_STS_TTL = {"assumed_role": (3600, 43200), "federation_token": (43200, 129600),
            "session_token": (43200, 129600)}
STS_MIN_TTL = 900
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$", re.ASCII)
_POLICY_ARN = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}|aws):policy/[\w+=,.@/-]+$", re.ASCII)
_NAME_UNSAFE = re.compile(r"[^\w+=,.@-]", re.ASCII)
#: AWS error codes that say the request itself is wrong: retrying will not help.
_NOT_RETRYABLE = frozenset({
    "ValidationError", "MalformedPolicyDocument", "InvalidInput", "InvalidParameterValue",
    "InvalidParameterCombination", "PackedPolicyTooLarge", "LimitExceeded",
    "RegionDisabledException", "EntityAlreadyExists", "NoSuchEntity",
})
#: AWS error codes that refuse the mount's own credentials or permissions: retrying the
#: same call with the same key will not help (rotate-root answers them with a 400).
_REFUSED = frozenset({
    "AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "InvalidClientTokenId",
    "SignatureDoesNotMatch", "IncompleteSignature", "InvalidAccessKeyId", "OptInRequired",
})
#: deny policies must outlive the session by this much to count as needed (clock skew).
_EXPIRY_SLACK = 5.0


@dataclass
class _Creation:
    """One IAM user creation running in a worker thread."""

    lease_id: str
    #: set by the thread when it has finished (made the user, failed, or cleaned up).
    done: threading.Event = field(default_factory=threading.Event)
    #: set when the issue stops waiting: the thread undoes what it made and ends.
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class AWSRole:
    """The aws-specific options of one role, validated."""

    credential_type: str
    role_arns: tuple[str, ...] = ()
    policy_arns: tuple[str, ...] = ()
    #: compact JSON, or None.
    policy_document: str | None = None
    iam_groups: tuple[str, ...] = ()
    permissions_boundary_arn: str | None = None
    session_tags: Mapping[str, str] = field(default_factory=dict)
    tag_metadata: bool = False
    external_id: str | None = None
    #: longest STS duration asked for (seconds).
    max_sts_ttl: int = 3600


class AWSError(BackendError):
    """A BackendError from an AWS answer, with AWS's error code (None: no answer)."""

    def __init__(self, message: str, *, retryable: bool, code: str | None) -> None:
        super().__init__(message, retryable=retryable)
        self.code = code


@dataclass(frozen=True)
class AWSRotateRootResponse(RotateRootResponse):
    """RotateRootResponse plus the new access key id (not a secret) for the config's access_key."""

    access_key_id: str | None = None


def aws_name(username: str, limit: int) -> str:
    """The broker's username as an AWS name: allowed characters only, at most ``limit``."""
    return _NAME_UNSAFE.sub("-", username)[:limit]


def parse_role(role: RoleSpec) -> AWSRole:
    """Validate the role's options; PluginConfigError names the key."""
    opts = dict(role.options)
    for stmt_key in ("creation_statements", "renew_statements", "revocation_statements",
                     "rollback_statements"):
        if getattr(role, stmt_key):
            raise PluginConfigError(stmt_key, "not used by the aws plugin; remove it")
    ctype = opts.get("credential_type")
    if ctype not in CREDENTIAL_TYPES:
        raise PluginConfigError("credential_type",
                                f"expected one of {', '.join(CREDENTIAL_TYPES)}, got {ctype!r}")
    allowed = _ROLE_KEYS[ctype] | {"credential_type"}
    for key in opts:
        if key not in allowed:
            raise PluginConfigError(key, f"unknown key for credential_type {ctype!r}; "
                                         f"allowed: {', '.join(sorted(allowed))}",
                                    known=allowed)
    role_arns = _strings(opts, "role_arns")
    for arn in role_arns:
        if not _ROLE_ARN.match(arn):
            raise PluginConfigError("role_arns", f"not an IAM role ARN: {arn!r}")
    if ctype == "assumed_role" and not role_arns:
        raise PluginConfigError("role_arns", "assumed_role needs at least one role ARN")
    policy_arns = _strings(opts, "policy_arns")
    for arn in policy_arns:
        if not _POLICY_ARN.match(arn):
            raise PluginConfigError("policy_arns", f"not an IAM policy ARN: {arn!r}")
    if ctype != "iam_user" and len(policy_arns) > 10:
        raise PluginConfigError("policy_arns", "STS accepts at most 10 session policy ARNs")
    document = _policy_document(opts)
    groups = _strings(opts, "iam_groups")
    if ctype in {"federation_token", "iam_user"} and not (document or policy_arns or groups):
        need = "policy_document, policy_arns or iam_groups" if ctype == "iam_user" else \
            "policy_document or policy_arns"
        raise PluginConfigError(need.split(",")[0].split(" ")[0],
                                f"{ctype} has no permissions without {need}")
    tags = opts.get("session_tags", {})
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise PluginConfigError("session_tags", "expected a table of string = string")
    for key, value in tags.items():
        if not aws_sts.valid_tag(key, value):
            raise PluginConfigError("session_tags", f"invalid tag {key!r} (keys 1-128 chars, "
                                    "values up to 256, letters digits space _.:/=+-@, no aws:)")
    if len(tags) > aws_sts.MAX_SESSION_TAGS:
        raise PluginConfigError("session_tags", f"at most {aws_sts.MAX_SESSION_TAGS} tags")
    tag_metadata = opts.get("tag_metadata", False)
    if not isinstance(tag_metadata, bool):
        raise PluginConfigError("tag_metadata", "expected true or false")
    external_id = opts.get("external_id")
    if external_id is not None and not (isinstance(external_id, str) and external_id):
        raise PluginConfigError("external_id", "expected a non-empty string")
    boundary = opts.get("permissions_boundary_arn")
    if boundary is not None and not (isinstance(boundary, str) and _POLICY_ARN.match(boundary)):
        raise PluginConfigError("permissions_boundary_arn", "expected an IAM policy ARN")
    default_max, largest = _STS_TTL.get(ctype, (0, 0))
    max_sts_ttl = default_max
    if "max_sts_ttl" in opts:
        try:
            max_sts_ttl = parse_duration(opts["max_sts_ttl"])
        except ValueError as exc:
            raise PluginConfigError("max_sts_ttl", str(exc)) from None
        if not STS_MIN_TTL <= max_sts_ttl <= largest:
            raise PluginConfigError("max_sts_ttl",
                                    f"must be between {STS_MIN_TTL}s and {largest}s for {ctype}")
    return AWSRole(
        credential_type=ctype, role_arns=role_arns, policy_arns=policy_arns,
        policy_document=document, iam_groups=groups, permissions_boundary_arn=boundary,
        session_tags=dict(tags), tag_metadata=tag_metadata, external_id=external_id,
        max_sts_ttl=max_sts_ttl,
    )


def _strings(opts: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = opts.get(key, [])
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
        raise PluginConfigError(key, "expected a list of strings")
    return tuple(items)


def _policy_document(opts: Mapping[str, Any]) -> str | None:
    # Vault calls it policy_document; "policy" is accepted as the STS API's own name.
    if "policy_document" in opts and "policy" in opts:
        raise PluginConfigError("policy", "set policy_document or policy, not both")
    key = "policy" if "policy" in opts else "policy_document"
    raw = opts.get(key)
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise PluginConfigError(key, f"not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or "Statement" not in raw:
        raise PluginConfigError(key, "expected an IAM policy (a JSON object with Statement)")
    return json.dumps(raw, separators=(",", ":"))


def _capabilities(types: set[str]) -> Capabilities:
    """One Capabilities per mount: a mixed mount declares the weakest promise.

    ``can_renew`` is false for every mount: it means "renew_user pushes a new
    expiry to the backend", and neither kind has one to push. IAM users have no
    expiry at AWS (the broker's expiry deletes them; their leases stay renewable
    in the broker, like MySQL's), and STS credentials cannot be extended at all
    (their leases say ``renewable: false`` via NewUserResponse.renewable).
    """
    max_name = 32 if "federation_token" in types else 64
    if types <= {"iam_user"}:  # (also a mount without roles)
        return Capabilities(can_renew=False, can_revoke=True, server_side_expiry=False,
                            max_username_length=max_name, env_names=ENV_NAMES)
    # STS credentials live until AWS expires them; IAM users in a mixed mount are
    # still revoked for real.
    return Capabilities(can_renew=False, can_revoke=False,
                        server_side_expiry=types <= STS_TYPES,
                        max_username_length=max_name, env_names=ENV_NAMES)


class AWSBackend:
    """One ``plugin = "aws"`` mount."""

    def __init__(self, mount: MountSpec, roles: Mapping[str, AWSRole]) -> None:
        opts = mount.options
        self.mount = mount
        self.roles = dict(roles)
        self.region: str | None = opts.get("region")
        self.sts_endpoint: str | None = opts.get("sts_endpoint_url", opts.get("endpoint_url"))
        self.iam_endpoint: str | None = opts.get("iam_endpoint_url", opts.get("endpoint_url"))
        self.access_key: str | None = opts.get("access_key")
        self._secret: str | None = mount.secret
        self.iam_path: str = opts.get("iam_path", "/broker/")
        self.capabilities = _capabilities({r.credential_type for r in roles.values()})
        #: replaceable in tests: the time used for TTL math and deny-policy pruning.
        self.clock: Callable[[], float] = time.time
        #: role inline policy size limit (AWS: 10,240 characters, whitespace not counted).
        self.policy_size_limit = aws_sts.ROLE_POLICY_LIMIT
        #: how long rotate_root waits for a new access key to start working (IAM is eventual).
        self.key_wait_timeout = 30.0
        self._sts: Any = None
        self._iam: Any = None
        self._init_lock = asyncio.Lock()
        self._caller_arn: str | None = None
        # Deny-policy updates are read-modify-write: one writer per role at a time.
        self._role_locks: dict[str, threading.Lock] = {}
        self._role_locks_guard = threading.Lock()
        #: role ARN -> when its deny policy next has an entry to prune.
        self._prune_due: dict[str, float] = {}
        # A timed-out issue cannot stop its boto3 thread: a delete of that username
        # waits for the thread, or the thread would create the user after the delete.
        self._creations: dict[str, list[_Creation]] = {}
        self._creations_guard = threading.Lock()
        #: how long a delete waits for an in-flight creation of the same name.
        self.creation_wait = 10.0

    # -- factory ----------------------------------------------------------------------------

    @classmethod
    def validate_role(cls, role: RoleSpec) -> None:
        """Raise PluginConfigError keyed ``roles.NAME.KEY`` (the loader adds the mount prefix)."""
        try:
            parse_role(role)
        except PluginConfigError as exc:
            raise PluginConfigError(f"roles.{role.name}.{exc.key}", exc.message,
                                    known=exc.known) from None

    @classmethod
    def from_config(cls, mount: MountSpec) -> AWSBackend:
        """Validate the mount's options (no I/O) and build the backend."""
        opts = mount.options
        for key in opts:
            if key not in _MOUNT_KEYS:
                allowed = ", ".join(sorted(_MOUNT_KEYS))
                raise PluginConfigError(key, f"unknown key; allowed: {allowed}",
                                        known=_MOUNT_KEYS)
        for key in _MOUNT_KEYS:
            if key in opts and not (isinstance(opts[key], str) and opts[key]):
                raise PluginConfigError(key, "expected a non-empty string")
        for key in ("endpoint_url", "sts_endpoint_url", "iam_endpoint_url"):
            if key in opts and not str(opts[key]).startswith(("http://", "https://")):
                raise PluginConfigError(key, "expected an http:// or https:// URL")
        path = opts.get("iam_path", "/broker/")
        if not (path.startswith("/") and path.endswith("/")) or len(path) > 512:
            raise PluginConfigError("iam_path", "must start and end with '/' (e.g. \"/broker/\")")
        if opts.get("access_key") and not mount.secret:
            raise PluginConfigError("access_key", "needs the secret key in password_file or "
                                                  "password_env")
        if mount.secret and not opts.get("access_key"):
            raise PluginConfigError("access_key", "password_file/password_env hold the secret "
                                                  "key; set access_key to its key id")
        roles = {}
        for name, spec in mount.roles.items():
            try:
                roles[name] = parse_role(spec)
            except PluginConfigError as exc:
                raise PluginConfigError(f"roles.{name}.{exc.key}", exc.message,
                                        known=exc.known) from None
        return cls(mount, roles)

    # -- lifecycle --------------------------------------------------------------------------

    def _make_clients(self, access_key: str | None, secret: str | None) -> tuple[Any, Any]:
        # Session() reads env/shared config/instance metadata: blocking, so called in a thread.
        session = boto3.session.Session(aws_access_key_id=access_key,
                                        aws_secret_access_key=secret, region_name=self.region)
        cfg = BotoConfig(retries={"mode": "standard", "max_attempts": 3},
                         connect_timeout=5, read_timeout=20)
        sts = session.client("sts", endpoint_url=self.sts_endpoint, config=cfg)
        iam = session.client("iam", endpoint_url=self.iam_endpoint, config=cfg)
        return sts, iam

    async def initialize(self) -> None:
        await self._clients()

    async def _clients(self) -> tuple[Any, Any]:
        if self._sts is None:
            async with self._init_lock:
                if self._sts is None:
                    sts, iam = await self._run("creating clients", self._make_clients,
                                               self.access_key, self._secret)
                    self._sts, self._iam = sts, iam
        return self._sts, self._iam

    async def verify(self) -> None:
        sts, _ = await self._clients()
        ident = await self._run("sts:GetCallerIdentity", lambda: sts.get_caller_identity())
        self._caller_arn = ident["Arn"]

    async def close(self) -> None:
        sts, iam = self._sts, self._iam
        self._sts = self._iam = None
        for client in (sts, iam):
            if client is not None:
                await asyncio.to_thread(client.close)

    # -- credentials ------------------------------------------------------------------------

    def _role(self, spec: RoleSpec) -> AWSRole:
        # Roles are parsed in from_config; a role built later (tests, reload) is parsed here.
        known = self.roles.get(spec.name)
        return known if known is not None and self.mount.roles.get(spec.name) == spec \
            else parse_role(spec)

    async def new_user(self, req: NewUserRequest) -> NewUserResponse:
        role = self._role(req.role)
        sts, iam = await self._clients()
        now = self.clock()
        if role.credential_type == "iam_user":
            name = aws_name(req.username, 64)
            # The lease id tag goes first, as a configured tag: lease metadata can neither
            # override it nor push the user past IAM's 50 tags.
            tags = aws_sts.build_tags({aws_iam.LEASE_ID_TAG: req.lease_id[:256]},
                                      req.metadata if role.tag_metadata else {})
            creation = _Creation(lease_id=req.lease_id[:256])
            with self._creations_guard:
                self._creations.setdefault(name, []).append(creation)
            handed_out = False
            try:
                data, revocation = await self._run(
                    "creating IAM user", self._create_tracked, creation, iam, name,
                    self.iam_path, role, tags)
                handed_out = True
            finally:
                if not handed_out:
                    # Timed out, cancelled or failed: the thread may still run. It stops
                    # at its next AWS call and deletes what it made; a rollback waits
                    # for it (delete_user).
                    creation.stop.set()
            return NewUserResponse(data=data, revocation=revocation, renewable=True)
        wanted = math.ceil(_timestamp(req.expiration) - now)
        duration = max(STS_MIN_TTL, min(wanted, role.max_sts_ttl))
        warnings = []
        if wanted < STS_MIN_TTL:
            # Vault hands the TTL to AWS, which refuses it (ValidationError). The broker
            # asks for the minimum instead, and says so: the credential lives longer
            # than the TTL that was asked for.
            warnings.append(f"AWS issues {role.credential_type} credentials for at least "
                            f"{STS_MIN_TTL}s: asked for {wanted}s, they were issued for "
                            f"{duration}s and stay valid that long")
        if role.credential_type == "assumed_role":
            role_arn = self._pick_role_arn(role, req.metadata)
            session = aws_name(req.username, 64)
            tags = aws_sts.build_tags(role.session_tags,
                                      req.metadata if role.tag_metadata else {})
            issued = await self._run("sts:AssumeRole", aws_sts.assume_role, sts, role, role_arn,
                                     session, duration, tags)
        elif role.credential_type == "federation_token":
            tags = aws_sts.build_tags(role.session_tags,
                                      req.metadata if role.tag_metadata else {})
            issued = await self._run("sts:GetFederationToken", aws_sts.federation_token, sts,
                                     role, aws_name(req.username, 32), duration, tags)
        else:
            issued = await self._run("sts:GetSessionToken", aws_sts.session_token, sts, duration)
            if self._caller_arn is None:
                await self.verify()
            issued.data["arn"] = self._caller_arn
        # AWS's expiry is the truth: the lease must not claim a shorter or longer life.
        expiration = issued.expiration
        differs = abs(expiration.timestamp() - _timestamp(req.expiration)) > 1
        return NewUserResponse(data=issued.data, revocation=issued.revocation,
                               expiration=expiration if differs else None, renewable=False,
                               warnings=warnings)

    def _create_tracked(self, creation: _Creation, iam: Any, name: str, path: str,
                        role: AWSRole, tags: list[dict[str, str]]
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
        # Runs in the worker thread: "done" is set by the thread itself, so it is true
        # only once nothing more can happen to the user, whoever stopped waiting.
        try:
            return aws_iam.create_user(iam, name, path, role, tags, stop=creation.stop.is_set)
        finally:
            with self._creations_guard:
                running = self._creations.get(name, [])
                if creation in running:
                    running.remove(creation)
                if not running:
                    self._creations.pop(name, None)
            creation.done.set()

    async def _await_creations(self, name: str) -> None:
        """Wait (bounded) until no thread of this process is creating IAM user ``name``."""
        deadline = time.monotonic() + self.creation_wait
        while True:
            with self._creations_guard:
                running = [c for c in self._creations.get(name, []) if not c.done.is_set()]
            if not running:
                return
            if time.monotonic() >= deadline:
                raise BackendError(f"IAM user {name} is still being created by an issue that "
                                   "timed out; deleting it waits until that creation ends "
                                   "(retried later)", retryable=True)
            # Polled, not waited on in a thread: a cancelled wait leaves nothing behind.
            await asyncio.sleep(0.05)

    @staticmethod
    def _owner_check(req: DeleteUserRequest) -> Callable[[str | None], bool]:
        """Whether a user carrying this broker-lease-id tag is the ending lease's.

        A fixed-name role's user may belong to another lease by the time this
        one ends or is rolled back (its own CreateUser found the name taken):
        only the lease the user is tagged with deletes it. An untagged user in
        the mount's path is not an issue's (every issue tags): a revoke deletes
        it by name as before, a rollback leaves it alone.
        """
        if not req.lease_id:  # a caller that does not say (the conformance kit)
            return lambda tag: True
        mine = req.lease_id[:256]  # as tagged by new_user
        if req.reason == "rollback":
            return lambda tag: tag == mine
        return lambda tag: tag is None or tag == mine

    def _pick_role_arn(self, role: AWSRole, metadata: Mapping[str, str]) -> str:
        wanted = metadata.get("role_arn")
        if not wanted:
            if len(role.role_arns) == 1:
                return role.role_arns[0]
            # Vault's rule: with several ARNs, which one must be asked for.
            raise BackendError("did not supply a role_arn parameter and unable to determine "
                               f"one: this role allows {', '.join(role.role_arns)}; pass "
                               "role_arn", retryable=False)
        if wanted not in role.role_arns:
            # Refuse rather than silently hand out a different role than asked for.
            raise BackendError(f"role_arn {wanted!r} is not one of this role's role_arns "
                               f"({', '.join(role.role_arns)})", retryable=False)
        return wanted

    async def renew_user(self, req: RenewUserRequest) -> RenewUserResponse:
        ctype = req.revocation.get("credential_type", "iam_user")
        if ctype in STS_TYPES:
            raise BackendError(f"{ctype} credentials cannot be renewed; request new ones",
                               retryable=False)
        # IAM users have no expiry of their own: the broker's expiry deletes them.
        return RenewUserResponse()

    async def delete_user(self, req: DeleteUserRequest) -> DeleteUserResponse:
        ctype = req.revocation.get("credential_type")
        if ctype is None:
            # A pending row (rollback) only knows the username; the role says the type.
            ctype = self._role(req.role).credential_type if req.role else "iam_user"
        if ctype == "iam_user":
            _, iam = await self._clients()
            username = str(req.revocation.get("username") or req.username)
            await self._await_creations(username)
            created_path = req.revocation.get("iam_path")
            await self._run("deleting IAM user", functools.partial(
                aws_iam.delete_user, iam, username, self.iam_path, self._owner_check(req),
                own_tag=req.lease_id[:256] or None,
                created_path=str(created_path) if created_path else None))
            return DeleteUserResponse()
        if req.reason == "rollback":
            # An issue that never completed: the STS secret never left the broker's
            # memory, so nobody can use it. (Writing a deny policy here would also make
            # every failed AssumeRole need IAM write access to roll back.)
            return DeleteUserResponse()
        if ctype == "assumed_role":
            await self._revoke_assumed_role(req)
            return DeleteUserResponse()
        return self._revoke_unrevocable(ctype, req)

    def _revoke_unrevocable(self, ctype: str, req: DeleteUserRequest) -> DeleteUserResponse:
        """federation/session tokens: AWS has no way to end one token early.

        A lease that ends while its credential still works (its expiry, capped by
        max_ttl or its token below AWS's 900 s minimum, or an early revoke) does not
        claim it is over: the call fails for good, the lease goes ``irrevocable``
        with the reason, and the irrevocable retry ends it once AWS has.
        """
        expires_at = float(req.revocation.get("expires_at", 0))
        now = self.clock()
        if req.reason == "rollback" or now + _EXPIRY_SLACK >= expires_at:
            # Expired by AWS already, or (rollback) never handed to anyone.
            return DeleteUserResponse()
        until = datetime.fromtimestamp(expires_at, UTC)
        when = until.isoformat(timespec="seconds")
        if req.reason == "force":
            # The lease ends; the engine audits that the keys do not (valid_until).
            log.warning("force-revoking %s %s: the credential stays valid until %s",
                        ctype, req.username, when)
            return DeleteUserResponse(valid_until=until)
        if req.reason == "expire":
            raise BackendError(
                f"the lease ended before its {ctype} credential, which stays valid until its "
                f"AWS expiry at {when} (AWS cannot end it sooner; the lease was capped below "
                f"it, e.g. by max_ttl or its token's TTL under AWS's {STS_MIN_TTL}s minimum)",
                retryable=False)
        raise BackendError(
            f"{ctype} credentials cannot be revoked before AWS expires them at {when}; "
            "revoke-force drops the lease, removing the issuing user's permissions cuts "
            "the token off now", retryable=False)

    async def _revoke_assumed_role(self, req: DeleteUserRequest) -> None:
        _, iam = await self._clients()
        now = self.clock()
        rev = req.revocation
        if "role_arn" not in rev:
            raise BackendError(f"lease of {req.username} lacks role_arn/session_name in its "
                               "revocation data; cannot revoke", retryable=False)
        role_arn, expires_at = str(rev["role_arn"]), float(rev["expires_at"])
        if expires_at <= now + _EXPIRY_SLACK:
            # AWS ended it already: only take the chance to prune, if an entry is due.
            if self._prune_due.get(role_arn, math.inf) <= now:
                due = await self._run("pruning deny policy", self._prune_locked, iam,
                                      role_arn, now)
                self._set_due(role_arn, due)
            return
        # Also on reason "expire": if AWS's session outlives the lease, it must still end.
        due = await self._run("denying revoked session", self._deny_locked, iam, role_arn,
                              str(rev["session_name"]), rev.get("assumed_role_id"),
                              expires_at, now)
        self._set_due(role_arn, due)

    def _set_due(self, role_arn: str, due: float | None) -> None:
        if due is None:
            self._prune_due.pop(role_arn, None)
        else:
            self._prune_due[role_arn] = due

    def _role_lock(self, role_arn: str) -> threading.Lock:
        with self._role_locks_guard:
            return self._role_locks.setdefault(role_arn, threading.Lock())

    def _deny_locked(self, iam: Any, role_arn: str, session: str, role_user_id: str | None,
                     expires_at: float, now: float) -> float | None:
        with self._role_lock(role_arn):
            return aws_sts.deny_session(iam, role_arn, session, role_user_id, expires_at, now,
                                        self.policy_size_limit)

    def _prune_locked(self, iam: Any, role_arn: str, now: float) -> float | None:
        with self._role_lock(role_arn):
            return aws_sts.prune_role_policy(iam, role_arn, now)

    async def rotate_root(self, req: RotateRootRequest) -> RotateRootResponse:
        """Replace the mount's own access key: a second key, proven to work, then the old
        one deleted.

        The error says whether trying again can help: AWS refusing the mount's key or
        its permissions, a second key already there, a mount without ``access_key`` are
        permanent (``retryable=False``: the API answers 400); throttling, an
        unreachable endpoint, a timeout, or a new key AWS did not accept in time are
        transient (503).
        """
        if not self.access_key:
            raise BackendError("rotate_root needs the mount option access_key (and the secret "
                               "in password_file/password_env); credentials from the "
                               "environment or an instance role are rotated elsewhere",
                               retryable=False)
        if req.new_password is not None:
            raise BackendError("AWS generates secret keys itself; rotate without new_password",
                               retryable=False)
        _, iam = await self._clients()
        try:
            user, new_id, new_secret = await self._run(
                "creating access key", aws_iam.create_root_key, iam, self.access_key)
        except BackendError as exc:
            raise _rotation_error(exc) from None
        old_id = self.access_key
        try:
            new_sts, new_iam = await self._run("creating clients", self._make_clients, new_id,
                                               new_secret)
            await self._wait_key_works(new_sts, new_id)
            await self._run("deleting old access key", aws_iam.delete_key, new_iam, user, old_id)
        except BackendError as failed:
            error = _rotation_error(failed)
            # Undo: the old key still works, and a new key nobody knows must not linger.
            try:
                await self._run("deleting new access key", aws_iam.delete_key, iam, user, new_id)
            except BackendError as undo:
                raise BackendError(f"rotate_root failed ({error}); delete the new access key "
                                   f"{new_id} of {user} by hand ({undo})", retryable=False) \
                    from None
            raise BackendError(f"rotate_root failed, old key kept: {error}",
                               retryable=error.retryable) from None
        old_clients = (self._sts, self._iam)
        self._sts, self._iam = new_sts, new_iam
        self.access_key, self._secret = new_id, new_secret
        for client in old_clients:
            if client is not None:
                await asyncio.to_thread(client.close)
        log.warning("mount %s: rotated access key of IAM user %s: %s replaced by %s; "
                    "update access_key in the config", self.mount.name, user, old_id, new_id)
        return AWSRotateRootResponse(new_password=new_secret, access_key_id=new_id)

    async def _wait_key_works(self, sts: Any, key_id: str) -> None:
        # New IAM keys take a few seconds to be accepted everywhere (eventual consistency):
        # refusals of the new key are expected meanwhile, and transient after the wait too.
        deadline = time.monotonic() + self.key_wait_timeout
        while True:
            try:
                await self._run("sts:GetCallerIdentity (new key)", sts.get_caller_identity)
                return
            except BackendError as exc:
                if time.monotonic() > deadline:
                    raise BackendError(f"AWS did not accept the new access key {key_id} within "
                                       f"{self.key_wait_timeout:g}s ({exc}); try again later",
                                       retryable=True) from None
                await asyncio.sleep(1.0)

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking boto3 step in a thread; turn AWS errors into BackendError."""
        try:
            return await asyncio.to_thread(fn, *args)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "Unknown"))
            message = self._redact(f"{what}: {code}: {err.get('Message', '')}".rstrip(": "))
            raise AWSError(message, retryable=code not in _NOT_RETRYABLE, code=code) from None
        except BotoCoreError as exc:
            # Unreachable endpoint, timeout, connection reset: worth trying again.
            raise AWSError(self._redact(f"{what}: {exc}"), retryable=True, code=None) from None

    def _redact(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return text


def _rotation_error(exc: BackendError) -> BackendError:
    """``exc`` from a rotate_root step, as permanent when AWS refused the mount's key."""
    if isinstance(exc, AWSError) and exc.code in _REFUSED:
        return BackendError(f"{exc} (the mount's IAM user needs iam:GetUser, "
                            "iam:ListAccessKeys, iam:CreateAccessKey and iam:DeleteAccessKey "
                            "on itself, with a key AWS accepts)", retryable=False)
    return exc


def _timestamp(when: datetime) -> float:
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
