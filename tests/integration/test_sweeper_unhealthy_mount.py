"""The sweeper and an unhealthy mount, against real brokers and a real PostgreSQL.

While a mount is unhealthy its due leases are not sent to it: no revocation
attempt is counted or made (against a backend that hangs, each held a worker
for ``backend_timeout``, delaying the expiry of healthy mounts' leases). They
stay due and are revoked once the mount is healthy again. And a forced lease
whose backend call failed is audited with when its credential dies, when the
revocation data says so (an AWS STS token).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
import requests

from broker.bench.noop import register
from broker.lease import LeaseState
from tests.integration import ops_fixtures
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
from tests.integration.ops_fixtures import (
    NOOP,
    mount_health,
    pg_mount,
    pg_role_prefix,
    wait_for,
)
from tests.integration.store_fixtures import make_lease

pytestmark = pytest.mark.integration

H = {"X-Vault-Token": ROOT_TOKEN}
#: the hung mount's calls time out after this (s); a healthy lease's expiry waited
#: for them on the old code.
BACKEND_TIMEOUT = 5


def _config(pg_url: str, hung_url: str, template: str) -> str:
    """Two postgres mounts, ``pg`` and ``hung``; two revocation workers, one lease a call,
    so revocations sent to a hanging ``hung`` occupy every worker."""
    leases = f"""
[leases]
backend_timeout = "{BACKEND_TIMEOUT}s"
revoke_workers = 2
per_mount_workers = 2
revoke_batch = 1
"""
    return (leases + pg_mount("pg", pg_url, f"{template}p", default_ttl="15s", max_ttl="1h")
            + pg_mount("hung", hung_url, f"{template}h", default_ttl="13s", max_ttl="1h"))


def _audit(server: BrokerThread) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(server.audit_path).read_text().splitlines()]


@pytest.fixture
def template(postgres_dsn: str) -> Iterator[str]:
    """A username prefix for this test's roles; whatever is left of them is dropped."""
    with pg_role_prefix(postgres_dsn, "v-sw") as name:
        yield name


blackhole = ops_fixtures.blackhole
quick_probe = ops_fixtures.quick_probe


def test_an_unhealthy_mounts_due_leases_wait_and_healthy_ones_expire_on_time(
        tmp_path: Path, postgres_dsn: str, blackhole: int, template: str, quick_probe: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """Leases of ``hung`` (its backend hangs) fall due a second before ``pg``'s: pg's
    expire on time (lag < 2.5 s; it was ~4 s, behind hung calls), hung's are not sent
    (no delete_user call, no attempt counted, state untouched) and the log says so once;
    once hung's backend answers again, its leases are revoked and their roles dropped."""
    caplog.set_level(logging.INFO)
    proxy = TcpProxy(dsn_port(postgres_dsn))
    server = start_broker(write_config(tmp_path, _config(
        postgres_dsn, via_proxy(postgres_dsn, proxy.port), template)))
    try:
        assert server.state is not None
        client = hvac.Client(url=server.url, token=ROOT_TOKEN, timeout=30)
        hung = [client.read("hung/creds/app") for _ in range(4)]
        pg = [client.read("pg/creds/app") for _ in range(2)]
        hung_ids = [r["lease_id"] for r in hung]
        pg_ids = [r["lease_id"] for r in pg]
        hung_due = min(_lease(server, i).expire_time for i in hung_ids)
        # hung's backend now hangs: its pooled connection is cut, new ones never answer.
        proxy.down()
        proxy.target_port = blackhole
        proxy.up()
        wait_for("hung unhealthy", lambda: not mount_health(server, "hung")["healthy"],
                 BACKEND_TIMEOUT + 4)
        assert time.time() < hung_due - 0.5, "the outage was seen too late for this test"

        pg_due = max(_lease(server, i).expire_time for i in pg_ids)
        wait_for("pg's leases expired",
                 lambda: all(_lease(server, i).state is LeaseState.EXPIRED for i in pg_ids),
                 pg_due - time.time() + 10)
        lags = [ev["lag_seconds"] for ev in _audit(server)
                if ev["type"] == "expire" and ev["lease"]["id"] in pg_ids]
        assert len(lags) == 2 and max(lags) < 2.5, lags
        time.sleep(1.0)  # hung's have been due for > 3 s by now
        for lease_id in hung_ids:
            lease = _lease(server, lease_id)
            assert lease.state is LeaseState.ACTIVE, lease
            assert lease.revoke_attempts == 0 and lease.last_error is None, lease
        stats = server.state.engine.mounts["hung"].stats
        assert "delete_user" not in stats and "delete_users" not in stats, stats
        waits = [r.getMessage() for r in caplog.records
                 if "wait for it to be healthy again" in r.getMessage()]
        # How many: those due when the sweeper first looked (they fall due 0.1 s apart).
        assert len(waits) == 1 and re.match(r"[1-4] due lease\(s\) of mount 'hung'",
                                            waits[0]), waits
        assert not [r for r in caplog.records if "revoking hung/" in r.getMessage()]

        # hung's backend answers again: its leases go, promptly.
        proxy.down()
        proxy.target_port = dsn_port(postgres_dsn)
        proxy.up()
        wait_for("hung's leases expired",
                 lambda: all(_lease(server, i).state is LeaseState.EXPIRED for i in hung_ids),
                 BACKEND_TIMEOUT + 10)
        assert asyncio.run(pg_roles(postgres_dsn, f"{template}h")) == set()
        assert any("mount 'hung' is healthy again: revoking its due leases" in r.getMessage()
                   for r in caplog.records)
        assert all(_lease(server, i).revoke_attempts == 0 for i in hung_ids)
    finally:
        server.stop()
        proxy.close()


def test_a_revoke_of_an_unhealthy_mounts_lease_is_queued_without_an_attempt(
        tmp_path: Path, postgres_dsn: str, template: str, quick_probe: None) -> None:
    """``sys/leases/revoke`` of a lease whose mount is down (refused): 202 queued at once,
    the reason given, no attempt counted; revoked once the mount is back."""
    proxy = TcpProxy(dsn_port(postgres_dsn))
    server = start_broker(write_config(tmp_path, _config(
        postgres_dsn, via_proxy(postgres_dsn, proxy.port), template)))
    try:
        client = hvac.Client(url=server.url, token=ROOT_TOKEN, timeout=30)
        lease_id = client.read("hung/creds/app")["lease_id"]
        proxy.down()  # refused from now on
        wait_for("hung unhealthy", lambda: not mount_health(server, "hung")["healthy"],
                 BACKEND_TIMEOUT + 4)
        started = time.monotonic()
        resp = requests.put(f"{server.url}/v1/sys/leases/revoke", headers=H, timeout=60,
                            json={"lease_id": lease_id})
        assert time.monotonic() - started < 3.0
        assert resp.status_code == 202, resp.text
        assert "mount 'hung' is unavailable" in resp.json()["warnings"][0], resp.text
        lease = _lease(server, lease_id)
        assert lease.state is LeaseState.REVOKING and lease.revoke_attempts == 0, lease
        proxy.up()
        wait_for("revoked once back",
                 lambda: _lease(server, lease_id).state is LeaseState.REVOKED,
                 BACKEND_TIMEOUT + 10)
        assert asyncio.run(pg_roles(postgres_dsn, f"{template}h")) == set()
    finally:
        server.stop()
        proxy.close()


def test_a_forced_sts_lease_whose_call_failed_says_when_its_keys_die(tmp_path: Path) -> None:
    """A forced federation-token lease of a mount not configured here (the call fails):
    its ``admin`` / ``revoke_force`` line has ``backend_revoked: false`` and
    ``credential_valid_until`` (the token's AWS expiry), as the ``revoke`` line of a
    forced STS lease has; it had only the first."""
    register()
    server = start_broker(write_config(tmp_path, NOOP))
    try:
        assert server.state is not None
        store = server.state.store
        now = time.time()
        lease_id = "aws/creds/fed/abcdef123456"
        expires_at = int(now + 900)

        async def put() -> None:
            lease = make_lease(lease_id, issue_time=now, ttl=600)
            await store.insert_pending(lease)
            await store.activate(lease.id, revocation={
                "username": "fed-user", "credential_type": "federation_token",
                "expires_at": expires_at}, expire_time=lease.expire_time, renewable=False)

        server.call(put())
        resp = requests.put(f"{server.url}/v1/sys/leases/revoke-force/aws/", headers=H,
                            timeout=60)
        assert resp.status_code in (200, 202), resp.text
        wait_for("forced", lambda: _lease(server, lease_id).state is LeaseState.REVOKED, 20)
        [line] = [ev for ev in _audit(server) if ev.get("action") == "revoke_force"]
        assert line["outcome"] == "forced" and line["backend_revoked"] is False, line
        assert "'aws' is not configured" in line["error"], line
        assert line["credential_valid_until"] == time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at)), line
    finally:
        server.stop()


def _lease(server: BrokerThread, lease_id: str) -> Any:
    assert server.state is not None
    lease = server.call(server.state.store.get(lease_id))
    assert lease is not None, lease_id
    return lease


def test_the_held_back_line_comes_as_the_leases_fall_due(
        tmp_path: Path, postgres_dsn: str, template: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The mount is unhealthy before any of its leases is due: the "N due lease(s) of mount
    'hung' wait for it to be healthy again" line comes within a few seconds of the first
    falling due. It came up to a minute later (the next count of unserved mounts), or
    never in a shorter outage (QA)."""
    caplog.set_level(logging.INFO)
    proxy = TcpProxy(dsn_port(postgres_dsn))
    server = start_broker(write_config(tmp_path, _config(
        postgres_dsn, via_proxy(postgres_dsn, proxy.port), template)))
    try:
        client = hvac.Client(url=server.url, token=ROOT_TOKEN, timeout=30)
        lease_id = client.read("hung/creds/app")["lease_id"]
        pg_lease = client.read("pg/creds/app")["lease_id"]
        proxy.down()  # refused: an issue from it fails, and finds it unhealthy
        with pytest.raises(hvac.exceptions.VaultDown):
            client.read("hung/creds/app")
        wait_for("hung unhealthy", lambda: not mount_health(server, "hung")["healthy"],
                 BACKEND_TIMEOUT + 4)
        # A revoke wakes the sweeper now: it sees hung held back, none of its leases due
        # yet (the old code then looked again only a minute later).
        client.sys.revoke_lease(pg_lease)
        due = _lease(server, lease_id).expire_time
        assert time.time() < due - 1, "the outage was seen too late for this test"
        wait_for("the held-back line", lambda: any(
            "of mount 'hung' wait for it to be healthy again" in r.getMessage()
            for r in caplog.records), due - time.time() + 5)
        assert time.time() >= due - 0.5  # said once due, not before
    finally:
        proxy.up()
        server.stop()
        proxy.close()
