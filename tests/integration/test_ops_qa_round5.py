"""Day-2 operations, QA round 5, against real brokers and servers.

1. A store outage logged a traceback every 5 s (the revoke-rules job): now one WARNING
   when it starts, one a minute while it lasts, one INFO when it ends.
2. Revoking a lease of a mount removed by a reload waited 30 s and answered 202
   "goes on in the background": now 503 at once, saying what to do.
3. A password_file the server refuses logged "mount X unhealthy" for a mount that was
   fine, and once the running mount failed (its server down) the refused secret was
   swapped in, so the mount stayed dead after the server came back.
4. revoke-prefix did not count leases already being revoked: the answer now says how
   many (``already_revoking``), and the CLI's total includes them.
5. An asyncpg "connection has been released back to the pool" reached a client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import hvac
import pytest
import requests

from broker.backend import BackendError
from broker.bench.noop import register
from broker.errors import StoreUnavailable
from broker.lease import LeaseState
from broker.periodic import StoreOutage
from plugins.postgres import PostgresBackend
from tests.conformance.harnesses import PostgresHarness
from tests.integration import ops_fixtures
from tests.integration.broker_harness import (
    ROOT_TOKEN,
    BrokerThread,
    TcpProxy,
    start_broker,
    write_config,
)
from tests.integration.db_fixtures import harness_up, started_backend
from tests.integration.ops_fixtures import (
    NOOP,
    mysql_admin_account,
    reload_without_mounts,
    wait_for,
)
from tests.integration.test_postgres_backend import new_req, role, username

pytestmark = pytest.mark.integration

H = {"X-Vault-Token": ROOT_TOKEN}

# -- 1. a store outage in the log ------------------------------------------------------------


def test_store_outage_is_told_once_then_every_repeat_then_its_end(
        caplog: pytest.LogCaptureFixture) -> None:
    """StoreOutage: one WARNING at the start, none until ``repeat`` has passed, one saying
    how long so far, one INFO with the duration at the end; a new outage starts afresh."""
    now = [100.0]
    outage = StoreOutage(repeat=60, clock=lambda: now[0], reason=lambda: "OSError: refused")
    caplog.set_level(logging.INFO, logger="broker.periodic")
    exc = StoreUnavailable("lease store unavailable (OSError); retry later")
    for step in (0, 5, 30, 59.9, 60, 70, 119):
        now[0] = 100 + step
        outage.failed("revoke rules", exc)
    now[0] = 125 + 100
    outage.reached()
    outage.reached()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("WARNING", "lease store unreachable (OSError: refused): the periodic jobs try again "
                    "at their intervals; said again every 60s while it lasts"),
        ("WARNING", "lease store still unreachable after 60s (OSError: refused)"),
        ("INFO", "lease store reachable again after 125s"),
    ]


# The broker whose lease store can be cut (tests/integration/ops_fixtures.py).
proxied_store_broker = ops_fixtures.proxied_store_broker


def test_a_store_outage_logs_no_traceback_and_says_when_it_ends(
        proxied_store_broker: tuple[BrokerThread, TcpProxy],
        caplog: pytest.LogCaptureFixture) -> None:
    """Store cut for three runs of the 5 s revoke-rules job: no traceback of an outage,
    one WARNING from the periodic jobs; back up, one INFO "reachable again after N s"."""
    broker, proxy = proxied_store_broker
    caplog.set_level(logging.INFO)
    proxy.down()
    started = time.monotonic()
    wait_for("the outage noticed", lambda: any(
        "lease store unreachable" in r.getMessage() for r in caplog.records))
    time.sleep(max(0.0, 12 - (time.monotonic() - started)))  # the 5 s job ran 2+ times more
    tracebacks = [r for r in caplog.records if r.exc_info
                  and isinstance(r.exc_info[1], StoreUnavailable | OSError)]
    assert tracebacks == [], [r.getMessage() for r in tracebacks]
    proxy.up()
    wait_for("the end told", lambda: any(
        "lease store reachable again after" in r.getMessage() for r in caplog.records))
    said = [r.getMessage() for r in caplog.records if r.name == "broker.periodic"
            and r.levelno >= logging.WARNING]
    assert len(said) == 1, said
    # Working again: an issue goes through.
    client = hvac.Client(url=broker.url, token=ROOT_TOKEN)
    assert client.read("noop/creds/a")["lease_id"]


# -- 2. revoking a lease of a mount removed by a reload ----------------------------------------


def test_revoking_a_lease_of_a_removed_mount_answers_503_at_once(tmp_path: Path) -> None:
    """A reload removes the mount; PUT sys/leases/revoke on its lease answers 503 at once
    (it waited 30 s and answered 202), naming the mount and revoke-force; the lease is
    queued (with sync=false, which asks only for that, the answer is 202); revoke-force
    then ends it."""
    register()
    broker = start_broker(write_config(tmp_path, NOOP))
    try:
        assert broker.state is not None
        lease_id = requests.get(f"{broker.url}/v1/noop/creds/a", headers=H,
                                timeout=30).json()["lease_id"]
        reload_without_mounts(broker, tmp_path)
        started = time.monotonic()
        resp = requests.put(f"{broker.url}/v1/sys/leases/revoke", headers=H,
                            json={"lease_id": lease_id}, timeout=60)
        took = time.monotonic() - started
        assert resp.status_code == 503, resp.text
        assert took < 4, took
        [error] = resp.json()["errors"]
        assert "mount 'noop' is not configured on this replica" in error
        assert f"sys/leases/revoke-force/{lease_id}" in error
        # sync=false asks for the lease to be queued, and it is: 202, as for any other.
        queued = requests.put(f"{broker.url}/v1/sys/leases/revoke", headers=H,
                              json={"lease_id": lease_id, "sync": False}, timeout=60)
        assert queued.status_code == 202, queued.text
        lease = broker.call(broker.state.store.get(lease_id))
        assert lease.state is LeaseState.REVOKING and lease.revoke_attempts == 0
        forced = requests.put(f"{broker.url}/v1/sys/leases/revoke-force/{lease_id}",
                              headers=H, timeout=60)
        assert forced.status_code in (200, 204), forced.text
        wait_for("the forced lease ended", lambda: broker.call(
            broker.state.store.get(lease_id)).state is LeaseState.REVOKED)  # type: ignore[union-attr]
    finally:
        broker.stop()


# -- 3. a password_file the server refuses -------------------------------------------------


@pytest.fixture
def mysql_admin(mysql_dsn: str) -> Iterator[tuple[str, str]]:
    """A MariaDB admin account of this test's own (MariaDB checks passwords on loopback)."""
    with mysql_admin_account(mysql_dsn, "v-r5-") as account:
        yield account


def test_a_refused_password_file_is_no_health_alarm_and_never_swapped_in(
        tmp_path: Path, mysql_admin: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    """A wrong password_file: one warning about the file, none saying the (healthy) mount is
    unhealthy. With the server then down, the health job does not swap the refused secret
    in, so once the server is back the mount is healthy on its old secret."""
    user, first = mysql_admin
    proxy = TcpProxy(3306)
    pw = tmp_path / "admin.pw"
    pw.write_text(first + "\n")
    pw.chmod(0o600)
    broker = start_broker(write_config(tmp_path, f"""
[mounts.my]
plugin = "mysql"
connection_url = "mysql://{user}@127.0.0.1:{proxy.port}/test"
password_file = "admin.pw"

[mounts.my.roles.app]
default_ttl = "1h"
"""))
    try:
        assert broker.state is not None
        engine = broker.state.engine
        caplog.set_level(logging.WARNING)
        pw.write_text("not-the-password\n")
        broker.call(engine.follow_password_files())
        broker.call(engine.check_mounts())
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert [w for w in warnings if "unhealthy" in w] == [], warnings
        assert len([w for w in warnings if "refuses it" in w]) == 1, warnings
        assert engine.mount("my").healthy

        proxy.down()
        broker.call(engine.check_mounts())  # the running mount fails now
        assert not engine.mount("my").healthy
        broker.call(engine.check_mounts())  # the refused file is tried again, and fails
        assert engine.mount("my").spec.secret == first
        proxy.up()
        broker.call(engine.check_mounts())
        assert engine.mount("my").healthy and engine.mount("my").spec.secret == first
        client = hvac.Client(url=broker.url, token=ROOT_TOKEN)
        client.sys.revoke_lease(client.read("my/creds/app")["lease_id"])
        assert "not-the-password" not in caplog.text and first not in caplog.text
    finally:
        broker.stop()
        proxy.close()


# -- 4. revoke-prefix counts leases already being revoked -----------------------------------


def test_revoke_prefix_answer_counts_leases_already_revoking(tmp_path: Path) -> None:
    """One of three leases is being revoked (claimed by another replica) when revoke-prefix
    comes: queued 2, already_revoking 1; revoke-by says the same of its selector."""
    register()
    broker = start_broker(write_config(tmp_path, NOOP))
    try:
        assert broker.state is not None
        store, engine = broker.state.store, broker.state.engine
        ids = [requests.get(f"{broker.url}/v1/noop/creds/a", headers=H,
                            timeout=30).json()["lease_id"] for _ in range(3)]
        now = engine.clock()
        assert broker.call(store.queue_revoke(ids[0], reason="revoke", now=now,
                                              claimer="another-replica", claim_until=now + 600))
        resp = requests.put(f"{broker.url}/v1/sys/leases/revoke-prefix/noop/creds/a/",
                            headers=H, json={"sync": False}, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["data"] == {"queued": 2, "still_revoking": 0, "already_revoking": 1}
        # Nothing already revoking: the answer as before.
        more = requests.get(f"{broker.url}/v1/noop/creds/a", headers=H, timeout=30).json()
        wait_for("the two revoked", lambda: all(broker.call(store.get(i)).state  # type: ignore[union-attr]
                                                is LeaseState.REVOKED for i in ids[1:]))
        resp = requests.put(f"{broker.url}/v1/sys/leases/revoke-prefix/{more['lease_id']}",
                            headers=H, json={"sync": False}, timeout=60)
        assert resp.json()["data"] == {"queued": 1, "still_revoking": 0}
    finally:
        broker.stop()


# -- 5. asyncpg's "released back to the pool" never reaches a client -------------------------


@pytest.fixture
async def harness(postgres_dsn: str) -> AsyncIterator[PostgresHarness]:
    async with harness_up(PostgresHarness, postgres_dsn) as h:
        yield h


async def test_a_commit_on_a_lost_connection_says_the_server_is_unreachable(
        harness: PostgresHarness) -> None:
    """A staged issue whose session is cut before its COMMIT (the server ended it): the
    error is "cannot reach the server: the connection was lost", never asyncpg's
    "connection has been released back to the pool" (the exact race of the QA report)."""
    async with started_backend(PostgresBackend, harness.make_mount()) as backend:
        staged = await backend.stage_user(new_req(role(), username(harness)))
        pid = staged._pid  # type: ignore[attr-defined]
        await harness.admin.execute("SELECT pg_terminate_backend($1)", pid)
        deadline = time.monotonic() + 30
        while True:  # asyncpg lets go of the connection once it sees it lost
            try:
                if staged._conn.is_closed():  # type: ignore[attr-defined]
                    break
            except asyncpg.InterfaceError:
                break
            assert time.monotonic() < deadline, "the cut was never noticed"
            await asyncio.sleep(0.05)
        with pytest.raises(BackendError) as caught:
            await staged.commit()
    message = str(caught.value)
    assert "released back to the pool" not in message and "Connection." not in message
    assert message == "postgres new_user failed: cannot reach the server: the connection " \
                      "was lost"
    assert caught.value.retryable
