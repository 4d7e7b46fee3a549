"""One lease-store budget per HTTP request (broker/store/deadline.py), on real stores.

A stalled store must answer a request's 503 within one ``command_timeout``,
however many store calls the request makes: each waiting its own full timeout
made a client wait two or three of them. The stalls here are real: a lock
another PostgreSQL session holds, the SQLite store's write lock held by
another file descriptor.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from broker.errors import StoreUnavailable
from broker.lease import LeaseFilter
from broker.store.deadline import current_budget, joined, request_budget
from broker.store.postgres import PostgresStore
from broker.store.sqlite import SQLiteStore
from tests.integration import stall_fixtures
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, start_broker, write_config
from tests.integration.stall_fixtures import TIMEOUT, locked
from tests.integration.store_fixtures import (
    make_lease,
    make_token,
    put_active,
)

pytestmark = pytest.mark.integration

pg_dsn = stall_fixtures.pg_dsn
pg_store = stall_fixtures.pg_store
pg_broker = stall_fixtures.pg_broker


async def test_an_issue_answers_503_within_one_command_timeout(
        pg_broker: BrokerThread, pg_dsn: str) -> None:
    """The intent waits 0.75 x command_timeout for a lock, then the activation stalls:
    the issue answers 503 after one command_timeout in all (it took 1.75 x)."""
    url = f"{pg_broker.url}/v1/noop/creds/r"
    headers = {"X-Vault-Token": ROOT_TOKEN}
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers) as warm:
            assert warm.status == 200, await warm.text()
        # The intent (an INSERT) waits for the table lock; the activation (FOR SHARE
        # on the token's row) for the row lock, which nothing on the way before it takes.
        table = await locked(pg_dsn, "LOCK TABLE leases IN SHARE MODE")
        row = await locked(pg_dsn, "SELECT 1 FROM tokens WHERE accessor = 'test-root'"
                                    " FOR NO KEY UPDATE")
        try:
            started = time.monotonic()
            issue = asyncio.ensure_future(http.get(url, headers=headers))
            await asyncio.sleep(0.75 * TIMEOUT)
            await table.execute("ROLLBACK")
            async with await issue as refused:
                took = time.monotonic() - started
                assert refused.status == 503, await refused.text()
                assert "lease store unavailable" in await refused.text()
        finally:
            await table.close()
            await row.close()
        assert took < 1.4 * TIMEOUT, f"the 503 took {took:.1f}s"
        # The next request has a budget of its own.
        async with http.get(url, headers=headers) as again:
            assert again.status == 200, await again.text()



def _pg_plugin_mount(dsn: str) -> str:
    """A ``postgres``-plugin mount (a two-step backend: the issue's intent and
    activation run beside its statements) on ``dsn``; its users carry "deadline"."""
    return f"""
[mounts.pg]
plugin = "postgres"
connection_url = "{dsn}"

[mounts.pg.roles.deadline]
creation_statements = ["CREATE ROLE \\"{{{{name}}}}\\" WITH LOGIN PASSWORD '{{{{password}}}}'"]
default_ttl = "1h"
max_ttl = "2h"
"""


async def _drop_deadline_roles(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for name in await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE "
                                     "'v-%deadline%'"):
            await conn.execute(f'DROP ROLE IF EXISTS "{name[0]}"')
    finally:
        await conn.close()


async def test_a_staged_issue_answers_503_within_one_command_timeout(
        tmp_path: Path, pg_dsn: str, postgres_dsn: str) -> None:
    """Through the postgres plugin the intent and the activation run in tasks of their
    own beside the backend's statements; they draw on the request's budget as well
    (each had the full timeout: 1.75 x)."""
    broker = start_broker(write_config(tmp_path, _pg_plugin_mount(postgres_dsn),
                                       storage_url=f"{pg_dsn}?command_timeout={TIMEOUT}"))
    url = f"{broker.url}/v1/pg/creds/deadline"
    headers = {"X-Vault-Token": ROOT_TOKEN}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url, headers=headers) as warm:
                assert warm.status == 200, await warm.text()
            table = await locked(pg_dsn, "LOCK TABLE leases IN SHARE MODE")
            row = await locked(pg_dsn, "SELECT 1 FROM tokens WHERE accessor = 'test-root'"
                                        " FOR NO KEY UPDATE")
            try:
                started = time.monotonic()
                issue = asyncio.ensure_future(http.get(url, headers=headers))
                await asyncio.sleep(0.75 * TIMEOUT)
                await table.execute("ROLLBACK")
                async with await issue as refused:
                    took = time.monotonic() - started
                    assert refused.status == 503, await refused.text()
            finally:
                await table.close()
                await row.close()
            assert took < 1.4 * TIMEOUT, f"the 503 took {took:.1f}s"
    finally:
        broker.stop()
        await _drop_deadline_roles(postgres_dsn)

async def test_a_request_s_postgres_calls_share_one_command_timeout(
        pg_store: PostgresStore, pg_dsn: str) -> None:
    """After a call waited out the timeout, the request's next calls (a statement, a
    block on a pooled connection) fail at once instead of waiting it out again."""
    lease = await put_active(pg_store, make_lease("pg/creds/ro/000001", issue_time=time.time()))
    locker = await locked(pg_dsn, "LOCK TABLE leases IN ACCESS EXCLUSIVE MODE")
    try:
        with request_budget():
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await pg_store.get(lease.id)
            first = time.monotonic() - started
            with pytest.raises(StoreUnavailable):
                await pg_store.list_ids(LeaseFilter(prefix="pg/"))  # GuardedPool.acquire
            with pytest.raises(StoreUnavailable):
                await pg_store.renew(lease.id, expire_time=time.time() + 60, now=time.time())
            took = time.monotonic() - started
    finally:
        await locker.close()
    assert first > 0.8 * TIMEOUT, f"the first call gave up after {first:.1f}s"
    assert took < 1.4 * TIMEOUT, f"three calls took {took:.1f}s"


async def test_tasks_a_request_starts_keep_their_own_timeout(
        pg_store: PostgresStore, pg_dsn: str) -> None:
    """A task created in a request (a worker, a revoke rule's expansion) does not draw
    on its spent budget; one the request joins to its own work does."""
    lease = await put_active(pg_store, make_lease("pg/creds/ro/000002", issue_time=time.time()))
    with request_budget() as budget:
        locker = await locked(pg_dsn, "LOCK TABLE leases IN ACCESS EXCLUSIVE MODE")
        try:
            with pytest.raises(StoreUnavailable):
                await pg_store.get(lease.id)
        finally:
            await locker.close()
        assert budget.left(TIMEOUT, asyncio.get_running_loop().time()) <= 0
        # The store answers again; the request has nothing left.
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await pg_store.get(lease.id)
        assert time.monotonic() - started < 0.5 * TIMEOUT
        background = asyncio.create_task(pg_store.get(lease.id))
        found = await background
        assert found is not None and found.id == lease.id
        with pytest.raises(StoreUnavailable):
            await asyncio.shield(joined(pg_store.get(lease.id)))
        assert not budget.joined
    assert current_budget() is None
    assert await pg_store.get(lease.id) is not None


async def test_only_time_in_store_calls_counts(pg_store: PostgresStore) -> None:
    """A request that first waited longer than command_timeout for something else
    (a slow backend) still has its whole store budget."""
    with request_budget():
        await asyncio.sleep(1.1 * TIMEOUT)
        await put_active(pg_store, make_lease("pg/creds/ro/000003", issue_time=time.time()))


async def test_a_request_s_sqlite_writes_share_one_command_timeout(tmp_path: Path) -> None:
    """The write lock is held for 0.75 x command_timeout, then again: the request's
    second write gives up when its budget ends, not a full timeout later; a third
    is refused at once."""
    db = tmp_path / "broker.db"
    store = SQLiteStore.from_url(f"sqlite:///{db}?command_timeout={TIMEOUT}")
    await store.open()
    lock = os.open(f"{db}-writer.lock", os.O_RDWR)
    loop = asyncio.get_running_loop()
    try:
        with request_budget():
            # flock locks are per open file: this descriptor's lock excludes the store's.
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            started = time.monotonic()
            loop.call_later(0.75 * TIMEOUT, fcntl.flock, lock, fcntl.LOCK_UN)
            await store.insert_token(make_token("acc-1"))
            waited = time.monotonic() - started
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            with pytest.raises(StoreUnavailable, match=r"no commit within 2s"):
                await store.insert_token(make_token("acc-2"))
            took = time.monotonic() - started
            with pytest.raises(StoreUnavailable):
                await store.insert_token(make_token("acc-3"))
            assert time.monotonic() - started - took < 0.2 * TIMEOUT
        fcntl.flock(lock, fcntl.LOCK_UN)
        assert waited > 0.6 * TIMEOUT
        assert took < 1.4 * TIMEOUT, f"two writes took {took:.1f}s"
        # Outside a request a write has its full timeout again.
        await store.insert_token(make_token("acc-4"))
        assert await store.token_by_accessor("acc-3") is None
    finally:
        os.close(lock)
        await store.close()


async def test_a_budget_cut_short_by_slow_calls_is_no_outage(
        pg_store: PostgresStore, pg_dsn: str) -> None:
    """The request's first call succeeds slowly (a lock held 0.75 x command_timeout);
    its next call runs out of what is left: a 503 for the request, but the store's
    health stays clear (it said "unavailable" for a stall the next request, with a
    budget of its own, may not meet)."""
    lease = await put_active(pg_store, make_lease("pg/creds/ro/000009", issue_time=time.time()))
    first = await locked(pg_dsn, "LOCK TABLE leases IN ACCESS EXCLUSIVE MODE")

    async def release_later() -> None:
        await asyncio.sleep(0.75 * TIMEOUT)
        await first.execute("ROLLBACK")

    releasing = asyncio.ensure_future(release_later())
    try:
        with request_budget():
            assert (await pg_store.get(lease.id)) is not None  # slow, but it answers
            await releasing
            second = await locked(pg_dsn, "LOCK TABLE leases IN ACCESS EXCLUSIVE MODE")
            try:
                with pytest.raises(StoreUnavailable, match="store time is spent"):
                    await pg_store.get(lease.id)
            finally:
                await second.close()
    finally:
        await first.close()
    assert pg_store.error is None
