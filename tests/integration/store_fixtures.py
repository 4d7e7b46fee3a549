"""Store kinds the lease store suite runs against, and helpers to fill a store (or to
make one as an older broker left it, and read its schema version).

A kind is a factory: given the pytest request and a temporary directory it
yields a ``StoreMaker`` whose stores all share one backing database, so a test
can close a store and open another on the same data. To run the whole suite
against a new store, add its factory to ``STORE_KINDS``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from broker.lease import Lease, LeaseState, Token
from broker.store import postgres as pg_store
from broker.store import sqlite as sqlite_store
from broker.store.base import LeaseStore
from broker.store.postgres import PostgresStore
from broker.store.sqlite import SQLiteStore

__all__ = [
    "STORE_KINDS",
    "T0",
    "StoreMaker",
    "broker_store_url",
    "fresh_postgres_database",
    "lid",
    "make_lease",
    "make_token",
    "open_replicas",
    "put_active",
    "put_many_active",
    "store_before",
    "stored_schema_version",
]

#: A fixed "now" for the tests: stores take times as arguments, never read a clock.
T0 = 1_700_000_000.0


@dataclass
class StoreMaker:
    """Builds (unopened) stores that all use the same backing database."""

    build: Callable[[], LeaseStore]
    #: reads the recorded schema version straight from the database.
    schema_version: Callable[[], Any]
    #: the newest schema version this store kind knows.
    latest_version: int


@asynccontextmanager
async def sqlite_kind(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreMaker]:
    # A directory that does not exist yet: open() must create it.
    url = f"sqlite:///{tmp_path / 'state' / 'broker.db'}"
    yield StoreMaker(build=lambda: SQLiteStore.from_url(url),
                     schema_version=lambda: stored_schema_version(url),
                     latest_version=len(sqlite_store.MIGRATIONS))


#: admin DSN -> DSN of the database this test session created on that server.
_PG_DATABASES: dict[str, str] = {}


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _drop_database(admin_dsn: str, name: str) -> None:
    async def drop() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            # FORCE: a store a failed test left open must not keep the database alive.
            await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
            await conn.execute(f"DROP ROLE IF EXISTS {_quote_ident(name)}")
        finally:
            await conn.close()

    # Session clean-up is synchronous; its own thread is sure to have no running loop.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, drop()).result()


async def fresh_postgres_database(request: pytest.FixtureRequest) -> str:
    """DSN of this session's own test database, with every broker table dropped.

    The database (``broker_store_test_<random>``) is created on the server of the
    ``postgres_dsn`` fixture on first use and dropped when the session ends, so
    other work on the same server is never touched. Dropping the tables before
    each test gives it an empty, not yet migrated database, as a new SQLite file.

    The store connects as a role of the same name that owns the database and
    is nothing more (no superuser, no CREATEROLE, no CREATEDB), as
    docs/operations.md tells operators to set it up.
    """
    admin = request.getfixturevalue("postgres_dsn")
    dsn = _PG_DATABASES.get(admin)
    if dsn is None:
        name = f"broker_store_test_{secrets.token_hex(6)}"
        password = secrets.token_hex(16)
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f"CREATE ROLE {_quote_ident(name)} LOGIN PASSWORD '{password}'")
            try:
                # A locale-aware default collation ("b" < "B"), as most servers have: the
                # store must still sort and match id prefixes byte-wise, like SQLite.
                await conn.execute(f"CREATE DATABASE {_quote_ident(name)} TEMPLATE template0"
                                   f" LOCALE_PROVIDER icu ICU_LOCALE 'en-US' OWNER {_quote_ident(name)}")
            except asyncpg.PostgresError:  # before PostgreSQL 15, or built without ICU
                await conn.execute(f"CREATE DATABASE {_quote_ident(name)} OWNER {_quote_ident(name)}")
        finally:
            await conn.close()
        request.config.add_cleanup(lambda: _drop_database(admin, name))
        parts = urlsplit(admin)
        host = parts.netloc.rpartition("@")[2]
        dsn = _PG_DATABASES[admin] = urlunsplit(parts._replace(
            netloc=f"{name}:{password}@{host}", path=f"/{name}"))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS leases, tokens, revoke_rules, used_jwts,"
                           " schema_version")
    finally:
        await conn.close()
    return dsn


def broker_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """For a fixture with params ``["sqlite", "postgresql"]``: the store a broker uses.

    A SQLite file in ``tmp_path``, or the session's own empty PostgreSQL
    database (:func:`fresh_postgres_database`).
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'broker.db'}"
    return asyncio.run(fresh_postgres_database(request))


@asynccontextmanager
async def postgres_kind(request: pytest.FixtureRequest, tmp_path: Path
                        ) -> AsyncIterator[StoreMaker]:
    dsn = await fresh_postgres_database(request)
    yield StoreMaker(build=lambda: PostgresStore.from_url(dsn),
                     schema_version=lambda: stored_schema_version(dsn),
                     latest_version=len(pg_store.MIGRATIONS))


async def stored_schema_version(url: str) -> int:
    """The schema version recorded in the store at ``url`` (SQLite or PostgreSQL), read
    straight from its database."""
    query = "SELECT max(version) FROM schema_version"
    if url.startswith("sqlite"):
        def read() -> int:
            conn = sqlite3.connect(url.removeprefix("sqlite:///"))
            try:
                return int(conn.execute(query).fetchone()[0])
            finally:
                conn.close()

        return await asyncio.to_thread(read)
    pg = await asyncpg.connect(url)
    try:
        return int(await pg.fetchval(query))
    finally:
        await pg.close()


async def store_before(url: str, marker: str, token: Token) -> None:
    """Make the store at ``url`` (a new SQLite file, an empty PostgreSQL database) what an older
    broker left: at the schema version before the first migration with a statement that
    holds ``marker`` (``"ADD COLUMN period"``), with ``token`` in it. For the tests that
    open such a store: the upgrade must keep what it holds.

    The version is found by the marker, not counted ("all but the last"): later features
    add migrations of their own. The token is written with the columns the first schema
    has (accessor, hash, policies, times, display name), active.
    """
    kind = sqlite_store if url.startswith("sqlite") else pg_store
    before = next(i for i, step in enumerate(kind.MIGRATIONS) if any(marker in s for s in step))
    row = (token.accessor, token.token_hash, json.dumps(token.policies), token.created,
           token.expire_time, token.display_name, token.renewable)
    columns = ("INSERT INTO tokens (accessor, token_hash, policies, created, expire_time,"
               " display_name, renewable, state)")
    if kind is sqlite_store:
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                         " applied_at REAL NOT NULL)")
            for version, statements in enumerate(kind.MIGRATIONS[:before], 1):
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (?, 0)", (version,))
            conn.execute(columns + " VALUES (?, ?, ?, ?, ?, ?, ?, 'active')", row)
            conn.commit()
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(url)
    try:
        await pg.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                         " applied_at DOUBLE PRECISION NOT NULL)")
        for version, statements in enumerate(kind.MIGRATIONS[:before], 1):
            for statement in statements:
                await pg.execute(statement)
            await pg.execute("INSERT INTO schema_version VALUES ($1, 0)", version)
        await pg.execute(columns + " VALUES ($1, $2, $3, $4, $5, $6, $7, 'active')", *row)
    finally:
        await pg.close()


StoreKind = Callable[[pytest.FixtureRequest, Path], AbstractAsyncContextManager[StoreMaker]]

#: kind name -> factory; the whole suite in test_lease_store.py runs once per kind.
STORE_KINDS: dict[str, StoreKind] = {"sqlite": sqlite_kind, "postgres": postgres_kind}


# Fixtures of the store suites that run once per store kind. A module uses them by
# binding them to its own names (``store_maker = store_fixtures.each_store_maker``):
# pytest finds a fixture by the name it has in the test module.
@pytest.fixture(params=sorted(STORE_KINDS))
async def each_store_maker(request: pytest.FixtureRequest, tmp_path: Path
                           ) -> AsyncIterator[StoreMaker]:
    """A StoreMaker of each store kind in turn (the test runs once per kind)."""
    async with STORE_KINDS[request.param](request, tmp_path) as maker:
        yield maker


@pytest.fixture
async def each_store(store_maker: StoreMaker) -> AsyncIterator[LeaseStore]:
    """An open store built by the module's ``store_maker`` fixture, closed afterwards."""
    s = store_maker.build()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


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


@asynccontextmanager
async def open_replicas(dsn: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two PostgreSQL stores on one database, opened: two replicas' views of it."""
    a, b = PostgresStore.from_url(dsn), PostgresStore.from_url(dsn)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def lid(n: int) -> str:
    """A lease id of the ``pg`` mount's ``ro`` role, numbered."""
    return f"pg/creds/ro/{n:06d}"
