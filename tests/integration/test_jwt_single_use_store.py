"""The store side of single-use JWTs (record_jwt_use, purge_used_jwts), on every store kind.

Part of the LeaseStore suite: each test runs once per kind in STORE_KINDS (SQLite and
PostgreSQL), against the protocol only; the replica test needs two PostgreSQL stores on
one database. Also: a store from before the migration upgrades and keeps its tokens.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.jobs import purge_ended
from broker.store import open_store
from broker.store import postgres as pg_store
from broker.store import sqlite as sqlite_store
from broker.store.base import LeaseStore
from tests.integration import store_fixtures
from tests.integration.store_fixtures import (
    T0,
    fresh_postgres_database,
    make_token,
    open_replicas,
    store_before,
    stored_schema_version,
)

pytestmark = pytest.mark.integration

HASH = "a" * 64


# The store suite's fixtures (tests/integration/store_fixtures.py), under the names used here.
store_maker = store_fixtures.each_store_maker
store = store_fixtures.each_store


async def test_a_jwt_is_recorded_once_per_method(store: LeaseStore) -> None:
    """The first record answers None; again (any accessor) the first accessor; the same
    jti hash through another auth method is another JWT."""
    assert await store.record_jwt_use("github", HASH, accessor="acc-1", until=T0 + 300,
                                      now=T0) is None
    assert await store.record_jwt_use("github", HASH, accessor="acc-2", until=T0 + 300,
                                      now=T0 + 1) == "acc-1"
    assert await store.record_jwt_use("gitlab", HASH, accessor="acc-3", until=T0 + 300,
                                      now=T0 + 1) is None
    assert await store.record_jwt_use("github", "b" * 64, accessor="acc-4", until=T0 + 300,
                                      now=T0 + 1) is None


async def test_a_record_is_forgotten_only_for_its_own_accessor(store: LeaseStore) -> None:
    """forget_jwt_use (a login whose token was never made) deletes the record it names;
    the same JWT then logs in again. Another accessor's forget changes nothing."""
    assert await store.record_jwt_use("github", HASH, accessor="acc-1", until=T0 + 300,
                                      now=T0) is None
    await store.forget_jwt_use("github", HASH, accessor="acc-other")
    assert await store.record_jwt_use("github", HASH, accessor="acc-2", until=T0 + 300,
                                      now=T0) == "acc-1"
    await store.forget_jwt_use("github", HASH, accessor="acc-1")
    assert await store.record_jwt_use("github", HASH, accessor="acc-3", until=T0 + 300,
                                      now=T0) is None


async def test_concurrent_records_of_one_jwt_let_one_through(store: LeaseStore) -> None:
    """Twenty records of one JWT at once: exactly one is the first."""
    answers = await asyncio.gather(*(
        store.record_jwt_use("github", HASH, accessor=f"acc-{n}", until=T0 + 300, now=T0)
        for n in range(20)))
    firsts = [n for n, answer in enumerate(answers) if answer is None]
    assert len(firsts) == 1
    assert {a for a in answers if a is not None} <= {f"acc-{firsts[0]}", ""}


async def test_a_record_past_its_end_is_taken_over(store: LeaseStore) -> None:
    """A record whose JWT could no longer log in (not yet purged) does not refuse a new
    JWT with the same jti (an issuer that reuses ids); one still valid does."""
    await store.record_jwt_use("github", HASH, accessor="acc-1", until=T0 + 60, now=T0)
    assert await store.record_jwt_use("github", HASH, accessor="acc-2", until=T0 + 400,
                                      now=T0 + 60) == "acc-1"
    assert await store.record_jwt_use("github", HASH, accessor="acc-2", until=T0 + 400,
                                      now=T0 + 61) is None
    assert await store.record_jwt_use("github", HASH, accessor="acc-3", until=T0 + 900,
                                      now=T0 + 399) == "acc-2"


async def test_used_jwts_are_purged_once_past_their_end(store: LeaseStore) -> None:
    """purge_used_jwts deletes records valid until before the cut-off, limit at a time;
    jobs.purge_ended does it with jwts_before, and not without."""
    for n in range(5):
        await store.record_jwt_use("github", f"{n:064d}", accessor=f"acc-{n}",
                                   until=T0 + 10 * n, now=T0)
    assert await store.purge_used_jwts(before=T0 + 25, limit=2) == 2  # 0, 10
    assert await store.purge_used_jwts(before=T0 + 25, limit=2) == 1  # 20
    assert await store.purge_used_jwts(before=T0 + 25, limit=2) == 0
    # Gone: the same JWT is a first use again; the others are still recorded.
    assert await store.record_jwt_use("github", f"{0:064d}", accessor="again", until=T0,
                                      now=T0 - 1) is None
    assert await store.record_jwt_use("github", f"{4:064d}", accessor="x", until=T0 + 40,
                                      now=T0) == "acc-4"

    assert await purge_ended(store, before=T0 + 1000) == 0  # the tombstone cut-off only
    assert await purge_ended(store, before=T0, jwts_before=T0 + 1000, batch=1) == 3
    assert await store.purge_used_jwts(before=T0 + 10_000, limit=10) == 0


async def test_two_replicas_let_one_record_through(request: pytest.FixtureRequest) -> None:
    """Two PostgreSQL stores (replicas) on one database, ten records each at once, of
    one JWT: one is the first, and each replica then sees the other's record."""
    dsn = await fresh_postgres_database(request)
    async with open_replicas(dsn) as (a, b):
        answers = await asyncio.gather(*(
            replica.record_jwt_use("github", HASH, accessor=f"acc-{n}", until=T0 + 300,
                                   now=T0)
            for n in range(10) for replica in (a, b)))
        assert answers.count(None) == 1
        first = next(f"acc-{i // 2}" for i, answer in enumerate(answers) if answer is None)
        assert await a.record_jwt_use("github", HASH, accessor="late", until=T0 + 300,
                                      now=T0 + 1) == first
        assert await b.record_jwt_use("github", HASH, accessor="late", until=T0 + 300,
                                      now=T0 + 1) == first


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_store_from_before_upgrades(kind: str, request: pytest.FixtureRequest,
                                            tmp_path: Path) -> None:
    """Opening an older store adds used_jwts and tokens.path: its tokens read as before
    (path "" : auth/token/create), new tokens keep their path, JWT uses are recorded."""
    url = (f"sqlite:///{tmp_path / 'old.db'}" if kind == "sqlite"
           else await fresh_postgres_database(request))
    old = make_token("old-acc", display_name="github-repo:acme/app")
    # Before used_jwts (and tokens.path).
    await store_before(url, "CREATE TABLE used_jwts", old)
    store = open_store(url)
    await store.open()
    try:
        got = await store.token_by_accessor("old-acc")
        assert got is not None
        assert (got.display_name, got.path) == ("github-repo:acme/app", "")
        new = make_token("new-acc")
        new.path = "auth/github/login"
        await store.insert_token(new)
        again = await store.token_by_accessor("new-acc")
        assert again is not None and again.path == "auth/github/login"
        assert await store.record_jwt_use("github", HASH, accessor="new-acc", until=T0 + 60,
                                          now=T0) is None
    finally:
        await store.close()
    latest = len(sqlite_store.MIGRATIONS if kind == "sqlite" else pg_store.MIGRATIONS)
    assert await stored_schema_version(url) == latest
