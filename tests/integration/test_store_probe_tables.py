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

import aiohttp
import pytest

from broker.errors import StoreUnavailable
from broker.store.postgres import PostgresStore
from tests.integration import stall_fixtures
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread
from tests.integration.stall_fixtures import TIMEOUT, locked
from tests.integration.store_fixtures import make_token

pytestmark = pytest.mark.integration

pg_dsn = stall_fixtures.pg_dsn
pg_store = stall_fixtures.pg_store
pg_broker = stall_fixtures.pg_broker


async def _health(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/v1/sys/health") as answer:
        return answer.status


async def test_health_stays_unavailable_while_only_leases_is_locked(
        pg_broker: BrokerThread, pg_dsn: str) -> None:
    """An issue meets the lock (503); health, polled every 0.5 s for 8 s, never answers
    200 while the lock is held (it did ~1 s in: the probe committed); after the lock
    goes, it does, and the next issue works."""
    headers = {"X-Vault-Token": ROOT_TOKEN}
    creds = f"{pg_broker.url}/v1/noop/creds/r"
    async with aiohttp.ClientSession() as http:
        async with http.get(creds, headers=headers) as warm:
            assert warm.status == 200, await warm.text()
        assert await _health(http, pg_broker.url) == 200
        locker = await locked(pg_dsn, "LOCK TABLE leases IN ACCESS EXCLUSIVE MODE")
        try:
            async with http.get(creds, headers=headers) as refused:
                assert refused.status == 503, await refused.text()
            seen = []
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                seen.append(await _health(http, pg_broker.url))
                await asyncio.sleep(0.5)
            assert 200 not in seen, seen
        finally:
            await locker.close()
        deadline = time.monotonic() + 4 * TIMEOUT
        while await _health(http, pg_broker.url) != 200:
            assert time.monotonic() < deadline, "health did not come back after the lock"
            await asyncio.sleep(0.2)
        async with http.get(creds, headers=headers) as again:
            assert again.status == 200, await again.text()


@pytest.mark.parametrize("mode", ["ACCESS EXCLUSIVE", "SHARE"])
async def test_the_store_stays_unhealthy_while_only_tokens_is_locked(
        pg_store: PostgresStore, pg_dsn: str, mode: str) -> None:
    """The same for the tokens table, on the store itself: a token write times out (in
    SHARE mode reads go on, writes wait), and the store's error stays set for 6 s while
    the lock is held; it clears once it goes."""
    locker = await locked(pg_dsn, f"LOCK TABLE tokens IN {mode} MODE")
    try:
        with pytest.raises(StoreUnavailable):
            await pg_store.insert_token(make_token("probe-1"))
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            assert pg_store.error is not None, "the probe said healthy while tokens is locked"
            await asyncio.sleep(0.25)
    finally:
        await locker.close()
    deadline = time.monotonic() + 4 * TIMEOUT
    while pg_store.error is not None:
        assert time.monotonic() < deadline, "the store did not come back after the lock"
        await asyncio.sleep(0.1)
    await pg_store.insert_token(make_token("probe-2"))
    assert await pg_store.token_by_accessor("probe-2") is not None
