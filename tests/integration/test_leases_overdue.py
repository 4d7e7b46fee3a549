"""Overdue leases: live past their expiry by more than a grace period, whatever held them.

A mount whose backend is down has its due revocations held back (no attempt
counted, so its leases never turn ``irrevocable``): without a signal of their
own, credentials that should be dead lived on with every lease metric quiet.
``LeaseStore.count_overdue`` counts them per mount; ``sys/metrics`` shows them
as ``broker_leases_overdue{mount}`` (and the oldest one's age), and
``sys/health`` shows each mount's count to a token that may read
``sys/metrics``, its status unchanged. Against each store kind and, for the
broker, a real PostgreSQL backend cut behind a proxy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from broker.lease import LeaseFilter, LeaseState
from broker.store.base import LeaseStore, Overdue
from tests.integration import ops_fixtures, store_fixtures
from tests.integration.broker_harness import (
    ROOT_TOKEN,
    BrokerThread,
    TcpProxy,
    dsn_port,
    pg_roles,
    start_broker,
    via_proxy,
    write_config,
)
from tests.integration.ops_fixtures import pg_role_prefix, wait_for
from tests.integration.store_fixtures import T0, broker_store_url, make_lease, put_active

pytestmark = pytest.mark.integration

# The store suite's fixtures (tests/integration/store_fixtures.py), under the names used here.
store_maker = store_fixtures.each_store_maker
store = store_fixtures.each_store

H = {"X-Vault-Token": ROOT_TOKEN}
#: the grace a lease is given past its expiry (the broker's claim_timeout, s).
GRACE = 3
#: backend calls time out after this (s): claim_timeout must be longer.
BACKEND_TIMEOUT = 2
#: TTLs (s): the healthy mount's lease expires first; the down mount's late enough for
#: its outage to be seen before (its revocation is then held, not tried and failed).
PG_TTL, DOWN_TTL = 2, 6


# -- the store ----------------------------------------------------------------


async def _put(store: LeaseStore, lease_id: str, ttl: float) -> str:
    await put_active(store, make_lease(lease_id, ttl=ttl))
    return lease_id


async def test_count_overdue_counts_live_leases_past_the_cut_off_per_mount(
        store: LeaseStore) -> None:
    """Every live state counts (pending, active, revoking, irrevocable) once its expiry is
    before the cut-off; leases expiring after it, and ended ones, do not."""
    await _put(store, "pg/creds/r/a", 10)  # active, overdue
    await _put(store, "pg/creds/r/b", 200)  # active, not yet
    ended = await _put(store, "pg/creds/r/f", 5)
    await store.queue_revoke(ended, reason="expire", now=T0)
    await store.finish_revoke(ended, state=LeaseState.EXPIRED, now=T0 + 6)
    await store.insert_pending(make_lease("pg/creds/r/e", ttl=50))  # an issue never finished
    retrying = await _put(store, "my/creds/r/c", 20)
    await store.queue_revoke(retrying, reason="expire", now=T0 + 20)
    given_up = await _put(store, "my/creds/r/d", 30)
    await store.queue_revoke(given_up, reason="expire", now=T0 + 30, claimer="me",
                             claim_until=T0 + 90)
    assert await store.fail_revoke(given_up, error="refused", next_attempt=None,
                                   now=T0 + 31, claimer="me") == 1
    assert (await store.get(given_up)).state is LeaseState.IRREVOCABLE  # type: ignore[union-attr]

    assert await store.count_overdue(before=T0 + 100) == {
        "pg": Overdue(2, T0 + 10), "my": Overdue(2, T0 + 20)}
    assert await store.count_overdue(before=T0 + 15) == {"pg": Overdue(1, T0 + 10)}
    assert await store.count_overdue(before=T0) == {}


async def test_count_overdue_counts_leases_a_revoke_rule_covers(store: LeaseStore) -> None:
    """A lease a revoke rule covers (read as revoking, its row still active) is counted
    once, as any other live lease."""
    for n in range(5):
        await _put(store, f"pg/creds/r/{n}", 10 + n)
    queued = await store.queue_revoke_rule(
        LeaseFilter(prefix="pg/"), reason="prefix", now=T0 + 1, inline_max=1,
        claimer="me", claim_until=T0 + 60)
    assert queued.rule_id is not None  # not expanded yet: the rows are still active
    assert await store.count_overdue(before=T0 + 100) == {"pg": Overdue(5, T0 + 10)}


# -- a broker: metrics and health ---------------------------------------------


def _role(mount: str, template: str, ttl: int) -> str:
    return f"""
[mounts.{mount}.roles.app]
username_template = "{template}-{{{{random 10}}}}"
creation_statements = [
  "CREATE ROLE \\"{{{{name}}}}\\" WITH LOGIN PASSWORD '{{{{password}}}}' VALID UNTIL '{{{{expiration}}}}'",
]
default_ttl = "{ttl}s"
max_ttl = "1h"
"""


def _config(pg_url: str, down_url: str, template: str) -> str:
    """Two postgres mounts: ``pg``, and ``down``, whose backend the test cuts."""
    return f"""
[leases]
backend_timeout = "{BACKEND_TIMEOUT}s"
claim_timeout = "{GRACE}s"

[mounts.pg]
plugin = "postgres"
connection_url = "{pg_url}"

[mounts.down]
plugin = "postgres"
connection_url = "{down_url}"

[policies.scraper]
"sys/metrics" = ["read"]
""" + _role("pg", f"{template}p", PG_TTL) + _role("down", f"{template}d", DOWN_TTL)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The broker's lease store: a SQLite file, then the session's PostgreSQL database."""
    return broker_store_url(request, tmp_path)


@pytest.fixture
def template(postgres_dsn: str) -> Iterator[str]:
    """A username prefix for this test's roles; whatever is left of them is dropped."""
    with pg_role_prefix(postgres_dsn, "v-od") as name:
        yield name


quick_probe = ops_fixtures.quick_probe


def _health(server: BrokerThread, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.get(f"{server.url}/v1/sys/health", headers=headers, timeout=10)


def _overdue(server: BrokerThread, token: str) -> dict[tuple[str, str], float]:
    """``(family, mount) -> value`` of the two overdue families of a Prometheus scrape."""
    resp = requests.get(f"{server.url}/v1/sys/metrics", params={"format": "prometheus"},
                        headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    return {(s.name, s.labels["mount"]): s.value
            for f in text_string_to_metric_families(resp.text)
            if f.name.startswith("broker_leases_overdue") for s in f.samples}


def _lease(server: BrokerThread, lease_id: str) -> Any:
    assert server.state is not None
    lease = server.call(server.state.store.get(lease_id))
    assert lease is not None, lease_id
    return lease


def test_a_down_mounts_expired_leases_show_as_overdue_until_it_is_back(
        tmp_path: Path, postgres_dsn: str, store_url: str, template: str,
        quick_probe: None) -> None:
    """``down``'s backend refuses connections: its leases, held past expiry + grace, are
    ``broker_leases_overdue{mount="down"} 2`` (JSON and health say so too; health stays
    200), while ``pg``'s lease, expired and revoked on time, leaves ``pg`` at 0; once
    ``down``'s backend is back, its leases are revoked and its count falls to 0."""
    proxy = TcpProxy(dsn_port(postgres_dsn))
    server = start_broker(write_config(tmp_path, _config(
        postgres_dsn, via_proxy(postgres_dsn, proxy.port), template), storage_url=store_url))
    try:
        root = hvac.Client(url=server.url, token=ROOT_TOKEN, timeout=30)
        scraper = root.auth.token.create(policies=["scraper"])["auth"]["client_token"]
        down_ids = [root.read("down/creds/app")["lease_id"] for _ in range(2)]
        pg_id = root.read("pg/creds/app")["lease_id"]
        down_due = min(_lease(server, i).expire_time for i in down_ids)
        assert _overdue(server, scraper) == {
            ("broker_leases_overdue", "down"): 0, ("broker_leases_overdue", "pg"): 0,
            ("broker_leases_overdue_oldest_seconds", "down"): 0,
            ("broker_leases_overdue_oldest_seconds", "pg"): 0}

        proxy.down()  # refused from now on
        wait_for("down unhealthy", lambda: not _health(server).json()["mounts"]["down"][
            "healthy"], BACKEND_TIMEOUT + 4)
        assert time.time() < down_due - 0.5, "the outage was seen too late for this test"
        # Past the grace of both mounts' leases: pg's was revoked on time, down's wait.
        late = max(_lease(server, i).expire_time for i in down_ids) + GRACE + 0.5
        time.sleep(max(0.0, late - time.time()))
        assert _lease(server, pg_id).state is LeaseState.EXPIRED
        assert all(_lease(server, i).state in (LeaseState.ACTIVE, LeaseState.REVOKING)
                   and _lease(server, i).revoke_attempts == 0 for i in down_ids)

        got = _overdue(server, scraper)
        assert got[("broker_leases_overdue", "down")] == 2, got
        assert got[("broker_leases_overdue", "pg")] == 0, got
        oldest = got[("broker_leases_overdue_oldest_seconds", "down")]
        assert GRACE < oldest < time.time() - down_due + 1, got
        assert got[("broker_leases_overdue_oldest_seconds", "pg")] == 0, got

        as_json = requests.get(f"{server.url}/v1/sys/metrics", headers=H, timeout=10).json()
        assert as_json["data"]["leases_overdue"]["down"]["leases"] == 2, as_json
        assert as_json["data"]["leases_overdue"]["pg"] == {"leases": 0, "oldest_seconds": 0}

        health = _health(server, H)
        assert health.status_code == 200, health.text  # a mount's outage: still serving
        assert health.json()["mounts"]["down"]["overdue_leases"] == 2, health.text
        assert health.json()["mounts"]["pg"]["overdue_leases"] == 0, health.text
        anyone = _health(server)
        assert anyone.status_code == 200
        assert "overdue_leases" not in anyone.json()["mounts"]["down"], anyone.text

        proxy.up()  # back: the held revocations go, and the count with them
        wait_for("down's leases expired", lambda: all(
            _lease(server, i).state is LeaseState.EXPIRED for i in down_ids),
            BACKEND_TIMEOUT + 10)
        got = _overdue(server, scraper)
        assert got[("broker_leases_overdue", "down")] == 0, got
        assert got[("broker_leases_overdue_oldest_seconds", "down")] == 0, got
        assert _health(server, H).json()["mounts"]["down"]["overdue_leases"] == 0
        assert asyncio.run(pg_roles(postgres_dsn, template)) == set()
    finally:
        server.stop()
        proxy.close()
