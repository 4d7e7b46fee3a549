"""Day-2 operations, QA round 6, against real brokers and servers.

0. A mount whose backend hangs (accepts TCP, never answers) made each issue try to
   initialize it again, queued behind one another: 20 s, 36 s, 56 s, and hvac gave up
   at 30 s. Now 503 at once with the last reason; one attempt at a time, in the
   background; issuing resumes once the backend answers.
1. A mount whose server went away was reported healthy until the next probe (up to
   10 s) while every issue failed: now a failed call that may mean an outage has the
   mount verified at once, in the background.
2. A PostgreSQL store outage was logged twice at its start and end: by the store's
   pool and by the periodic jobs. Now once (the jobs' StoreOutage, told by the pool).
3. An unhealthy mount was logged as a WARNING at every 10 s probe: now when it starts,
   once a minute while it lasts, and when it ends (INFO, with how long).
4. Renewing a lease of a mount a reload removed answered 404; now 503, as revoking does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import hvac
import hvac.exceptions
import pytest
import requests

import broker.jobs
from broker.bench.noop import register
from broker.jobs import HEALTH_INTERVAL
from broker.lease import LeaseState
from broker.periodic import StoreOutage
from broker.store.pg_guard import GuardedPool
from tests.integration import ops_fixtures
from tests.integration.broker_harness import (
    ROOT_TOKEN,
    BrokerThread,
    TcpProxy,
    dsn_port,
    start_broker,
    via_proxy,
    write_config,
)
from tests.integration.ops_fixtures import (
    NOOP,
    mount_health,
    pg_mount,
    pg_role_prefix,
    reload_without_mounts,
    wait_for,
)

pytestmark = pytest.mark.integration

H = {"X-Vault-Token": ROOT_TOKEN}


def _pg_mount(url: str, template: str, *, backend_timeout: str = "30s") -> str:
    """Mount ``pg`` (postgres plugin) at ``url``, roles ``app`` and ``broken`` (a statement
    the server refuses), and ``[leases]``."""
    return f"""
[leases]
backend_timeout = "{backend_timeout}"
""" + pg_mount("pg", url, template, max_ttl="2h") + f"""
[mounts.pg.roles.broken]
username_template = "{template}-{{{{random 10}}}}"
creation_statements = ["CREATE ROLL \\"{{{{name}}}}\\""]
default_ttl = "1h"
"""


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and text in r.getMessage()]


@pytest.fixture
def template(postgres_dsn: str) -> Iterator[str]:
    """A username prefix for this test's roles; whatever is left of them is dropped."""
    with pg_role_prefix(postgres_dsn, "r6") as name:
        yield name


blackhole = ops_fixtures.blackhole


# -- 0. a backend that hangs ---------------------------------------------------------------


def test_a_hung_backend_answers_503_at_once_and_issuing_resumes(
        tmp_path: Path, postgres_dsn: str, blackhole: int, template: str) -> None:
    """Mount behind a proxy to a blackhole (backend_timeout 4s): unhealthy from start-up;
    five concurrent hvac issues each answer 503 (VaultDown) with the reason within ~1 s,
    none queued behind another's reconnection (it took 4, 8, 12 ... s); once the proxy
    leads to the real PostgreSQL, issuing works again within a probe interval."""
    proxy = TcpProxy(blackhole)
    broker = start_broker(write_config(tmp_path, _pg_mount(
        via_proxy(postgres_dsn, proxy.port), template, backend_timeout="4s")))
    try:
        health = mount_health(broker, "pg")
        assert health["healthy"] is False
        # Start-up waits at most CONNECT_WAIT (5 s) for a mount; this one's attempt
        # gives up at backend_timeout (4 s) with its own reason.
        deadline = time.monotonic() + 10
        while "initialize timed out after 4s" not in str(health["error"]):
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
            health = mount_health(broker, "pg")

        def issue() -> tuple[float, str]:
            client = hvac.Client(url=broker.url, token=ROOT_TOKEN, timeout=30)
            started = time.monotonic()
            with pytest.raises(hvac.exceptions.VaultDown) as caught:
                client.read("pg/creds/app")
            return time.monotonic() - started, str(caught.value)

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda _: issue(), range(5)))
        took = sorted(t for t, _ in answers)
        # One of them may start the background reconnection and wait up to 1 s for it.
        assert took[-1] < 3.0, took
        assert all(t < 1.5 for t in took[:4]), took
        for _, error in answers:
            assert "mount 'pg' is unavailable: initialize timed out after 4s" in error

        proxy.down()
        proxy.target_port = dsn_port(postgres_dsn)
        proxy.up()
        back = time.monotonic()
        client = hvac.Client(url=broker.url, token=ROOT_TOKEN, timeout=30)
        while True:
            try:
                lease_id = client.read("pg/creds/app")["lease_id"]
                break
            except hvac.exceptions.VaultDown:
                assert time.monotonic() - back < HEALTH_INTERVAL, "issuing did not resume"
                time.sleep(0.1)
        assert mount_health(broker, "pg") == {"plugin": "postgres", "healthy": True, "error": None,
                                              "overdue_leases": 0}
        client.sys.revoke_lease(lease_id)
    finally:
        broker.stop()
        proxy.close()


# -- 1 and 3. a failed issue tells health at once; the log tells transitions ---------------


@pytest.fixture
def slow_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mount-health job runs hourly: only the fix can change health in the test."""
    monkeypatch.setattr(broker.jobs, "HEALTH_INTERVAL", 3600)


def test_a_failed_issue_marks_the_mount_unhealthy_before_the_next_probe(
        tmp_path: Path, postgres_dsn: str, template: str, slow_probe: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """The mount's path cut: one issue fails (503), and health says the mount is
    unhealthy within 5 s (the probe runs hourly here); a statement the server refuses
    (400) does not. A renew then answers 503 at once. The probe restores the mount."""
    proxy = TcpProxy(dsn_port(postgres_dsn))
    broker = start_broker(write_config(tmp_path, _pg_mount(
        via_proxy(postgres_dsn, proxy.port), template)))
    caplog.set_level(logging.INFO)
    try:
        assert broker.state is not None
        client = hvac.Client(url=broker.url, token=ROOT_TOKEN, timeout=30)
        lease_id = client.read("pg/creds/app")["lease_id"]
        with pytest.raises(hvac.exceptions.InvalidRequest):
            client.read("pg/creds/broken")  # the server answered: no outage
        time.sleep(1.5)  # what a background verify would take, and more
        assert mount_health(broker, "pg")["healthy"] is True

        proxy.down()
        with pytest.raises(hvac.exceptions.VaultDown):
            client.read("pg/creds/app")
        wait_for("health to show the mount unhealthy",
                 lambda: mount_health(broker, "pg")["healthy"] is False, timeout=5)
        assert "cannot reach the server" in str(mount_health(broker, "pg")["error"])
        assert len(_warnings(caplog, "mount pg unhealthy")) == 1
        with pytest.raises(hvac.exceptions.VaultDown, match="mount 'pg' is unavailable"):
            client.sys.renew_lease(lease_id)

        proxy.up()
        broker.call(broker.state.engine.check_mounts())  # the probe
        assert mount_health(broker, "pg")["healthy"] is True
        client.sys.renew_lease(lease_id)
        client.sys.revoke_lease(client.read("pg/creds/app")["lease_id"])
        client.sys.revoke_lease(lease_id)
        assert any("mount pg is healthy again after" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.INFO)
    finally:
        broker.stop()
        proxy.close()


def test_an_unhealthy_mount_is_logged_at_its_start_once_a_minute_and_its_end(
        tmp_path: Path, postgres_dsn: str, template: str, slow_probe: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """A mount whose server refuses from start-up: one WARNING; three more probes (and
    issues) add none; a minute on, one "still unhealthy after"; back, one INFO "healthy
    again after Ns"."""
    proxy = TcpProxy(dsn_port(postgres_dsn))
    proxy.down()
    caplog.set_level(logging.INFO)
    broker = start_broker(write_config(tmp_path, _pg_mount(
        via_proxy(postgres_dsn, proxy.port), template)))
    try:
        assert broker.state is not None
        engine = broker.state.engine
        for _ in range(3):
            broker.call(engine.check_mounts())
            requests.get(f"{broker.url}/v1/pg/creds/app", headers=H, timeout=30)
        said = _warnings(caplog, "mount pg ")
        assert len(said) == 1 and said[0].startswith("mount pg unhealthy: "), said
        runtime = engine.mount("pg")
        runtime._said -= 61  # a minute on (the once-a-minute clock, not a 60 s sleep)
        broker.call(engine.check_mounts())
        broker.call(engine.check_mounts())
        said = _warnings(caplog, "mount pg ")
        assert len(said) == 2 and said[1].startswith("mount pg still unhealthy after "), said
        proxy.up()
        broker.call(engine.check_mounts())
        back = [r.getMessage() for r in caplog.records if "healthy again" in r.getMessage()]
        assert len(back) == 1 and back[0].startswith("mount pg is healthy again after "), back
        assert len(_warnings(caplog, "mount pg ")) == 2
    finally:
        broker.stop()
        proxy.close()


# -- 2. one voice for a store outage -------------------------------------------------------


# The broker whose lease store can be cut (tests/integration/ops_fixtures.py).
proxied_store_broker = ops_fixtures.proxied_store_broker


def _store_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    return [(r.name, r.levelname, r.getMessage()) for r in caplog.records
            if r.getMessage().startswith("lease store") and "listener" not in r.getMessage()
            and r.levelno >= logging.INFO]


def test_a_store_outage_is_told_once_at_its_start_and_once_at_its_end(
        proxied_store_broker: tuple[BrokerThread, TcpProxy],
        caplog: pytest.LogCaptureFixture) -> None:
    """Store cut under a serving broker: the issue that meets it (503) has the outage
    told at once, by one voice (broker.periodic), with the reason; the pool logs no line
    of its own; back up, one "reachable again after Ns"."""
    broker, proxy = proxied_store_broker
    caplog.set_level(logging.INFO)
    proxy.down()
    resp = requests.get(f"{broker.url}/v1/noop/creds/a", headers=H, timeout=30)
    assert resp.status_code == 503, resp.text
    # At once: not at the next run of a periodic job (up to 5 s later).
    wait_for("the outage told", lambda: _store_lines(caplog), timeout=1.0)
    time.sleep(6)  # the jobs meet it too
    proxy.up()
    wait_for("the end told", lambda: any("reachable again" in line[2]
                                         for line in _store_lines(caplog)))
    time.sleep(1)  # anything else that would be said about it
    lines = _store_lines(caplog)
    assert [(name, level) for name, level, _ in lines] == [
        ("broker.periodic", "WARNING"), ("broker.periodic", "INFO")], lines
    assert lines[0][2].startswith("lease store unreachable (") and "Error" in lines[0][2]
    assert lines[1][2].startswith("lease store reachable again after ")
    client = hvac.Client(url=broker.url, token=ROOT_TOKEN)
    assert client.read("noop/creds/a")["lease_id"]


def _clear(pool: GuardedPool) -> bool:
    return pool.error is None


async def test_after_a_store_timeout_the_end_line_says_writes_commit_again(
        postgres_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """A store call that times out (the pool's write probe then commits): one WARNING at
    the start, one INFO at the end saying a write commits again, and no line of the
    pool's own; a job that got through before the probe did ends nothing. Without a
    StoreOutage (a CLI command on the store), the pool still says both itself."""
    caplog.set_level(logging.INFO)
    for attached in (True, False):
        caplog.clear()
        pool = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=2)
        guarded = GuardedPool(pool, probe_interval=0.2)
        outage = StoreOutage(reason=functools.partial(getattr, guarded, "error"),
                             settled=functools.partial(_clear, guarded))
        if attached:
            guarded.outage = outage
        try:
            with pytest.raises(Exception, match="lease store unavailable"):
                await guarded.execute("SELECT pg_sleep(5)", timeout=0.3)
            assert guarded.error is not None and guarded.error.startswith("TimeoutError")
            outage.reached()  # a job that only read: the store does not agree yet
            deadline = time.monotonic() + 10
            while guarded.error is not None:
                assert time.monotonic() < deadline, "the write probe never committed"
                await asyncio.sleep(0.05)
            outage.reached()
        finally:
            await guarded.close()
        lines = [(r.name, r.levelname, r.getMessage()) for r in caplog.records
                 if r.getMessage().startswith("lease store")]
        if attached:
            assert [(n, lvl) for n, lvl, _ in lines] == [
                ("broker.periodic", "WARNING"), ("broker.periodic", "INFO")], lines
            assert lines[0][2].startswith("lease store unreachable (TimeoutError")
            assert lines[1][2].startswith("lease store reachable again after ")
            assert lines[1][2].endswith("(a write commits again)")
        else:
            assert lines == [("broker.store.pg_guard", "WARNING",
                              f"lease store unreachable: {lines[0][2].split(': ', 1)[1]}"),
                             ("broker.store.pg_guard", "WARNING", "lease store writing again")]


# -- 4. renewing a lease of a removed mount --------------------------------------------------


def test_renewing_a_lease_of_a_removed_mount_answers_503_and_leaves_it(
        tmp_path: Path) -> None:
    """A reload removes the mount; hvac's sys.renew_lease on its lease gets 503 (VaultDown,
    was 404 InvalidPath) naming the mount; the lease is as it was."""
    register()
    broker = start_broker(write_config(tmp_path, NOOP))
    try:
        assert broker.state is not None
        client = hvac.Client(url=broker.url, token=ROOT_TOKEN, timeout=30)
        lease_id = client.read("noop/creds/a")["lease_id"]
        before = broker.call(broker.state.store.get(lease_id))
        reload_without_mounts(broker, tmp_path)
        with pytest.raises(hvac.exceptions.VaultDown) as caught:
            client.sys.renew_lease(lease_id, increment=7200)
        error = str(caught.value)
        assert f"lease {lease_id} is not renewed: mount 'noop' is not configured on this " \
               "replica" in error
        after = broker.call(broker.state.store.get(lease_id))
        assert after is not None and before is not None
        assert after.state is LeaseState.ACTIVE
        assert (after.expire_time, after.last_renewal) == (before.expire_time,
                                                           before.last_renewal)
    finally:
        broker.stop()
