"""The PostgreSQL store's connection pool when every connection is stuck.

``command_timeout`` promises that a store call answers 503 ("lease store
unavailable") in that time, before a client such as hvac gives up at its own
30 s. That must hold for a call that first waits for a pooled connection too:
when the database stops finishing statements (a primary waiting for a lost
synchronous standby, a lock held somewhere), every connection is busy until
its own timeout and the callers queued behind them must not wait their turns
one after another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from broker.errors import StoreUnavailable
from broker.store.postgres import PostgresStore
from tests.integration.store_fixtures import fresh_postgres_database, make_lease, put_active

pytestmark = pytest.mark.integration

TIMEOUT = 1.0


@pytest.fixture
async def pg_dsn(request: pytest.FixtureRequest) -> str:
    return await fresh_postgres_database(request)


@pytest.fixture
async def store(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore.from_url(f"{pg_dsn}?pool_min_size=1&pool_max_size=1"
                               f"&command_timeout={TIMEOUT}")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_calls_queued_for_a_stuck_pool_answer_503_within_command_timeout(
    store: PostgresStore, pg_dsn: str,
) -> None:
    """With the pool's one connection stuck on a locked row, four renewals queued
    for it each answer 503 within about command_timeout, not 1, 2, 3 and 4 s."""
    lease = await put_active(store, make_lease("pg/creds/ro/000001", issue_time=time.time()))
    blocker = await asyncpg.connect(pg_dsn)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM leases WHERE id = $1 FOR UPDATE", lease.id)

        async def renew() -> tuple[float, BaseException | bool]:
            started = time.monotonic()
            try:
                result: BaseException | bool = await store.renew(
                    lease.id, expire_time=time.time() + 60, now=time.time())
            except Exception as exc:
                result = exc
            return time.monotonic() - started, result

        outcomes = await asyncio.gather(*(renew() for _ in range(4)))
        await tx.rollback()
    finally:
        await blocker.close()
    assert all(isinstance(result, StoreUnavailable) for _, result in outcomes), outcomes
    slowest = max(took for took, _ in outcomes)
    # Queued one behind the other they took 1, 2, 3 and 4 x TIMEOUT: any call that
    # waited out another's timeout first takes 2 x. The bound is that, not TIMEOUT +
    # 0.5 s: half a second of a loaded machine's delay failed the test.
    assert slowest < 2 * TIMEOUT, f"a call waited {slowest:.1f}s: {outcomes}"
    # The pool works again once the lock is gone.
    assert await store.renew(lease.id, expire_time=time.time() + 60, now=time.time())
    assert store.error is None or await _healthy(store)


async def _healthy(store: PostgresStore) -> bool:
    """After a timeout the store probes with a commit every second until one goes through."""
    for _ in range(40):
        if store.error is None:
            return True
        await asyncio.sleep(0.1)
    return False
