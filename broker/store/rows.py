"""Rows to records: the one mapping from the stores' columns to Lease and Token.

Both stores name their columns alike and keep JSON in text (SQLite) or jsonb
returned as text (asyncpg without a codec), so one mapping serves both.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from broker.lease import Lease, LeaseState, Token, TokenState

__all__ = ["Row", "lease_from_row", "prefix_upper", "token_from_row"]


class Row(Protocol):
    """sqlite3.Row and asyncpg.Record alike: columns by name."""

    def __getitem__(self, key: str, /) -> Any: ...


def lease_from_row(row: Row) -> Lease:
    return Lease(
        id=row["id"],
        mount=row["mount"],
        role=row["role"],
        owner=row["owner"],
        issue_time=row["issue_time"],
        expire_time=row["expire_time"],
        max_expire_time=row["max_expire_time"],
        renewable=bool(row["renewable"]),
        state=LeaseState(row["state"]),
        last_renewal=row["last_renewal"],
        revoke_attempts=row["revoke_attempts"],
        revoke_reason=row["revoke_reason"],
        ended_at=row["ended_at"],
        revocation=json.loads(row["revocation"]),
        metadata=json.loads(row["metadata"]),
        last_error=row["last_error"],
    )


def token_from_row(row: Row) -> Token:
    return Token(
        accessor=row["accessor"],
        token_hash=row["token_hash"],
        policies=json.loads(row["policies"]),
        created=row["created"],
        expire_time=row["expire_time"],
        display_name=row["display_name"],
        metadata=json.loads(row["metadata"]),
        parent=row["parent"],
        state=TokenState(row["state"]),
        max_expire_time=row["max_expire_time"],
        renewable=bool(row["renewable"]),
        ended_at=row["ended_at"],
        creation_ttl=row["creation_ttl"],
        path=row["path"] or "",
        num_uses=row["num_uses"],
        period=row["period"],
    )


def prefix_upper(prefix: str) -> str | None:
    """The smallest string above every string that starts with ``prefix``.

    UTF-8 byte order (SQLite's BINARY collation, PostgreSQL's "C") is code point
    order, so bumping the last character gives the bound; ``id >= prefix AND
    id < upper`` is a range on the primary key, and ``%`` or ``_`` in a prefix
    mean nothing special.
    """
    chars = list(prefix)
    while chars:
        point = ord(chars.pop()) + 1
        if 0xD800 <= point <= 0xDFFF:  # surrogates cannot be stored: skip over them
            point = 0xE000
        if point <= 0x10FFFF:
            return "".join(chars) + chr(point)
    return None
