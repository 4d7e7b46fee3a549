"""revoke-prefix's (and revoke-by's) ``already_revoking`` is counted by the store in the
statement that queues the other leases, on SQLite and PostgreSQL.

It was counted apart, before the queuing, by a second scan of the range: a lease
issued (or ended) in between made ``queued + already_revoking`` wrong, and the
answer then hid leases still being revoked (or counted ones gone).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.bench.noop import register
from broker.lease import LeaseFilter, LeaseState
from broker.store.base import LeaseStore
from tests.integration import store_fixtures
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, start_broker, write_config
from tests.integration.store_fixtures import T0, broker_store_url, make_lease, put_active

pytestmark = pytest.mark.integration

store_maker = store_fixtures.each_store_maker
store = store_fixtures.each_store

H = {"X-Vault-Token": ROOT_TOKEN}


async def _fill(store: LeaseStore) -> None:
    """Under pg/creds/ro/: 3 active, 2 revoking (a retry), 1 revoking (forced), 1 revoked
    and 1 pending lease; 2 active leases under pg/creds/rw/."""
    for n in range(7):
        await put_active(store, make_lease(f"pg/creds/ro/{n:03d}"))
    for n in (3, 4, 6):
        assert await store.queue_revoke(f"pg/creds/ro/{n:03d}", reason="revoke", now=T0)
    assert await store.queue_revoke("pg/creds/ro/005", reason="force", now=T0)
    await store.finish_revoke("pg/creds/ro/006", state=LeaseState.REVOKED, now=T0 + 1)
    await store.insert_pending(make_lease("pg/creds/ro/007"))
    for n in (8, 9):
        await put_active(store, make_lease(f"pg/creds/rw/{n:03d}"))


@pytest.mark.parametrize("inline_max", [1000, 0], ids=["inline", "rule"])
async def test_a_prefix_revoke_counts_the_leases_left_revoking(store: LeaseStore,
                                                               inline_max: int) -> None:
    """A prefix revoke queues the 3 active leases and counts the 3 revoking ones as
    already revoking, whether it queues them at once or makes a rule."""
    await _fill(store)
    done = await store.queue_revoke_rule(
        LeaseFilter(prefix="pg/creds/ro/"), reason="prefix", now=T0 + 2,
        inline_max=inline_max, claimer="a", claim_until=T0 + 60)
    assert (done.queued, done.already_revoking) == (3, 3)
    assert (done.rule_id is None) == (inline_max > 0)


@pytest.mark.parametrize("inline_max", [1000, 0], ids=["inline", "rule"])
async def test_a_forced_revoke_counts_only_the_leases_already_forced(store: LeaseStore,
                                                                     inline_max: int) -> None:
    """Force takes over the leases in retry too (5 queued); only the one forced already
    is left as it is."""
    await _fill(store)
    done = await store.queue_revoke_rule(
        LeaseFilter(prefix="pg/creds/ro/"), reason="force", now=T0 + 2,
        inline_max=inline_max, claimer="a", claim_until=T0 + 60)
    assert (done.queued, done.already_revoking) == (5, 1)


async def test_nothing_revoking_counts_none(store: LeaseStore) -> None:
    """With no matching lease being revoked, already_revoking is 0; a second revoke of the
    same prefix finds them all revoking."""
    for n in range(4):
        await put_active(store, make_lease(f"my/creds/app/{n:03d}"))
    flt = LeaseFilter(prefix="my/")
    first = await store.queue_revoke_rule(flt, reason="prefix", now=T0 + 1, inline_max=1000,
                                          claimer="a", claim_until=T0 + 60)
    again = await store.queue_revoke_rule(flt, reason="prefix", now=T0 + 2, inline_max=1000,
                                          claimer="a", claim_until=T0 + 60)
    assert (first.queued, first.already_revoking) == (4, 0)
    assert (again.queued, again.already_revoking) == (0, 4)


# -- through the API: a lease issued while the revoke is on its way ------------------------
NOOP = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.a]
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerThread]:
    """A broker with the no-op mount on each store kind in turn."""
    register()
    server = start_broker(write_config(tmp_path, NOOP,
                                       storage_url=broker_store_url(request, tmp_path)))
    try:
        yield server
    finally:
        server.stop()


def _issue(broker: BrokerThread) -> str:
    resp = requests.get(f"{broker.url}/v1/noop/creds/a", headers=H, timeout=30)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["lease_id"])


def _issue_as_the_revoke_comes(broker: BrokerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next revoke_matching meets one more lease, issued (in the real store) just as
    the revoke reaches the store: where a concurrent issue's commit can land."""
    assert broker.state is not None
    engine, store = broker.state.engine, broker.state.store
    queue = engine.revoke_matching

    async def racing(flt: LeaseFilter, *, force: bool = False) -> Any:
        monkeypatch.setattr(engine, "revoke_matching", queue)  # this once
        lease = make_lease(f"noop/creds/a/late-{secrets.token_hex(4)}", owner="test-root",
                           issue_time=engine.clock())
        await put_active(store, lease)
        return await queue(flt, force=force)

    monkeypatch.setattr(engine, "revoke_matching", racing)


def _revoking_elsewhere(broker: BrokerThread, lease_id: str, reason: str = "revoke") -> None:
    """``lease_id`` is being revoked by another replica (claimed for 10 minutes)."""
    assert broker.state is not None
    now = broker.state.engine.clock()
    assert broker.call(broker.state.store.queue_revoke(
        lease_id, reason=reason, now=now, claimer="another-replica", claim_until=now + 600))


def test_revoke_prefix_counts_in_the_statement_that_queues(
        broker: BrokerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two leases live and one revoking elsewhere; a third is issued as the revoke comes:
    queued 3 (it too) and already_revoking 1, so the total is every lease not ended."""
    ids = [_issue(broker) for _ in range(3)]
    _revoking_elsewhere(broker, ids[0])
    _issue_as_the_revoke_comes(broker, monkeypatch)
    resp = requests.put(f"{broker.url}/v1/sys/leases/revoke-prefix/noop/creds/a/", headers=H,
                        json={"sync": False}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"] == {"queued": 3, "still_revoking": 0, "already_revoking": 1}


def test_revoke_by_counts_in_the_statement_that_queues(
        broker: BrokerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """revoke-by with force the same way: a lease forced already (by another replica) is
    left to that revocation and counted, the live one and the late issue are queued."""
    ids = [_issue(broker) for _ in range(2)]
    _revoking_elsewhere(broker, ids[0], reason="force")
    _issue_as_the_revoke_comes(broker, monkeypatch)
    resp = requests.put(f"{broker.url}/v1/sys/leases/revoke-by", headers=H, timeout=60,
                        json={"prefix": "noop/creds/a/", "force": True, "sync": False})
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"] == {"queued": 2, "still_revoking": 0, "already_revoking": 1}
