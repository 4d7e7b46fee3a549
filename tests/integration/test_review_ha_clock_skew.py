"""Replicas whose clocks disagree, on one PostgreSQL lease store.

Lease times (issue, expiry, claim ends, revoke rules) are written from each
replica's own clock. These tests give one replica a clock that runs ahead
(the way a host with a broken NTP set-up does) and check that it neither
revokes anything early nor misses anything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from broker.config import LeaseConfig
from broker.lease import Lease, LeaseFilter, LeaseState
from broker.store.postgres import PostgresStore
from broker.sweeper import Sweeper
from tests.integration.store_fixtures import (
    fresh_postgres_database,
    lid,
    make_lease,
    open_replicas,
    put_active,
)

pytestmark = pytest.mark.integration

#: how far the skewed replica's clock runs ahead of the others' (and the database's).
AHEAD = 90.0


@pytest.fixture
async def replicas(request: pytest.FixtureRequest
                   ) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    async with open_replicas(await fresh_postgres_database(request)) as pair:
        yield pair


async def test_a_replica_whose_clock_runs_ahead_claims_nothing_before_it_is_due(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """B's clock is 90 s ahead: it claims neither a lease due in 30 s nor one A has
    just claimed for 60 s; once the lease is really due, it is claimed as usual."""
    a, b = replicas
    now = time.time()
    await put_active(a, make_lease(lid(1), issue_time=now, ttl=30))
    await put_active(a, make_lease(lid(2), issue_time=now - 60, ttl=1))
    [held] = await a.claim_due(now=now, limit=10, claimer="a", claim_timeout=60)
    assert held.id == lid(2)
    assert await b.claim_due(now=now + AHEAD, limit=10, claimer="b", claim_timeout=60) == []
    lease = await a.get(lid(1))
    assert lease is not None and lease.state is LeaseState.ACTIVE
    # Due now by everyone's clock (issued long ago): B claims it at once.
    await put_active(a, make_lease(lid(3), issue_time=now - 60, ttl=1))
    got = await b.claim_due(now=now + AHEAD, limit=10, claimer="b", claim_timeout=60)
    assert [x.id for x in got] == [lid(3)]


async def test_a_sweeper_whose_clock_runs_ahead_revokes_nothing_early(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """A sweeper on the skewed replica leaves a lease issued on A alone until it
    is due by the database's clock, then revokes it; it polls the store gently
    meanwhile, not every 50 ms."""
    a, b = replicas
    revoked: list[tuple[str, float]] = []
    done = asyncio.Event()

    async def revoke(lease: Lease, release: Callable[[], None]) -> None:
        release()
        revoked.append((lease.id, time.time()))
        await b.finish_revoke(lease.id, state=LeaseState.EXPIRED, now=time.time())
        done.set()

    calls = 0
    claim_due = b.claim_due

    async def counting_claim_due(**kwargs: object) -> list[Lease]:
        nonlocal calls
        calls += 1
        return await claim_due(**kwargs)  # type: ignore[arg-type]

    b.claim_due = counting_claim_due  # type: ignore[method-assign]
    sweeper = Sweeper(b, revoke, LeaseConfig(claim_timeout=60), node_id="b",
                      clock=lambda: time.time() + AHEAD)
    b.add_wake_listener(sweeper.wake)
    sweeper.start()
    try:
        lease = make_lease(lid(1), issue_time=time.time(), ttl=3)
        await put_active(a, lease)
        await asyncio.wait_for(done.wait(), timeout=10.0)
    finally:
        await sweeper.stop(grace=1.0)
    [(lease_id, at)] = revoked
    assert lease_id == lid(1)
    assert at >= lease.expire_time - 0.5, f"revoked {lease.expire_time - at:.1f}s early"
    # About 3 s of "due by my clock, not claimable": a 50 ms poll would be 60 claims.
    assert calls <= 20, f"{calls} claims while waiting for one lease"


async def test_revoke_prefix_covers_a_lease_issued_before_it_on_a_replica_ahead(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """A lease issued on B (clock ahead) one second before A's revoke-prefix is
    counted by it, so it must be covered too: read as revoking, refused a
    renewal, and queued by the rule's expansion; one issued after is not."""
    a, b = replicas
    now = time.time()
    for n in range(4):
        await put_active(a, make_lease(lid(n), issue_time=now - 10))
    # Issued on B one second before the revoke: B's clock reads AHEAD - 1 s later.
    await put_active(b, make_lease(lid(99), issue_time=now + AHEAD - 1))
    queued = await a.queue_revoke_rule(
        LeaseFilter(prefix="pg/creds/ro/"), reason="prefix", now=now, inline_max=0,
        claimer="a", claim_until=now + 60)
    assert queued.queued == 5 and queued.rule_id is not None
    late = await b.get(lid(99))
    assert late is not None and late.state is LeaseState.REVOKING
    assert not await b.renew(lid(99), expire_time=now + AHEAD + 600, now=now + AHEAD)
    while True:
        step = await a.expand_revoke_rule(queued.rule_id, claimer="a", now=now, limit=2,
                                          claim_until=now + 60)
        assert step is not None
        if step.done:
            break
    async with a.pool.acquire() as conn:
        states = dict(await conn.fetch("SELECT id, state FROM leases"))
    assert states == {**{lid(n): "revoking" for n in range(4)}, lid(99): "revoking"}
    # A lease issued after the revoke (by any clock) is not covered by it.
    await put_active(a, make_lease(lid(100), issue_time=now + AHEAD + 1))
    fresh = await a.get(lid(100))
    assert fresh is not None and fresh.state is LeaseState.ACTIVE
