"""Store health during a partial stall: the write probe touches the tables requests use.

With only ``leases`` locked (``LOCK TABLE leases IN ACCESS EXCLUSIVE MODE`` in
another session), every issue, renewal and revocation timed out, while the pool's
write probe (a bare ``SELECT txid_current()``) committed: ``/v1/sys/health`` and the
log flapped between "unreachable" and "reachable again" every few seconds. The
probe's transaction now takes the lock every lease and token write takes, so health
stays unavailable until requests can work again. Real PostgreSQL, real locks, a real
broker over HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from broker.bench.noop import register as register_noop_plugin
from broker.errors import StoreUnavailable
from broker.store.postgres import PostgresStore
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, start_broker, write_config
from tests.integration.store_fixtures import fresh_postgres_database, make_token

pytestmark = pytest.mark.integration

#: command_timeout of the store (seconds).
TIMEOUT = 2.0

MOUNT = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.r]
default_ttl = "1h"
max_ttl = "2h"
"""


@pytest.fixture
async def pg_dsn(request: pytest.FixtureRequest) -> str:
    return await fresh_postgres_database(request)


@pytest.fixture
def broker(tmp_path: Path, pg_dsn: str) -> Iterator[BrokerThread]:
    register_noop_plugin()
    server = start_broker(write_config(tmp_path, MOUNT,
                                       storage_url=f"{pg_dsn}?command_timeout={TIMEOUT}"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def store(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    opened = PostgresStore.from_url(f"{pg_dsn}?command_timeout={TIMEOUT}")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def _locked(dsn: str, statement: str) -> asyncpg.Connection:
    """A session holding the lock ``statement`` takes, in a transaction it keeps open."""
    conn = await asyncpg.connect(dsn)
    await conn.execute("BEGIN")
    await conn.execute(statement)
    return conn


async def _health(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/v1/sys/health") as answer:
        return answer.status


async def test_health_stays_unavailable_while_only_leases_is_locked(
        broker: BrokerThread, pg_dsn: str) -> None:
    """An issue meets the lock (503); health, polled every 0.5 s for 8 s, never answers
    200 while the lock is held (it did ~1 s in: the probe committed); after the lock
    goes, it does, and the next issue works."""
    headers = {"X-Vault-Token": ROOT_TOKEN}
    creds = f"{broker.url}/v1/noop/creds/r"
    async with aiohttp.ClientSession() as http:
        async with http.get(creds, headers=headers) as warm:
            assert warm.status == 200, await warm.text()
        assert await _health(http, broker.url) == 200
        locker = await _locked(pg_dsn, "LOCK TABLE leases IN ACCESS EXCLUSIVE MODE")
        try:
            async with http.get(creds, headers=headers) as refused:
                assert refused.status == 503, await refused.text()
            seen = []
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                seen.append(await _health(http, broker.url))
                await asyncio.sleep(0.5)
            assert 200 not in seen, seen
        finally:
            await locker.close()
        deadline = time.monotonic() + 4 * TIMEOUT
        while await _health(http, broker.url) != 200:
            assert time.monotonic() < deadline, "health did not come back after the lock"
            await asyncio.sleep(0.2)
        async with http.get(creds, headers=headers) as again:
            assert again.status == 200, await again.text()


@pytest.mark.parametrize("mode", ["ACCESS EXCLUSIVE", "SHARE"])
async def test_the_store_stays_unhealthy_while_only_tokens_is_locked(
        store: PostgresStore, pg_dsn: str, mode: str) -> None:
    """The same for the tokens table, on the store itself: a token write times out (in
    SHARE mode reads go on, writes wait), and the store's error stays set for 6 s while
    the lock is held; it clears once it goes."""
    locker = await _locked(pg_dsn, f"LOCK TABLE tokens IN {mode} MODE")
    try:
        with pytest.raises(StoreUnavailable):
            await store.insert_token(make_token("probe-1"))
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            assert store.error is not None, "the probe said healthy while tokens is locked"
            await asyncio.sleep(0.25)
    finally:
        await locker.close()
    deadline = time.monotonic() + 4 * TIMEOUT
    while store.error is not None:
        assert time.monotonic() < deadline, "the store did not come back after the lock"
        await asyncio.sleep(0.1)
    await store.insert_token(make_token("probe-2"))
    assert await store.token_by_accessor("probe-2") is not None
