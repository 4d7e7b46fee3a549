"""Store kinds the lease store suite runs against, and helpers to fill a store.

A kind is a factory: given the pytest request and a temporary directory it
yields a ``StoreMaker`` whose stores all share one backing database, so a test
can close a store and open another on the same data. To run the whole suite
against a new store, add its factory to ``STORE_KINDS``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.lease import Lease, LeaseState, Token
from broker.store.base import LeaseStore
from broker.store.sqlite import SQLiteStore

__all__ = [
    "STORE_KINDS",
    "T0",
    "StoreMaker",
    "make_lease",
    "make_token",
    "put_active",
    "put_many_active",
]

#: A fixed "now" for the tests: stores take times as arguments, never read a clock.
T0 = 1_700_000_000.0


@dataclass
class StoreMaker:
    """Builds (unopened) stores that all use the same backing database."""

    build: Callable[[], LeaseStore]
    #: reads the recorded schema version straight from the database.
    schema_version: Callable[[], Any]


@asynccontextmanager
async def sqlite_kind(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreMaker]:
    # A directory that does not exist yet: open() must create it.
    path = tmp_path / "state" / "broker.db"

    async def schema_version() -> int:
        def read() -> int:
            conn = sqlite3.connect(path)
            try:
                return int(conn.execute("SELECT max(version) FROM schema_version").fetchone()[0])
            finally:
                conn.close()

        return await asyncio.to_thread(read)

    yield StoreMaker(build=lambda: SQLiteStore.from_url(f"sqlite:///{path}"),
                     schema_version=schema_version)


StoreKind = Callable[[pytest.FixtureRequest, Path], AbstractAsyncContextManager[StoreMaker]]

#: kind name -> factory. A "postgres" kind goes here once its store exists.
STORE_KINDS: dict[str, StoreKind] = {"sqlite": sqlite_kind}


def make_lease(
    lease_id: str,
    *,
    owner: str = "acc-1",
    issue_time: float = T0,
    ttl: float = 3600,
    metadata: dict[str, str] | None = None,
) -> Lease:
    mount, _, rest = lease_id.partition("/")
    role = rest.split("/")[1] if rest.count("/") >= 2 else "role"
    return Lease(
        id=lease_id,
        mount=mount,
        role=role,
        owner=owner,
        issue_time=issue_time,
        expire_time=issue_time + ttl,
        max_expire_time=issue_time + 10 * ttl,
        metadata=dict(metadata or {}),
    )


async def put_active(store: LeaseStore, lease: Lease, *, expire_time: float | None = None
                     ) -> Lease:
    """Issue ``lease`` the way the engine does: pending row, then activate."""
    await store.insert_pending(lease)
    expire = lease.expire_time if expire_time is None else expire_time
    await store.activate(lease.id, revocation={"username": f"u-{lease.id[-6:]}"},
                         expire_time=expire, renewable=lease.renewable)
    lease.expire_time = expire
    lease.state = LeaseState.ACTIVE
    return lease


async def put_many_active(store: LeaseStore, leases: list[Lease], *, chunk: int = 2000) -> None:
    """Issue many leases concurrently, ``chunk`` at a time."""
    for start in range(0, len(leases), chunk):
        await asyncio.gather(*(put_active(store, lease) for lease in leases[start:start + chunk]))


def make_token(accessor: str, *, parent: str | None = None, expire_time: float | None = T0 + 60,
               display_name: str = "") -> Token:
    return Token(
        accessor=accessor,
        token_hash=f"hash-{accessor}",
        policies=["default", "ci"],
        created=T0,
        expire_time=expire_time,
        display_name=display_name,
        metadata={"run_id": "42"},
        parent=parent,
        max_expire_time=None if expire_time is None else expire_time + 600,
    )
