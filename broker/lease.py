"""The lease and token records, their states, and Vault's TTL math.

Times are float UNIX seconds (UTC) everywhere inside the broker; the API turns
them into RFC 3339 strings at the edge.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from broker.errors import BadRequest
from broker.templating import random_string

__all__ = [
    "DEAD_STATES",
    "META_KEY",
    "Lease",
    "LeaseFilter",
    "LeaseState",
    "Token",
    "TokenState",
    "check_meta_key",
    "issue_ttl",
    "new_lease_id",
    "renew_expiry",
    "renewal_capped",
]


class LeaseState(StrEnum):
    #: intent written, backend not yet confirmed; rolled back if it goes stale.
    PENDING = "pending"
    #: the credential exists and is tracked for expiry.
    ACTIVE = "active"
    #: queued or being revoked (expiry, revoke, prefix, token cascade); retried on failure.
    REVOKING = "revoking"
    #: tombstone: revoked before its expiry.
    REVOKED = "revoked"
    #: tombstone: revoked because it expired.
    EXPIRED = "expired"
    #: revocation failed too often; listed, counted, retried rarely, can be forced.
    IRREVOCABLE = "irrevocable"


#: States in which a lease is dead: any later use is a reuse attempt.
DEAD_STATES = frozenset({LeaseState.REVOKED, LeaseState.EXPIRED})


class TokenState(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass
class Lease:
    id: str
    mount: str
    role: str
    #: accessor of the token that created the lease.
    owner: str
    issue_time: float
    expire_time: float
    #: issue_time + max_ttl: renewals cannot pass it.
    max_expire_time: float
    renewable: bool = True
    state: LeaseState = LeaseState.PENDING
    last_renewal: float | None = None
    revoke_attempts: int = 0
    #: why it is (being) revoked: "expire", "revoke", "prefix", "token", "force", "rollback".
    revoke_reason: str | None = None
    #: when it died (tombstones) - purge uses it.
    ended_at: float | None = None
    #: what the backend needs to revoke it (username, access key id); never a password.
    revocation: dict[str, Any] = field(default_factory=dict)
    #: free metadata, e.g. the CI run id copied from the token.
    metadata: dict[str, str] = field(default_factory=dict)
    #: last revocation error (redacted), for operators.
    last_error: str | None = None

    @property
    def username(self) -> str:
        return str(self.revocation.get("username", ""))

    def ttl(self, now: float) -> int:
        return max(0, int(self.expire_time - now))


#: What a metadata key may hold: it goes into a JSON path in the stores and is
#: one segment of the ``sys/leases/revoke-by/KEY/VALUE`` policy path.
META_KEY = re.compile(r"[A-Za-z0-9_.-]+")


def check_meta_key(key: str) -> None:
    """ValueError (with a message safe to show a client) unless ``key`` matches META_KEY."""
    if not META_KEY.fullmatch(key):
        raise ValueError(f"metadata key {key!r} may hold only letters, digits, '_', '.', '-'")


@dataclass(frozen=True)
class LeaseFilter:
    """Which leases an operation applies to; all given parts must match."""

    #: lease id prefix: "" (everything), "pg/", "pg/creds/readonly/".
    prefix: str = ""
    #: token accessors that own the leases.
    owners: tuple[str, ...] = ()
    #: exact metadata matches, e.g. {"run_id": "1234"}.
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Token:
    accessor: str
    #: sha256 of the token; the token itself is never stored.
    token_hash: str
    policies: list[str]
    created: float
    #: None: never expires (root tokens).
    expire_time: float | None
    display_name: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    #: accessor of the parent token; revoking a parent revokes its children.
    parent: str | None = None
    state: TokenState = TokenState.ACTIVE
    #: renewals cannot pass this (None: no cap).
    max_expire_time: float | None = None
    renewable: bool = True
    ended_at: float | None = None
    #: the TTL (seconds) the token was created with: a renewal without an
    #: increment extends by this, as in Vault. 0: never expires. None: a row from
    #: before the store kept it (see TokenManager.renew).
    creation_ttl: int | None = None
    #: the path that created it, as token lookups show it (``auth/github/login``);
    #: "": ``auth/token/create`` (child and root tokens, rows from before it was kept).
    path: str = ""
    #: requests the token may still make (Vault's ``num_uses``): 0 no limit; -1 used
    #: up (its last use was taken, the token is being revoked), as Vault marks it.
    num_uses: int = 0
    #: Vault's ``period`` (seconds): every renewal sets the TTL back to it, whatever
    #: increment was asked for, and the token lives on while renewed, up to its
    #: ``max_expire_time`` (explicit_max_ttl) if it has one. 0: not a periodic token.
    period: int = 0

    @property
    def is_root(self) -> bool:
        return "root" in self.policies


_ID_ALPHABET = string.ascii_letters + string.digits


def new_lease_id(mount: str, role: str, kind: str = "creds") -> str:
    """``{mount}/{kind}/{role}/{random}``, as Vault shapes them: ``kind`` is the path the
    credential was asked on (``creds``, or ``sts`` for Vault's AWS STS path)."""
    rand = random_string(_ID_ALPHABET, 24)
    return f"{mount}/{kind}/{role}/{rand}"


def issue_ttl(requested: int | None, default_ttl: int, max_ttl: int) -> int:
    """TTL of a new lease: the request, else the role default, capped at max_ttl.

    Vault caps an over-long request on issue (it warns); only renewals past
    the cap are refused.
    """
    if requested is not None and requested < 0:
        raise BadRequest("ttl must not be negative")
    ttl = requested if requested else default_ttl
    return min(ttl, max_ttl)


def renew_expiry(
    lease: Lease, increment: int | None, default_ttl: int, now: float, *, why: str = ""
) -> float:
    """New expiry for a renewal: increment counts from now, capped at max expiry.

    As Vault's ``framework.CalculateTTL``: an ``increment`` (or, without one or
    with 0, Vault's "the default", ``default_ttl``) that reaches past
    ``max_expire_time`` is capped there, and the caller learns it from the TTL
    and a warning (:func:`renewal_capped`); a lease with less than a second
    left before its max expiry cannot be renewed. hvac and Vault agents renew
    with an increment and expect exactly that. ``why``: what set the cap, when
    the caller must be told (a reload lowered it, the owner token's expiry).
    """
    if increment is not None and increment < 0:
        raise BadRequest("increment must not be negative")
    if not lease.renewable:
        raise BadRequest(f"lease {lease.id} is not renewable")
    if lease.max_expire_time - now < 1:
        raise BadRequest(f"lease {lease.id} is past its max TTL and cannot be renewed"
                         + (f"; {why}" if why else ""))
    return min(now + (increment or default_ttl), lease.max_expire_time)


def renewal_capped(lease: Lease, increment: int | None, default_ttl: int, now: float, *,
                   why: str = "") -> str | None:
    """The warning for a renewal its max expiry cut short (``why``: what set the cap,
    as for :func:`renew_expiry`); Vault's words when an increment was asked for."""
    if now + (increment or default_ttl) <= lease.max_expire_time + 0.5:  # clock slack
        return None
    remaining = max(0, int(lease.max_expire_time - now))
    if increment:
        text = (f'TTL of "{increment}s" exceeded the effective max_ttl of "{remaining}s"; '
                "TTL value is capped accordingly")
    else:
        text = (f"TTL capped at the lease's max expiry: {remaining}s left, not the "
                f"{default_ttl}s a renewal extends by")
    return text + (f"; {why}" if why else "")
