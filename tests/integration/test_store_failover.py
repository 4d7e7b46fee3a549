"""A PostgreSQL lease store failing over to its synchronous standby under a serving broker.

docs/operations.md, "When something goes away": with synchronous replication
underneath, a failover loses no committed lease row, and the broker carries
on by itself once its store address points at the new primary. Here a
private primary and a streaming standby (synchronous_standby_names) run from
the machine's PostgreSQL binaries; the broker reaches the store through a TCP
proxy, as it would through a virtual IP or HAProxy in front of Patroni. The
primary is killed (immediate stop: no shutdown checkpoint), the standby
promoted, the proxy pointed at it; every lease issued before the crash is
still there to renew and revoke, a lease due during the failover is revoked
afterwards, and issuing works again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import requests

from broker.bench.pgcluster import cluster_dir, cluster_os_user, local_initdb
from broker.lease import LeaseFilter, LeaseState
from tests.conftest import run, server_missing
from tests.integration.broker_harness import (
    BrokerThread,
    TcpProxy,
    drop_pg_roles,
    free_port,
    pg_execute,
    pg_roles,
    revoke_mount_pg,
    root_api,
    start_broker,
    write_config,
)

pytestmark = pytest.mark.integration


@dataclass
class Cluster:
    data: str
    port: int


class Pair:
    """A primary and its synchronous standby, as the postgres OS user when run as root."""

    def __init__(self) -> None:
        initdb = local_initdb()
        if initdb is None:
            server_missing("PostgreSQL server binaries (initdb) for a private primary/standby")
        assert initdb is not None
        self.bindir = os.path.dirname(initdb)
        try:
            self.user = cluster_os_user()
        except LookupError:
            server_missing("an OS user 'postgres' to run a private cluster as")
        self.root = cluster_dir("broker-failover-", self.user)
        self.primary = Cluster(os.path.join(self.root, "primary"), free_port())
        self.standby = Cluster(os.path.join(self.root, "standby"), free_port())

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([os.path.join(self.bindir, tool), *args], user=self.user,
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stderr.strip() or done.stdout.strip()}")

    def _start(self, c: Cluster) -> None:
        options = f"-p {c.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", c.data, "-l", c.data + ".log", "-w", "-o", options, "start")

    def start(self) -> None:
        # trust on 127.0.0.1: a throwaway pair on random ports, replication included.
        self._run("initdb", "-D", self.primary.data, "-A", "trust", "-U", "postgres", "-N",
                  "-E", "UTF8", "--no-locale")
        with open(os.path.join(self.primary.data, "postgresql.conf"), "a") as conf:
            conf.write("wal_level = replica\nmax_wal_senders = 4\n"
                       "synchronous_standby_names = 'standby1'\nsynchronous_commit = on\n")
        self._start(self.primary)
        self._run("pg_basebackup", "-D", self.standby.data, "-R", "-X", "stream",
                  "-d", f"host=127.0.0.1 port={self.primary.port} user=postgres "
                        "application_name=standby1")
        self._start(self.standby)

    def dsn(self, c: Cluster, user: str = "postgres", database: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{c.port}/{database}"

    def stop_standby(self) -> None:
        self._run("pg_ctl", "-D", self.standby.data, "-m", "immediate", "-w", "stop")

    def start_standby(self) -> None:
        self._start(self.standby)

    def crash_primary(self) -> None:
        self._run("pg_ctl", "-D", self.primary.data, "-m", "immediate", "-w", "stop")

    def promote_standby(self) -> None:
        self._run("pg_ctl", "-D", self.standby.data, "-w", "promote")

    def fail_over(self, proxy: TcpProxy, *, outage: float = 0.0) -> None:
        """Kill the primary, promote the standby, point ``proxy`` at it after ``outage`` s."""
        self.crash_primary()
        proxy.down()
        self.promote_standby()
        # Alone now, it must stop waiting for a synchronous standby of its own (its
        # config is the old primary's copy), or every COMMIT would hang: what
        # Patroni does on failover when no other standby is left.
        run(pg_execute(self.dsn(self.standby),
                       "ALTER SYSTEM SET synchronous_standby_names = ''",
                       "SELECT pg_reload_conf()"))
        proxy.target_port = self.standby.port
        time.sleep(outage)
        proxy.up()

    def stop(self) -> None:
        for c in (self.primary, self.standby):
            subprocess.run([os.path.join(self.bindir, "pg_ctl"), "-D", c.data, "-m",
                            "immediate", "-w", "stop"], user=self.user, capture_output=True,
                           timeout=60, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


async def _wait_sync(dsn: str, timeout: float = 30) -> None:
    """Until the primary reports its standby streaming as synchronous."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while await conn.fetchval("SELECT count(*) FROM pg_stat_replication"
                                  " WHERE application_name = 'standby1'"
                                  " AND sync_state = 'sync'") != 1:
            assert time.monotonic() < deadline, "the standby did not become synchronous"
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    try:
        try:
            p.start()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            server_missing(f"a private PostgreSQL primary and standby did not start: {exc}")
        yield p
    finally:
        p.stop()


def _store_behind_proxy(pair: Pair) -> tuple[str, TcpProxy]:
    """The store database on ``pair``'s primary, and a proxy to it: (store URL, proxy)."""
    run(_wait_sync(pair.dsn(pair.primary)))
    run(pg_execute(pair.dsn(pair.primary), "CREATE ROLE broker_store LOGIN",
                   "CREATE DATABASE broker_store OWNER broker_store"))
    proxy = TcpProxy(pair.primary.port)
    return f"postgresql://broker_store@127.0.0.1:{proxy.port}/broker_store", proxy


def _replica(directory: Path, storage_url: str, postgres_dsn: str, template: str,
             leases: str = "") -> BrokerThread:
    """A broker on ``storage_url``; mount pg on the local server with roles ``app`` (1 h)
    and ``short`` (3 s)."""
    directory.mkdir(exist_ok=True)
    return start_broker(write_config(directory, f"""
[leases]
{leases}

[mounts.pg]
plugin = "postgres"
connection_url = "{postgres_dsn}"

[mounts.pg.roles.app]
username_template = "{template}-{{{{random 10}}}}"
default_ttl = "1h"
max_ttl = "2h"

[mounts.pg.roles.short]
username_template = "{template}-{{{{random 10}}}}"
default_ttl = "3s"
max_ttl = "1h"
""", storage_url=storage_url))


def _broker_on(pair: Pair, tmp_path: Path, postgres_dsn: str, template: str,
               leases: str = "") -> tuple[BrokerThread, TcpProxy]:
    """One broker whose store is on ``pair``'s primary, through a proxy."""
    storage_url, proxy = _store_behind_proxy(pair)
    return _replica(tmp_path, storage_url, postgres_dsn, template, leases), proxy


def _until_issuing(api: Callable[..., requests.Response], deadline: float) -> str:
    """Issue until the store answers again (503 meanwhile); the new role's name."""
    while (resp := api("GET", "pg/creds/app")).status_code != 200:
        assert time.monotonic() < deadline, f"issuing did not recover: {resp.text}"
        assert resp.status_code == 503, resp.text
        time.sleep(0.3)
    return str(resp.json()["data"]["username"])


def _expired(brokers: Sequence[BrokerThread]) -> Counter[str]:
    """How many times each lease was revoked on expiry, over the replicas' audit logs."""
    return Counter(str(event["lease"]["id"])
                   for b in brokers
                   for event in map(json.loads, Path(b.audit_path).read_text().splitlines())
                   if event["type"] == "expire")


def test_a_store_failover_to_a_synchronous_standby_loses_no_lease(
        tmp_path: Path, postgres_dsn: str, pair: Pair) -> None:
    template = f"fov{os.getpid() % 1000}"
    broker, proxy = _broker_on(pair, tmp_path, postgres_dsn, template)
    api = root_api(broker)
    try:
        long = [api("GET", "pg/creds/app").json() for _ in range(5)]
        short = api("GET", "pg/creds/short").json()
        users = {x["data"]["username"] for x in [*long, short]}
        assert run(pg_roles(postgres_dsn, template)) == users

        # The primary dies; the standby, which confirmed every COMMIT, takes over.
        pair.fail_over(proxy, outage=3.5)  # the short lease falls due meanwhile

        deadline = time.monotonic() + 30
        users.add(_until_issuing(api, deadline))
        # Every lease issued before the crash is known to the new primary.
        for lease in long:
            renewed = api("PUT", "sys/leases/renew", json={"lease_id": lease["lease_id"]})
            assert renewed.status_code == 200, renewed.text
        while short["data"]["username"] in run(pg_roles(postgres_dsn, template)):
            assert time.monotonic() < deadline, "the due lease was not revoked after failover"
            time.sleep(0.3)
        health = requests.get(f"{broker.url}/v1/sys/health", timeout=10)
        assert health.status_code == 200, health.text

        revoke_mount_pg(api, postgres_dsn, template)
    finally:
        broker.stop()
        proxy.close()
        run(drop_pg_roles(postgres_dsn, template))  # a failed run's, from the shared server


def test_issues_in_flight_during_a_store_failover_leave_nothing_behind(
        tmp_path: Path, postgres_dsn: str, pair: Pair) -> None:
    """Issues keep coming while the store fails over under them.

    Every issue that answered 200 is known to the new primary (synchronous
    replication: its activation was confirmed by the standby before the
    credential left). Every one that failed leaves no role on the backend:
    it was aborted, or its pending row is rolled back by the stale-pending
    job once the store is back (``pending_timeout`` shortened here).
    """
    template = f"fif{os.getpid() % 1000}"
    broker, proxy = _broker_on(pair, tmp_path, postgres_dsn, template,
                               leases='backend_timeout = "2s"\npending_timeout = "4s"')
    api = root_api(broker)
    issued: list[dict[str, Any]] = []
    failed: list[int] = []
    last_ok = [0.0]  # monotonic time of the latest 200
    stop = threading.Event()

    def issue_until_stopped() -> None:
        while not stop.is_set():
            try:
                resp = api("GET", "pg/creds/app")
            except requests.RequestException:
                failed.append(0)
                continue
            if resp.status_code == 200:
                issued.append(resp.json())
                last_ok[0] = time.monotonic()
            else:
                failed.append(resp.status_code)
                time.sleep(0.05)

    issuers = [threading.Thread(target=issue_until_stopped) for _ in range(4)]
    try:
        for t in issuers:
            t.start()
        time.sleep(1.0)
        pair.fail_over(proxy)
        back = time.monotonic()
        deadline = back + 30
        # Until the issuers have met the outage and issued again since the failover.
        while not failed or last_ok[0] < back:
            assert time.monotonic() < deadline, (len(issued), failed[-5:])
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for t in issuers:
            t.join(60)
        assert set(failed) <= {503}, failed  # refused as an outage, never a 500
        print(f"{len(issued)} issued, {len(failed)} refused during the failover")

        for lease in issued:  # each 200 is on the new primary
            renewed = api("PUT", "sys/leases/renew", json={"lease_id": lease["lease_id"]})
            assert renewed.status_code == 200, renewed.text
        # Only what was handed out exists on the backend, once the rollbacks ran.
        wanted = {lease["data"]["username"] for lease in issued}
        deadline = time.monotonic() + 30
        while (found := run(pg_roles(postgres_dsn, template))) != wanted:
            assert time.monotonic() < deadline, (
                f"left behind: {sorted(found - wanted)}; missing: {sorted(wanted - found)}")
            time.sleep(0.5)
        revoke_mount_pg(api, postgres_dsn, template)
    finally:
        stop.set()
        for t in issuers:
            t.join(60)
        broker.stop()
        proxy.close()
        run(drop_pg_roles(postgres_dsn, template))  # a failed run's, from the shared server


def test_two_replicas_ride_out_a_store_failover_together(
        tmp_path: Path, postgres_dsn: str, pair: Pair) -> None:
    """Two replicas on one store, behind one address, through its failover.

    Both recover by themselves; every lease issued on either before the crash
    renews through the other afterwards; each lease that fell due during the
    outage is revoked once, by one replica; and the cross-replica wake-ups
    (LISTEN/NOTIFY) work again on the new primary: a short lease issued on B
    after the failover, with B then stopped, is revoked on time by A. A's
    sweeper could otherwise only find it on its periodic look at the store,
    up to 30 s later.
    """
    template = f"f2r{os.getpid() % 1000}"
    storage_url, proxy = _store_behind_proxy(pair)
    a = _replica(tmp_path / "a", storage_url, postgres_dsn, template)
    b = _replica(tmp_path / "b", storage_url, postgres_dsn, template)
    api = {"a": root_api(a), "b": root_api(b)}
    b_stopped = False
    try:
        long = {name: [call("GET", "pg/creds/app").json() for _ in range(3)]
                for name, call in api.items()}
        short = [call("GET", "pg/creds/short").json() for call in api.values() for _ in range(3)]

        pair.fail_over(proxy, outage=3.5)  # the short leases fall due meanwhile

        deadline = time.monotonic() + 30
        for call in api.values():
            _until_issuing(call, deadline)
        # Each replica renews the leases the other one issued before the crash.
        for issued_on, other in (("a", "b"), ("b", "a")):
            for lease in long[issued_on]:
                renewed = api[other]("PUT", "sys/leases/renew",
                                     json={"lease_id": lease["lease_id"]})
                assert renewed.status_code == 200, renewed.text
        short_ids = {lease["lease_id"] for lease in short}
        while not short_ids <= set(_expired([a, b])):
            assert time.monotonic() < deadline, "a lease due during the failover was not revoked"
            time.sleep(0.3)
        short_names = {lease["data"]["username"] for lease in short}
        assert not short_names & run(pg_roles(postgres_dsn, template))

        # A wake-up from B reaches A over the new primary.
        late = api["b"]("GET", "pg/creds/short").json()
        b.stop()
        b_stopped = True
        due = time.monotonic() + 3
        while late["lease_id"] not in _expired([a]):
            assert time.monotonic() < due + 10, "A did not hear of B's lease after the failover"
            time.sleep(0.2)
        assert late["data"]["username"] not in run(pg_roles(postgres_dsn, template))

        counts = _expired([a, b])
        assert max(counts.values()) == 1, f"revoked by both replicas: {counts}"
        health = requests.get(f"{a.url}/v1/sys/health", timeout=10)
        assert health.status_code == 200, health.text
        revoke_mount_pg(api["a"], postgres_dsn, template)
    finally:
        a.stop()
        if not b_stopped:
            b.stop()
        proxy.close()
        run(drop_pg_roles(postgres_dsn, template))  # a failed run's, from the shared server


def test_a_primary_left_waiting_for_its_lost_synchronous_standby(
        tmp_path: Path, postgres_dsn: str, pair: Pair) -> None:
    """The synchronous standby dies and nothing demotes it: every commit on the primary hangs.

    Reads still work, writes never finish. The broker answers 503 once the
    store's ``command_timeout`` has passed instead of hanging with the client,
    and ``/v1/sys/health`` stays 503 while writes cannot go through, though the
    reads every request makes still succeed. Once a standby is back, issuing
    works again, health is 200, and the refused issue left no role behind.
    """
    template = f"fsw{os.getpid() % 1000}"
    run(_wait_sync(pair.dsn(pair.primary)))
    run(pg_execute(pair.dsn(pair.primary), "CREATE ROLE broker_store LOGIN",
                   "CREATE DATABASE broker_store OWNER broker_store"))
    storage_url = (f"postgresql://broker_store@127.0.0.1:{pair.primary.port}/broker_store"
                   "?command_timeout=2")
    broker = _replica(tmp_path, storage_url, postgres_dsn, template,
                      leases='backend_timeout = "2s"\npending_timeout = "4s"')
    api = root_api(broker)
    health_url = f"{broker.url}/v1/sys/health"
    try:
        first = api("GET", "pg/creds/app").json()
        pair.stop_standby()

        started = time.monotonic()
        refused = api("GET", "pg/creds/app")
        waited = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert waited < 10, f"the refusal took {waited:.1f}s"
        assert "password" not in refused.text
        # Reads still go through...
        looked = api("PUT", "sys/leases/lookup", json={"lease_id": first["lease_id"]})
        assert looked.status_code == 200, looked.text
        # ...but the broker cannot write, and says so.
        health = requests.get(health_url, timeout=30)
        assert health.status_code == 503, health.text
        assert health.json()["storage"]["healthy"] is False

        pair.start_standby()
        run(_wait_sync(pair.dsn(pair.primary)))
        deadline = time.monotonic() + 30
        issued = _until_issuing(api, deadline)
        while (health := requests.get(health_url, timeout=30)).status_code != 200:
            assert time.monotonic() < deadline, health.text
            time.sleep(0.3)
        wanted = {first["data"]["username"], issued}
        while (found := run(pg_roles(postgres_dsn, template))) != wanted:
            assert time.monotonic() < deadline, f"left behind: {sorted(found - wanted)}"
            time.sleep(0.3)
        revoke_mount_pg(api, postgres_dsn, template)
    finally:
        broker.stop()
        run(drop_pg_roles(postgres_dsn, template))  # a failed run's, from the shared server


@pytest.mark.parametrize("racing", [1, 3])
def test_a_revocation_racing_an_issues_commit_leaves_no_role(
        tmp_path: Path, pair: Pair, racing: int) -> None:
    """A revoke-prefix reaches leases whose roles' COMMITs are still under way.

    An issue makes its lease active beside the backend's COMMIT, so for a
    moment the lease is active while its role is still uncommitted, invisible
    to every other session. A revocation in that moment found "no such role",
    called the lease revoked, and the COMMIT then made a role nobody tracked.
    Here the backend is a private primary whose synchronous standby is
    stopped, so that moment lasts until the standby is back: the revocation
    must wait for each COMMIT's outcome and revoke the role it made, alone
    (one lease) or in a batch (several).
    """
    template = f"rcm{os.getpid() % 1000}"
    backend = pair.dsn(pair.primary)
    run(_wait_sync(backend))
    broker = _replica(tmp_path, f"sqlite:///{tmp_path / 'broker.db'}", backend, template,
                      leases='backend_timeout = "30s"\npending_timeout = "60s"')
    api = root_api(broker)
    outcomes: list[requests.Response] = []
    issuers = [threading.Thread(target=lambda: outcomes.append(api("GET", "pg/creds/app")))
               for _ in range(racing)]
    try:
        # Only the racing leases under the prefix: a revocation of a committed
        # role would itself wait for the standby, and so for the COMMITs.
        pair.stop_standby()  # from here every COMMIT on the backend waits
        for t in issuers:
            t.start()
        # Until the leases are active, their roles' COMMITs hanging (polled: a fixed
        # 1.5 s was not always enough for the issues to get there on a loaded machine,
        # and a revoke-prefix before that missed them).
        assert broker.state is not None
        deadline = time.monotonic() + 30
        while len(broker.call(broker.state.store.list_ids(
                LeaseFilter(prefix="pg/creds/app/"), states=[LeaseState.ACTIVE]))) < racing:
            assert time.monotonic() < deadline, "the racing issues never went active"
            time.sleep(0.1)
        resp = api("PUT", "sys/leases/revoke-prefix/pg/creds/app/")
        assert resp.status_code in (200, 204), resp.text
        time.sleep(1.5)  # the revocation has met the uncommitted roles
        pair.start_standby()
        for t in issuers:
            t.join(60)
        assert [r.status_code for r in outcomes] == [200] * racing, [r.text for r in outcomes]
        names = {r.json()["data"]["username"] for r in outcomes}
        deadline = time.monotonic() + 45
        while left := names & run(pg_roles(backend, template)):
            assert time.monotonic() < deadline, f"roles outlived their revoked leases: {left}"
            time.sleep(0.5)
    finally:
        broker.stop()
