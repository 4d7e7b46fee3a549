"""STS issuance and the early revocation of assumed-role sessions (blocking; run in threads).

AWS cannot revoke one STS token. For assumed roles we do the next best thing
AWS documents: an inline deny policy on the role, matching the revoked
session by ``aws:userid`` (``ROLE_ID:SESSION_NAME``). Entries are bucketed by
the hour their session expires, so they can be pruned once AWS has expired the
session anyway. When the policy would outgrow IAM's 10,240-character limit,
all listed sessions fold into one ``aws:TokenIssueTime`` cut-off that kills
every session of the role issued before now (logged; see docs/aws.md).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from broker.backend import BackendError

if TYPE_CHECKING:
    from plugins.aws import AWSRole

__all__ = [
    "DENY_POLICY_NAME",
    "MAX_SESSION_TAGS",
    "ROLE_POLICY_LIMIT",
    "DenyList",
    "Issued",
    "add_revoked_session",
    "assume_role",
    "build_tags",
    "deny_session",
    "federation_token",
    "prune_document",
    "prune_role_policy",
    "session_token",
    "valid_tag",
]

log = logging.getLogger(__name__)

DENY_POLICY_NAME = "broker-revoked-sessions"
#: IAM's limit for a role's inline policies (characters, whitespace not counted).
ROLE_POLICY_LIMIT = 10_240
MAX_SESSION_TAGS = 50
#: expiry buckets: sessions revoked around the same time share one statement.
BUCKET_SECONDS = 3600
_SESSIONS_SID = re.compile(r"^BrokerRevokedUntil(\d+)$")
_CUTOFF_SID = re.compile(r"^BrokerIssuedBeforeUntil(\d+)$")
_TAG_CHARS = re.compile(r"^[\w .:/=+\-@]*$")
_TAG_UNSAFE = re.compile(r"[^\w .:/=+\-@]")


@dataclass
class Issued:
    """What one STS call produced: client data, revocation facts, AWS's expiry."""

    data: dict[str, Any]
    revocation: dict[str, Any]
    expiration: datetime


# -- issuance ------------------------------------------------------------------------------


def valid_tag(key: str, value: str) -> bool:
    return (0 < len(key) <= 128 and len(value) <= 256 and bool(_TAG_CHARS.match(key))
            and bool(_TAG_CHARS.match(value)) and not key.lower().startswith("aws:"))


def build_tags(configured: Mapping[str, str], metadata: Mapping[str, str]) -> list[dict[str, str]]:
    """Session tags: the role's configured tags, then lease metadata (sanitised).

    Configured tags win on a (case-insensitive) clash: a tag used for ABAC
    must not be overridable by metadata that comes from a client's token.
    """
    tags = dict(configured)
    seen = {k.lower() for k in tags}
    for raw_key, raw_value in metadata.items():
        key = _TAG_UNSAFE.sub("_", raw_key)[:128]
        value = _TAG_UNSAFE.sub("_", raw_value)[:256]
        if not key or key.lower() in seen or key.lower().startswith("aws:"):
            continue
        if len(tags) >= MAX_SESSION_TAGS:
            log.warning("lease metadata has more keys than AWS's %d session tags; rest dropped",
                        MAX_SESSION_TAGS)
            break
        tags[key] = value
        seen.add(key.lower())
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _policy_args(role: AWSRole) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if role.policy_document:
        args["Policy"] = role.policy_document
    if role.policy_arns:
        args["PolicyArns"] = [{"arn": arn} for arn in role.policy_arns]
    return args


def _credentials(creds: Mapping[str, Any], arn: str | None) -> dict[str, Any]:
    return {
        "access_key": creds["AccessKeyId"],
        "secret_key": creds["SecretAccessKey"],
        "security_token": creds["SessionToken"],
        "arn": arn,
    }


def assume_role(sts: Any, role: AWSRole, role_arn: str, session_name: str, duration: int,
                tags: list[dict[str, str]]) -> Issued:
    args = {"RoleArn": role_arn, "RoleSessionName": session_name, "DurationSeconds": duration,
            **_policy_args(role)}
    if tags:
        args["Tags"] = tags
    if role.external_id:
        args["ExternalId"] = role.external_id
    resp = sts.assume_role(**args)
    creds, user = resp["Credentials"], resp["AssumedRoleUser"]
    expiration: datetime = creds["Expiration"]
    return Issued(
        data=_credentials(creds, user["Arn"]),
        revocation={
            "credential_type": "assumed_role",
            "role_arn": role_arn,
            "session_name": session_name,
            # "ROLE_ID:SESSION_NAME": exactly what aws:userid is for this session.
            "assumed_role_id": user["AssumedRoleId"],
            "access_key_id": creds["AccessKeyId"],
            "expires_at": math.ceil(expiration.timestamp()),
        },
        expiration=expiration,
    )


def federation_token(sts: Any, role: AWSRole, name: str, duration: int,
                     tags: list[dict[str, str]]) -> Issued:
    args = {"Name": name, "DurationSeconds": duration, **_policy_args(role)}
    if tags:
        args["Tags"] = tags
    resp = sts.get_federation_token(**args)
    creds, user = resp["Credentials"], resp["FederatedUser"]
    expiration: datetime = creds["Expiration"]
    return Issued(
        data=_credentials(creds, user["Arn"]),
        revocation={"credential_type": "federation_token",
                    "federated_user_id": user["FederatedUserId"],
                    "access_key_id": creds["AccessKeyId"],
                    "expires_at": math.ceil(expiration.timestamp())},
        expiration=expiration,
    )


def session_token(sts: Any, duration: int) -> Issued:
    creds = sts.get_session_token(DurationSeconds=duration)["Credentials"]
    expiration: datetime = creds["Expiration"]
    return Issued(
        data=_credentials(creds, None),
        revocation={"credential_type": "session_token",
                    "access_key_id": creds["AccessKeyId"],
                    "expires_at": math.ceil(expiration.timestamp())},
        expiration=expiration,
    )


# -- the deny policy, as data --------------------------------------------------------------


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class DenyList:
    """The broker-revoked-sessions policy, parsed."""

    #: bucket end (UNIX seconds) -> aws:userid values whose sessions end before it.
    sessions: dict[int, set[str]] = field(default_factory=dict)
    #: (issued-before ISO time, until): deny every session issued before; at most one.
    cutoff: tuple[str, int] | None = None
    #: statements someone else put in the policy: kept as they are.
    others: list[Any] = field(default_factory=list)

    @classmethod
    def parse(cls, doc: Mapping[str, Any] | None) -> DenyList:
        out = cls()
        statements = (doc or {}).get("Statement", [])
        for stmt in statements if isinstance(statements, list) else [statements]:
            sid = stmt.get("Sid", "") if isinstance(stmt, dict) else ""
            cond = stmt.get("Condition", {}) if isinstance(stmt, dict) else {}
            if m := _SESSIONS_SID.match(sid):
                ids = cond.get("StringLike", {}).get("aws:userid", [])
                out.sessions[int(m.group(1))] = {ids} if isinstance(ids, str) else set(ids)
            elif (m := _CUTOFF_SID.match(sid)) and "DateLessThan" in cond:
                out.cutoff = (str(cond["DateLessThan"]["aws:TokenIssueTime"]), int(m.group(1)))
            else:
                out.others.append(stmt)
        return out

    def prune(self, now: float) -> None:
        self.sessions = {until: ids for until, ids in self.sessions.items() if until > now}
        if self.cutoff and self.cutoff[1] <= now:
            self.cutoff = None

    def render(self) -> dict[str, Any] | None:
        """The policy document, or None when nothing is left (delete the policy)."""
        stmts: list[Any] = list(self.others)
        if self.cutoff:
            stmts.append({"Sid": f"BrokerIssuedBeforeUntil{self.cutoff[1]}", "Effect": "Deny",
                          "Action": "*", "Resource": "*",
                          "Condition": {"DateLessThan": {"aws:TokenIssueTime": self.cutoff[0]}}})
        for until in sorted(self.sessions):
            ids = sorted(self.sessions[until])
            stmts.append({"Sid": f"BrokerRevokedUntil{until}", "Effect": "Deny", "Action": "*",
                          "Resource": "*", "Condition": {"StringLike": {"aws:userid": ids}}})
        return {"Version": "2012-10-17", "Statement": stmts} if stmts else None

    def next_due(self) -> float | None:
        """When the earliest entry can be pruned (None: nothing to prune)."""
        times = list(self.sessions) + ([self.cutoff[1]] if self.cutoff else [])
        return float(min(times)) if times else None

    def covers(self, user_id: str, since: float) -> bool:
        """Whether a session (revoked at ``since``) is denied by this policy."""
        if any(user_id in ids for ids in self.sessions.values()):
            return True
        return self.cutoff is not None and self.cutoff[0] >= _iso(since)


def policy_size(doc: Mapping[str, Any] | None) -> int:
    # IAM does not count whitespace: measure the compact form.
    return len(json.dumps(doc, separators=(",", ":"))) if doc else 0


def add_revoked_session(doc: Mapping[str, Any] | None, user_id: str, expires_at: float,
                        now: float, limit: int = ROLE_POLICY_LIMIT
                        ) -> tuple[dict[str, Any] | None, bool]:
    """Return (new document, whether the all-sessions cut-off had to be used)."""
    deny = DenyList.parse(doc)
    deny.prune(now)
    for ids in deny.sessions.values():
        ids.discard(user_id)
    until = int(math.ceil(expires_at / BUCKET_SECONDS) * BUCKET_SECONDS)
    deny.sessions.setdefault(until, set()).add(user_id)
    deny.sessions = {u: ids for u, ids in deny.sessions.items() if ids}
    rendered = deny.render()
    if policy_size(rendered) <= limit:
        return rendered, False
    # Full: one cut-off now denies every listed session (all issued before now),
    # and every other session of the role issued before now - the trade-off.
    last = max([*deny.sessions, *([deny.cutoff[1]] if deny.cutoff else [])])
    deny.sessions = {}
    deny.cutoff = (_iso(now + 1), last)
    rendered = deny.render()
    if policy_size(rendered) > limit:
        raise BackendError(f"policy {DENY_POLICY_NAME} holds foreign statements that leave no "
                           "room for the revocation; remove them", retryable=False)
    return rendered, True


def prune_document(doc: Mapping[str, Any] | None, now: float) -> dict[str, Any] | None:
    deny = DenyList.parse(doc)
    deny.prune(now)
    return deny.render()


# -- the deny policy, in IAM ---------------------------------------------------------------


def _missing(exc: ClientError) -> bool:
    return bool(exc.response.get("Error", {}).get("Code") == "NoSuchEntity")


def _role_name(role_arn: str) -> str:
    return role_arn.rsplit("/", 1)[-1]


def _get_policy(iam: Any, role_name: str) -> dict[str, Any] | None:
    try:
        doc = iam.get_role_policy(RoleName=role_name, PolicyName=DENY_POLICY_NAME)
    except ClientError as exc:
        if _missing(exc):
            return None
        raise
    body = doc["PolicyDocument"]
    # botocore decodes IAM policy documents into dicts; be safe if one arrives as text.
    parsed: dict[str, Any] = json.loads(body) if isinstance(body, str) else body
    return parsed


def _write_policy(iam: Any, role_name: str, doc: Mapping[str, Any] | None) -> None:
    if doc is None:
        try:
            iam.delete_role_policy(RoleName=role_name, PolicyName=DENY_POLICY_NAME)
        except ClientError as exc:
            if not _missing(exc):
                raise
        return
    iam.put_role_policy(RoleName=role_name, PolicyName=DENY_POLICY_NAME,
                        PolicyDocument=json.dumps(doc, separators=(",", ":")))


def deny_session(iam: Any, role_arn: str, session_name: str, role_user_id: str | None,
                 expires_at: float, now: float, limit: int = ROLE_POLICY_LIMIT) -> float | None:
    """Deny one assumed-role session until it expires; return when to prune next.

    The caller serialises writers per role in this process. Another broker
    replica may write at the same time: we read back and retry if our entry
    was lost to its write.
    """
    role_name = _role_name(role_arn)
    try:
        if role_user_id is None:
            role_id = iam.get_role(RoleName=role_name)["Role"]["RoleId"]
            role_user_id = f"{role_id}:{session_name}"
        for _ in range(3):
            doc, fell_back = add_revoked_session(_get_policy(iam, role_name), role_user_id,
                                                 expires_at, now, limit)
            if fell_back:
                log.warning("policy %s on role %s is full: denying ALL sessions of the role "
                            "issued before %s to revoke %s", DENY_POLICY_NAME, role_name,
                            _iso(now + 1), session_name)
            _write_policy(iam, role_name, doc)
            check = DenyList.parse(_get_policy(iam, role_name))
            if check.covers(role_user_id, now):
                return check.next_due()
    except ClientError as exc:
        if _missing(exc):
            # The role is gone, and with it every permission its sessions had.
            return None
        raise
    raise BackendError(f"deny policy on role {role_name} kept being overwritten by a "
                       "concurrent writer; will retry", retryable=True)


def prune_role_policy(iam: Any, role_arn: str, now: float) -> float | None:
    """Drop entries whose sessions AWS has expired; delete the policy when empty."""
    role_name = _role_name(role_arn)
    try:
        doc = _get_policy(iam, role_name)
        if doc is None:
            return None
        pruned = prune_document(doc, now)
        if pruned != doc:
            _write_policy(iam, role_name, pruned)
    except ClientError as exc:
        if _missing(exc):
            return None
        raise
    return DenyList.parse(pruned).next_due()
