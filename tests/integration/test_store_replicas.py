"""Several broker replicas on one PostgreSQL lease store.

Each test opens two ``PostgresStore`` objects on the same database: two
replicas, each with its own pool and its own wake-up listener connection.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg
import pytest

from broker.config import LeaseConfig
from broker.lease import Lease, LeaseFilter, LeaseState, TokenState
from broker.store.postgres import PostgresStore
from broker.sweeper import Sweeper
from tests.integration.store_fixtures import (
    T0,
    fresh_postgres_database,
    lid,
    make_lease,
    make_token,
    open_replicas,
    put_active,
    put_many_active,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def pg_dsn(request: pytest.FixtureRequest) -> str:
    """This session's PostgreSQL test database, empty."""
    return await fresh_postgres_database(request)


@pytest.fixture
async def replicas(pg_dsn: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    async with open_replicas(pg_dsn) as pair:
        yield pair


class Wakes:
    """Records wake-up callbacks with their arrival time."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float | None]] = []
        self._event = asyncio.Event()

    def __call__(self, at: float | None) -> None:
        self.calls.append((time.monotonic(), at))
        self._event.set()

    async def next(self, timeout: float) -> float | None:
        await asyncio.wait_for(self._event.wait(), timeout)
        self._event.clear()
        return self.calls[-1][1]


async def test_concurrent_claim_loops_claim_every_lease_once(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """Two replicas claiming 2,000 due leases in loops claim each exactly once, missing none."""
    a, b = replicas
    await put_many_active(a, [make_lease(lid(n), ttl=n % 97 + 1) for n in range(2000)])
    got: dict[str, list[str]] = {}

    async def loop(store: PostgresStore, name: str) -> None:
        mine = got.setdefault(name, [])
        while batch := await store.claim_due(now=T0 + 1000, limit=37, claimer=name,
                                             claim_timeout=60):
            dues = [lease.expire_time for lease in batch]
            assert dues == sorted(dues)
            mine.extend(lease.id for lease in batch)

    # Two loops per replica: four claimers, two pools.
    await asyncio.gather(loop(a, "a1"), loop(b, "b1"), loop(a, "a2"), loop(b, "b2"))
    ids = [i for batch in got.values() for i in batch]
    assert len(ids) == len(set(ids)) == 2000
    assert all(got[name] for name in got), {k: len(v) for k, v in got.items()}
    # The store recorded who holds each claim.
    async with a.pool.acquire() as conn:
        rows = await conn.fetch("SELECT id, claimed_by FROM leases")
    holder = {row["id"]: row["claimed_by"] for row in rows}
    assert all(holder[i] == name for name, batch in got.items() for i in batch)
    assert await a.next_due() == T0 + 1060


async def test_a_dead_replicas_claims_pass_to_another(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """A replica that dies with claimed leases leaves exactly those to another after claim_timeout."""
    a, b = replicas
    await put_many_active(b, [make_lease(lid(n), ttl=n + 1) for n in range(50)])
    taken = await a.claim_due(now=T0 + 100, limit=20, claimer="a", claim_timeout=30)
    await a.close()  # dies: none of the 20 finished
    others = await b.claim_due(now=T0 + 100, limit=100, claimer="b", claim_timeout=30)
    assert len(taken) == 20 and len(others) == 30
    assert not {x.id for x in taken} & {x.id for x in others}
    for lease in others:  # B is alive: it finishes its own
        await b.finish_revoke(lease.id, state=LeaseState.EXPIRED, now=T0 + 101)
    assert await b.claim_due(now=T0 + 129, limit=100, claimer="b", claim_timeout=30) == []
    again = await b.claim_due(now=T0 + 130, limit=100, claimer="b", claim_timeout=30)
    assert [x.id for x in again] == [x.id for x in taken]
    assert {x.revoke_reason for x in again} == {"expire"}


async def test_a_claim_in_flight_is_skipped_not_waited_for(
    replicas: tuple[PostgresStore, PostgresStore], pg_dsn: str,
) -> None:
    """Rows locked by a replica's open claim are skipped at once, and free again if it dies."""
    a, b = replicas
    await put_many_active(a, [make_lease(lid(n), ttl=n + 1) for n in range(10)])
    dying = await asyncpg.connect(pg_dsn)
    tx = dying.transaction()
    await tx.start()
    # A claim half done: the three oldest rows are locked, nothing is committed yet.
    await dying.execute("SELECT id FROM leases ORDER BY due_at LIMIT 3 FOR UPDATE")
    started = time.monotonic()
    claimed = await b.claim_due(now=T0 + 100, limit=100, claimer="b", claim_timeout=30)
    # Waiting for the locks would wait as long as the dying claim lives (for ever here);
    # 5 s, not 1 s: one statement can take a second on a loaded machine.
    assert time.monotonic() - started < 5.0
    assert [x.id for x in claimed] == [lid(n) for n in range(3, 10)]
    dying.terminate()  # the replica is killed: its transaction rolls back
    for _ in range(50):
        rest = await a.claim_due(now=T0 + 100, limit=100, claimer="a", claim_timeout=30)
        if rest:
            break
        await asyncio.sleep(0.05)  # the server notices the closed socket shortly
    assert [x.id for x in rest] == [lid(n) for n in range(3)]


async def test_a_revoke_on_one_replica_wakes_the_other(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """queue_revoke and issue on A reach B's wake listener, with the due time.

    Within 5 s (it takes milliseconds; the print says how many), not 1 s: a NOTIFY
    delivered late by a loaded machine is not the bug, a missing one (never) is."""
    a, b = replicas
    on_a, on_b = Wakes(), Wakes()
    a.add_wake_listener(on_a)
    b.add_wake_listener(on_b)
    await put_active(b, make_lease(lid(1)))
    assert await on_a.next(timeout=5.0) == T0 + 3600  # B's issue woke A

    started = time.monotonic()
    assert await a.queue_revoke(lid(1), reason="revoke", now=T0 + 5) is not None
    assert await on_b.next(timeout=5.0) == T0 + 5
    print(f"\nNOTIFY from A's queue_revoke reached B after "
          f"{(on_b.calls[-1][0] - started) * 1000:.1f}ms")
    await asyncio.sleep(0.2)
    assert [at for _, at in on_a.calls] == [T0 + 3600]  # A never hears its own writes


async def test_a_token_made_on_one_replica_is_revocable_on_the_other(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """A token created on A is found by hash on B, and B's revocation is what A then sees."""
    a, b = replicas
    await a.insert_token(make_token("acc-9"))
    await put_active(a, make_lease(lid(1), owner="acc-9"))
    token = await b.token_by_hash("hash-acc-9")
    assert token is not None and token.accessor == "acc-9"
    assert await b.end_token("acc-9", state=TokenState.REVOKED, now=T0 + 1)
    assert await b.queue_revoke_matching(LeaseFilter(owners=("acc-9",)), reason="token",
                                         now=T0 + 1) == 1
    seen = await a.token_by_accessor("acc-9")
    assert seen is not None and seen.state is TokenState.REVOKED
    lease = await a.get(lid(1))
    assert lease is not None and lease.state is LeaseState.REVOKING
    assert not await a.end_token("acc-9", state=TokenState.REVOKED, now=T0 + 2)


async def test_the_listener_reconnects_after_its_connection_is_killed(
    replicas: tuple[PostgresStore, PostgresStore], pg_dsn: str,
) -> None:
    """When B's listener connection is killed, B reconnects, says "maybe missed" (None), hears on."""
    a, b = replicas
    on_b = Wakes()
    b.add_wake_listener(on_b)
    assert b._listener is not None
    pid = b._listener.backend_pid
    assert pid is not None
    admin = await asyncpg.connect(pg_dsn)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    assert await on_b.next(timeout=5.0) is None
    assert b._listener.reconnects == 1 and b._listener.backend_pid not in (None, pid)

    await put_active(a, make_lease(lid(1), ttl=30))
    assert await on_b.next(timeout=5.0) == T0 + 30  # ms; 5 s for a loaded machine


async def test_an_idle_sweeper_is_woken_by_another_replicas_issue(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """B's sweeper, idle with nothing due, revokes a lease A issued once woken by its NOTIFY."""
    a, b = replicas
    revoked: list[tuple[str, float]] = []
    done = asyncio.Event()

    async def revoke(lease: Lease, release: Callable[[], None]) -> None:
        release()
        await b.finish_revoke(lease.id, state=LeaseState.EXPIRED, now=time.time())
        revoked.append((lease.id, time.time()))
        done.set()

    sweeper = Sweeper(b, revoke, LeaseConfig(claim_timeout=60), node_id="b")
    b.add_wake_listener(sweeper.wake)  # what server.build_state wires
    sweeper.start()
    try:
        await asyncio.sleep(0.2)  # B has looked: nothing is due, it sleeps without a timeout
        lease = make_lease(lid(1), issue_time=time.time(), ttl=0.3)
        await put_active(a, lease)
        # Unwoken, B sleeps until its next look at the store, 30 s away; 10 s (not 3 s)
        # leaves a loaded machine room and is still far from that.
        await asyncio.wait_for(done.wait(), timeout=10.0)
    finally:
        await sweeper.stop(grace=1.0)
    [(lease_id, at)] = revoked
    assert lease_id == lid(1)
    assert at >= lease.expire_time  # not before it was due
    got = await a.get(lid(1))
    assert got is not None and got.state is LeaseState.EXPIRED


async def test_a_slow_replica_does_not_revoke_leases_whose_claim_ran_short(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """A claims 4 due leases but revokes one at a time, slowly; those it could not
    finish inside its 2 s claim are given up and claimed again, and no lease is
    revoked twice although B stands ready to take any claim that runs out."""
    a, b = replicas
    now = time.time()
    for n in range(4):
        await put_active(a, make_lease(lid(n), issue_time=now - 10, ttl=1))
    revoked: list[tuple[str, str]] = []

    def revoker(name: str, store: PostgresStore, seconds: float) -> Any:
        async def revoke(lease: Lease, release: Callable[[], None]) -> None:
            await asyncio.sleep(seconds)  # a slow backend call
            release()
            revoked.append((name, lease.id))
            await store.finish_revoke(lease.id, state=LeaseState.EXPIRED, now=time.time())
        return revoke

    config = LeaseConfig(claim_timeout=2, backend_timeout=1.0, revoke_workers=1,
                         per_mount_workers=1)
    slow = Sweeper(a, revoker("a", a, 0.7), config, node_id="a")
    fast = Sweeper(b, revoker("b", b, 0.0), config, node_id="b")
    slow.start()
    try:
        # B starts once A holds every claim, so B can only get what A gives up.
        assert await _until(lambda: slow.busy == 4, 5), "A did not claim all four leases"
        fast.start()
        await _until(lambda: len({lease_id for _, lease_id in revoked}) == 4, 10)
        await asyncio.sleep(1.0)  # room for a late second revocation to show up
    finally:
        await slow.stop(grace=2.0)
        await fast.stop(grace=2.0)
    by_lease = collections.Counter(lease_id for _, lease_id in revoked)
    assert set(by_lease) == {lid(n) for n in range(4)}, revoked
    assert max(by_lease.values()) == 1, f"revoked twice: {revoked}"
    # A started only what it could finish in time (0 s and 0.7 s into a 2 s
    # claim with a 1 s backend_timeout) and gave the other two up; who then
    # claimed them again, A or B, is a race and does not matter.
    assert slow.dropped_claims >= 2


async def test_a_batch_takes_only_leases_whose_claim_still_fits(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """The same with batches of 2 (one slow batch call at a time): A starts the
    batches it can finish inside its claim and gives up the leases of the last
    one; none is revoked twice although B stands ready."""
    a, b = replicas
    now = time.time()
    for n in range(6):
        await put_active(a, make_lease(lid(n), issue_time=now - 10, ttl=1))
    revoked: list[tuple[str, str]] = []
    batches: list[int] = []

    def revoker(name: str, store: PostgresStore, seconds: float) -> Any:
        async def revoke_many(leases: Sequence[Lease], release: Callable[[], None]) -> None:
            batches.append(len(leases))
            await asyncio.sleep(seconds)  # a slow backend call
            release()
            for lease in leases:
                revoked.append((name, lease.id))
                await store.finish_revoke(lease.id, state=LeaseState.EXPIRED, now=time.time())

        async def revoke(lease: Lease, release: Callable[[], None]) -> None:
            await revoke_many([lease], release)
        return revoke, revoke_many

    config = LeaseConfig(claim_timeout=2, backend_timeout=1.0, revoke_workers=1,
                         per_mount_workers=1)
    one, many = revoker("a", a, 0.7)
    slow = Sweeper(a, one, config, node_id="a", revoke_many=many, batch_size=lambda _m: 2)
    one, many = revoker("b", b, 0.0)
    fast = Sweeper(b, one, config, node_id="b", revoke_many=many, batch_size=lambda _m: 2)
    slow.start()
    try:
        assert await _until(lambda: slow.busy == 6, 5), "A did not claim all six leases"
        fast.start()
        await _until(lambda: len({lease_id for _, lease_id in revoked}) == 6, 10)
        await asyncio.sleep(1.0)  # room for a late second revocation to show up
    finally:
        await slow.stop(grace=2.0)
        await fast.stop(grace=2.0)
    by_lease = collections.Counter(lease_id for _, lease_id in revoked)
    assert set(by_lease) == {lid(n) for n in range(6)}, revoked
    assert max(by_lease.values()) == 1, f"revoked twice: {revoked}"
    # A's batches start 0 s and 0.7 s into a 2 s claim (1 s backend_timeout);
    # the third would start at 1.4 s: its two leases are given up.
    assert batches[:2] == [2, 2]
    assert slow.dropped_claims >= 2


async def _until(predicate: Any, timeout: float) -> bool:
    """Poll ``predicate`` (state of a sweeper, which has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    return bool(predicate())


async def test_a_store_call_is_one_round_trip_without_the_pools_reset(
    replicas: tuple[PostgresStore, PostgresStore], pg_dsn: str,
) -> None:
    """asyncpg's pool sends a reset query (``RESET ALL`` ...) on every release: a
    second round trip per store call. The store's connections skip it, so the last
    statement each pooled session ran is the store's own."""
    a, _ = replicas
    await put_active(a, make_lease(lid(1), ttl=30))
    for _ in range(5):
        assert await a.get(lid(1)) is not None
    admin = await asyncpg.connect(pg_dsn)
    try:
        last = [row["query"] for row in await admin.fetch(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'broker' AND pid <> pg_backend_pid()")]
    finally:
        await admin.close()
    assert any("FROM leases" in q for q in last), last  # the store's reads are seen
    assert not [q for q in last if "RESET ALL" in q], last
