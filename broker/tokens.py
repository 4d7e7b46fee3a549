"""Tokens: created random, returned once, stored only as a SHA-256 hash.

A token is looked up by the hash of what the client presents; the hash is an
index key, so no secret is ever compared byte by byte in Python. Where two
secrets are compared in memory (the dev root token id) it is constant-time.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Mapping, Sequence

from broker.errors import BadRequest, PermissionDenied, ReuseAttempt
from broker.lease import Token, TokenState
from broker.store.base import LeaseStore

__all__ = ["DeadToken", "TokenManager", "hash_token"]

TOKEN_PREFIX = "brk."  # noqa: S105 - a prefix, not a secret


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class DeadToken(ReuseAttempt):
    """A revoked or expired token was presented: 403, audited as a reuse attempt."""

    status = 403

    def __init__(self, token: Token) -> None:
        super().__init__(f"permission denied: token is {token.state.value}")
        self.token = token


class TokenManager:
    def __init__(self, store: LeaseStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    async def create(
        self,
        *,
        policies: Sequence[str],
        ttl: int | None,
        max_ttl: int | None = None,
        display_name: str = "",
        metadata: Mapping[str, str] | None = None,
        parent: Token | None = None,
        renewable: bool = True,
        token_id: str | None = None,
        accessor: str | None = None,
    ) -> tuple[str, Token]:
        """Create a token; returns (the token itself, its record). The token is shown once."""
        now = self.clock()
        if token_id is not None and len(token_id) < 8 and token_id != "root":  # noqa: S105
            raise BadRequest("a chosen token id must be at least 8 characters")
        token = token_id or TOKEN_PREFIX + secrets.token_urlsafe(32)
        expire = now + ttl if ttl else None
        cap = now + max_ttl if max_ttl else None
        if parent is not None and parent.expire_time is not None:
            # A child never outlives its parent: revoking or expiring the
            # parent ends the child and, with it, every lease it owns.
            expire = min(expire or parent.expire_time, parent.expire_time)
            cap = min(cap or parent.expire_time, parent.expire_time)
        if cap is not None and expire is not None:
            expire = min(expire, cap)
        record = Token(
            accessor=accessor or secrets.token_urlsafe(18),
            token_hash=hash_token(token),
            policies=sorted(set(policies)),
            created=now,
            expire_time=expire,
            display_name=display_name,
            metadata=dict(metadata or {}),
            parent=parent.accessor if parent else None,
            max_expire_time=cap,
            renewable=renewable and expire is not None,
        )
        await self.store.insert_token(record)
        return token, record

    async def resolve(self, token: str | None) -> Token:
        """The live token for ``token``; PermissionDenied if missing/unknown, DeadToken if dead."""
        if not token:
            raise PermissionDenied("permission denied: missing token (X-Vault-Token header)")
        record = await self.store.token_by_hash(hash_token(token))
        if record is None:
            raise PermissionDenied("permission denied: invalid token")
        if record.state is TokenState.ACTIVE and record.expire_time is not None:
            if record.expire_time <= self.clock():
                await self.store.end_token(record.accessor, state=TokenState.EXPIRED,
                                           now=self.clock())
                record.state = TokenState.EXPIRED
        if record.state is not TokenState.ACTIVE:
            raise DeadToken(record)
        return record

    async def descendants(self, accessor: str) -> list[str]:
        """``accessor`` and every active token below it, parents first."""
        order, todo = [], [accessor]
        while todo:
            current = todo.pop()
            order.append(current)
            todo.extend(await self.store.child_tokens(current))
        return order

    async def renew(self, token: Token, increment: int | None) -> Token:
        if not token.renewable or token.expire_time is None:
            raise BadRequest("token is not renewable")
        now = self.clock()
        ttl = increment or int(token.expire_time - token.created)
        expire = now + ttl
        if token.max_expire_time is not None:
            expire = min(expire, token.max_expire_time)
        await self.store.renew_token(token.accessor, expire_time=expire)
        token.expire_time = expire
        return token
