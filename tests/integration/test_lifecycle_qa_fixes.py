"""Lease lifecycle QA findings: mounts a replica lacks, and revokes that meet issues in flight.

1. Several replicas share one PostgreSQL store; during a rolling config change
   one may lack a mount. It used to claim that mount's due leases, fail them
   ("mount is not configured") and burn their attempts, down to irrevocable.
   Now a replica claims only its own mounts' leases (forced ones of other
   mounts after a grace), an API revoke there is left to a replica that has
   the mount, and leases of a mount no one has are reported in the log.
2. A revoke-prefix that lands while an issue is in flight (its row still
   ``pending``) used to miss it: the lease went active afterwards, a live
   credential after the operator revoked the prefix. Now the revoke marks
   matching pending rows and ``activate`` refuses them, so the issue is undone
   (403) and its role or user never outlives it, inline or through a revoke
   rule whose expansion had already passed the lease.

Real servers throughout: the lease store on SQLite and PostgreSQL, PostgreSQL
and MySQL backends, brokers over real HTTP.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from broker.config import load_config
from broker.errors import PermissionDenied
from broker.lease import LeaseFilter, LeaseState
from broker.store.base import FORCE_TAKEOVER, LeaseStore
from tests.conftest import run
from tests.integration.broker_harness import (
    BrokerThread,
    drop_pg_roles,
    free_port,
    pg_roles,
    start_broker,
    write_config,
)
from tests.integration.store_fixtures import (
    STORE_KINDS,
    T0,
    StoreMaker,
    broker_store_url,
    fresh_postgres_database,
    make_lease,
    put_active,
)
from tests.integration.test_api_mysql_aws import mysql_connect
from tests.integration.token_fixtures import SlowRoles

pytestmark = pytest.mark.integration

#: every backend user these tests create starts with it (cleanup searches for it).
PREFIX = "lqa-"


# -- the stores ------------------------------------------------------------------


@pytest.fixture(params=sorted(STORE_KINDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LeaseStore]:
    maker: StoreMaker
    async with STORE_KINDS[request.param](request, tmp_path) as maker:
        s = maker.build()
        await s.open()
        try:
            yield s
        finally:
            await s.close()


async def test_claim_due_takes_only_the_leases_of_the_claimers_mounts(store: LeaseStore) -> None:
    """With ``mounts``, claim_due and next_due see only those mounts' leases; others stay put."""
    await put_active(store, make_lease("pg/creds/ro/000001", ttl=10))
    await put_active(store, make_lease("my/creds/ro/000001", ttl=5))
    assert await store.next_due(mounts=("pg",)) == T0 + 10
    assert await store.next_due() == T0 + 5
    assert await store.claim_due(now=T0 + 20, limit=10, claimer="b", claim_timeout=30,
                                 mounts=("other",)) == []
    [claimed] = await store.claim_due(now=T0 + 20, limit=10, claimer="a", claim_timeout=30,
                                      mounts=("pg", "other"))
    assert claimed.id == "pg/creds/ro/000001"
    left = await store.get("my/creds/ro/000001")
    assert left is not None and left.state is LeaseState.ACTIVE and left.revoke_attempts == 0
    assert await store.unserved_mounts(("pg",)) == {"my": 1}
    assert await store.unserved_mounts(("pg",), due_by=T0 + 4) == {}
    assert await store.unserved_mounts(("pg",), due_by=T0 + 5) == {"my": 1}


async def test_a_forced_revocation_of_a_mount_the_claimer_lacks_waits_for_the_grace(
    store: LeaseStore,
) -> None:
    """A forced lease of another mount is claimed only once due for FORCE_TAKEOVER seconds."""
    await put_active(store, make_lease("my/creds/ro/000001"))
    assert await store.queue_revoke_matching(LeaseFilter(prefix="my/"), reason="force",
                                             now=T0 + 1) == 1
    assert await store.claim_due(now=T0 + 1 + FORCE_TAKEOVER - 0.5, limit=10, claimer="a",
                                 claim_timeout=30, mounts=("pg",)) == []
    [claimed] = await store.claim_due(now=T0 + 1 + FORCE_TAKEOVER, limit=10, claimer="a",
                                      claim_timeout=30, mounts=("pg",))
    assert claimed.revoke_reason == "force"


async def test_release_claim_hands_a_lease_back_without_an_attempt(store: LeaseStore) -> None:
    """release_claim: still revoking, due again, unclaimed, attempts untouched; only the holder."""
    await put_active(store, make_lease("my/creds/ro/000001", ttl=1))
    [claimed] = await store.claim_due(now=T0 + 2, limit=10, claimer="a", claim_timeout=30)
    assert not await store.release_claim(claimed.id, claimer="b", due_at=T0 + 3)
    assert await store.release_claim(claimed.id, claimer="a", due_at=T0 + 3)
    got = await store.get(claimed.id)
    assert got is not None and got.state is LeaseState.REVOKING and got.revoke_attempts == 0
    assert await store.next_due() == T0 + 3
    [again] = await store.claim_due(now=T0 + 3, limit=10, claimer="b", claim_timeout=30,
                                    mounts=("my",))
    assert again.id == claimed.id


@pytest.mark.parametrize("rule", [False, True], ids=["inline", "rule"])
async def test_a_pending_row_a_revoke_covered_cannot_be_activated(
    store: LeaseStore, rule: bool,
) -> None:
    """A revoke-prefix marks matching pending rows: activate refuses them (403), other
    pending rows activate, and the stale-pending job still finds the refused one."""
    await put_active(store, make_lease("pg/creds/ro/000001"))
    await store.insert_pending(make_lease("pg/creds/ro/000002"))
    await store.insert_pending(make_lease("my/creds/ro/000003"))
    queued = await store.queue_revoke_rule(
        LeaseFilter(prefix="pg/"), reason="prefix", now=T0 + 1, inline_max=0 if rule else 1000,
        claimer="a", claim_until=T0 + 61)
    assert queued.queued == 1 and (queued.rule_id is not None) == rule
    if rule:  # fully expanded before the issue in flight finishes
        assert queued.rule_id is not None
        step = await store.expand_revoke_rule(queued.rule_id, claimer="a", now=T0 + 2,
                                              limit=100, claim_until=T0 + 62)
        assert step is not None and step.done
    with pytest.raises(PermissionDenied, match="revoked \\(prefix\\) while it was being issued"):
        await store.activate("pg/creds/ro/000002", revocation={"username": "u"},
                             expire_time=T0 + 3600, renewable=True)
    pending = await store.get("pg/creds/ro/000002")
    assert pending is not None and pending.state is LeaseState.PENDING
    stale = await store.stale_pending(before=T0 + 10, limit=10, mounts=("pg",))
    assert [s.id for s in stale] == ["pg/creds/ro/000002"]
    await store.activate("my/creds/ro/000003", revocation={"username": "v"},
                         expire_time=T0 + 3600, renewable=True)


# -- replicas lacking a mount ------------------------------------------------------


def _replica(tmp: Path, name: str, store_url: str, body: str) -> Path:
    directory = tmp / name
    directory.mkdir(exist_ok=True)
    return write_config(directory, body, port=free_port(), storage_url=store_url)


def _pg_mount(postgres_dsn: str, ttl: str = "2s") -> str:
    return f"""
[mounts.pg]
plugin = "postgres"
connection_url = "{postgres_dsn}"

[mounts.pg.roles.short]
username_template = "{PREFIX}{{{{random 10}}}}"
default_ttl = "{ttl}"
max_ttl = "1h"
"""


def _my_mount(mysql_dsn: str) -> str:
    return f"""
[mounts.my]
plugin = "mysql"
connection_url = "{mysql_dsn}"

[mounts.my.roles.app]
username_template = "{PREFIX}{{{{random 8}}}}"
default_ttl = "1h"
"""


def _audit(broker: BrokerThread) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(broker.audit_path).read_text().splitlines()]


def _api(broker: BrokerThread) -> Callable[..., requests.Response]:
    def api(method: str, path: str, body: dict[str, Any] | None = None) -> requests.Response:
        return requests.request(method, f"{broker.url}/v1/{path}", json=body, timeout=60,
                                headers={"X-Vault-Token": broker.root_token})
    return api


def _lease(broker: BrokerThread, lease_id: str) -> Any:
    assert broker.state is not None
    return broker.call(broker.state.store.get(lease_id))


@pytest.fixture
def pg_cleanup(postgres_dsn: str) -> Iterator[None]:
    """Drops whatever role a test left behind (what a forced or failed revoke leaves)."""
    yield
    run(drop_pg_roles(postgres_dsn, PREFIX))


@pytest.fixture
def shared_store(request: pytest.FixtureRequest, pg_cleanup: None) -> str:
    """The replicas' shared PostgreSQL lease store (the session's database, emptied)."""
    dsn: str = run(fresh_postgres_database(request))
    return dsn


def test_a_replica_lacking_a_mount_leaves_its_due_leases_to_one_that_has_it(
    tmp_path: Path, shared_store: str, postgres_dsn: str, mysql_dsn: str,
) -> None:
    """Two replicas on one store, only A has mount pg: every pg lease expires once, on A,
    with no failed attempt on B (it used to claim about half and fail them)."""
    a = start_broker(_replica(tmp_path, "a", shared_store,
                              _pg_mount(postgres_dsn) + _my_mount(mysql_dsn)))
    b = start_broker(_replica(tmp_path, "b", shared_store, _my_mount(mysql_dsn)))
    try:
        ids = []
        for _ in range(8):
            resp = _api(a)("GET", "pg/creds/short")
            assert resp.status_code == 200, resp.text
            ids.append(resp.json()["lease_id"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ended = [_lease(a, i) for i in ids]
            if all(x is not None and x.state is LeaseState.EXPIRED for x in ended):
                break
            time.sleep(0.3)
        assert all(x is not None and x.state is LeaseState.EXPIRED for x in ended), ended
        assert [x.revoke_attempts for x in ended] == [0] * len(ids)
        expired = [e["lease"]["id"] for e in _audit(a) if e["type"] == "expire"]
        assert sorted(expired) == sorted(ids)
        assert [e for e in _audit(b) if e["type"] in {"expire", "revoke_failed", "irrevocable"}
                and e["lease"]["mount"] == "pg"] == []
        assert run(pg_roles(postgres_dsn, PREFIX)) == set()
    finally:
        a.stop()
        b.stop()


def test_an_api_revoke_on_a_replica_lacking_the_mount_is_carried_out_by_one_that_has_it(
    tmp_path: Path, shared_store: str, postgres_dsn: str, mysql_dsn: str,
) -> None:
    """PUT sys/leases/revoke through B (no pg mount) answers 204 once A has revoked the
    lease; no attempt is burned (B used to claim it itself, fail and answer 202)."""
    a = start_broker(_replica(tmp_path, "a", shared_store, _pg_mount(postgres_dsn, "1h")))
    b = start_broker(_replica(tmp_path, "b", shared_store, _my_mount(mysql_dsn)))
    try:
        issued = _api(a)("GET", "pg/creds/short")
        assert issued.status_code == 200, issued.text
        lease_id = issued.json()["lease_id"]
        username = issued.json()["data"]["username"]
        resp = _api(b)("PUT", "sys/leases/revoke", {"lease_id": lease_id})
        assert resp.status_code == 204, resp.text
        ended = _lease(a, lease_id)
        assert ended.state is LeaseState.REVOKED and ended.revoke_attempts == 0
        assert username not in run(pg_roles(postgres_dsn, PREFIX))
        assert [e["lease"]["id"] for e in _audit(a) if e["type"] == "revoke"] == [lease_id]
    finally:
        a.stop()
        b.stop()


def test_a_single_replica_that_lost_a_mount_keeps_and_reports_its_leases(
    tmp_path: Path, postgres_dsn: str, caplog: pytest.LogCaptureFixture, pg_cleanup: None,
) -> None:
    """A broker restarted without mount pg logs its live and due leases by mount and count,
    leaves them unrevoked with no attempt burned, ends a forced one, and revokes the rest
    once the mount is back."""
    store_url = f"sqlite:///{tmp_path / 'broker.db'}"
    with_pg = write_config(tmp_path, _pg_mount(postgres_dsn, "3s"), storage_url=store_url)
    broker = start_broker(with_pg)
    try:
        issued = [_api(broker)("GET", "pg/creds/short").json() for _ in range(3)]
        due = time.time() + 3.5
    finally:
        broker.stop()
    ids = [x["lease_id"] for x in issued]
    time.sleep(max(0.0, due - time.time()))  # every lease is due when it starts again
    without = tmp_path / "without"
    without.mkdir()
    config = load_config(write_config(without, "", storage_url=store_url))
    caplog.set_level(logging.WARNING)
    broker = BrokerThread(config).start()
    try:
        forced = _api(broker)("PUT", f"sys/leases/revoke-force/{ids[0]}")
        assert forced.status_code in (200, 204), forced.text
        time.sleep(1)  # for a sweep of the due leases
        messages = [r.getMessage() for r in caplog.records]
        assert any("mount 'pg' is not configured on this replica but 3 lease(s)" in m
                   for m in messages), messages
        assert any("due lease(s) of mount 'pg' are left for a replica" in m
                   for m in messages), messages
        deadline = time.monotonic() + FORCE_TAKEOVER + 5
        while _lease(broker, ids[0]).state is not LeaseState.REVOKED:
            assert time.monotonic() < deadline, "the forced lease was never ended"
            time.sleep(0.2)
        for lease_id in ids[1:]:
            left = _lease(broker, lease_id)
            assert left.state in {LeaseState.ACTIVE, LeaseState.REVOKING}, left
            assert left.revoke_attempts == 0
    finally:
        broker.stop()
    broker = start_broker(with_pg)
    try:
        deadline = time.monotonic() + 20
        while any(_lease(broker, i).state is not LeaseState.EXPIRED for i in ids[1:]):
            assert time.monotonic() < deadline, "the leases were not revoked once pg was back"
            time.sleep(0.2)
        left = run(pg_roles(postgres_dsn, PREFIX))
        assert left == {issued[0]["data"]["username"]}  # forced: never asked of the backend
    finally:
        broker.stop()


# -- revoke-prefix vs issues in flight --------------------------------------------


#: Beside the slow roles (token_fixtures.SlowRoles: creation statements that take SLOW
#: s, so an issue stays in flight that long), a fast role on each mount: issued at once.
FAST_ROLES = f"""
[mounts.pg.roles.fast]
username_template = "{PREFIX}{{{{random 8}}}}-pg"

[mounts.my.roles.fast]
username_template = "{PREFIX}{{{{random 8}}}}-my"
"""


async def _backend_users(postgres_dsn: str, mysql_dsn: str) -> list[str]:
    """The PostgreSQL roles and MySQL users these tests made that still exist."""
    names = sorted(await pg_roles(postgres_dsn, PREFIX))
    url = urlsplit(mysql_dsn)
    my = await mysql_connect(mysql_dsn, url.username or "root", url.password or "")
    try:
        async with my.cursor() as cur:
            await cur.execute("SELECT user FROM mysql.user WHERE user LIKE %s", (PREFIX + "%",))
            names += [r[0] for r in await cur.fetchall()]
    finally:
        my.close()
    return names


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return broker_store_url(request, tmp_path)


@pytest.mark.parametrize(("mount", "rule"), [("pg", False), ("my", False), ("pg", True)],
                         ids=["pg-inline", "my-inline", "pg-rule"])
def test_a_revoke_prefix_during_an_issue_in_flight_undoes_the_issue(
    tmp_path: Path, store_url: str, postgres_dsn: str, mysql_dsn: str, mount: str, rule: bool,
    pg_cleanup: None,
) -> None:
    """A revoke-prefix landing while an issue is in its backend's statements: the issue
    answers 403, its role or user is gone and no live lease is left (it used to go active
    after the revoke), queued inline or by a rule already fully expanded."""
    slow = SlowRoles(postgres_dsn, mysql_dsn, PREFIX)
    broker = start_broker(write_config(tmp_path, slow.mounts() + FAST_ROLES,
                                       storage_url=store_url))
    api = _api(broker)
    try:
        assert broker.state is not None
        if rule:
            broker.state.engine.rule_inline_max = 0  # any live lease: a revoke rule
            assert api("GET", f"{mount}/creds/fast").status_code == 200
        # Back once in its creation statements' sleep (polled: a fixed 0.4 s was too
        # short when loaded).
        issued = slow.start_issue(broker, f"{mount}/creds/slow", broker.root_token)
        revoked = api("PUT", f"sys/leases/revoke-prefix/{mount}/", {"sync": True})
        assert revoked.status_code in (200, 204), revoked.text
        if rule:  # expanded in full (sync waited for it), before the issue finishes
            broker.call(broker.state.engine.expand_revoke_rules())
        answer = issued()
        assert answer.status_code == 403, answer.text
        assert "while it was being issued" in answer.json()["errors"][0]
        live = api("LIST", f"sys/leases/lookup/{mount}/creds/slow/")
        assert live.status_code == 404, live.text
        deadline = time.monotonic() + 15
        while (users := run(_backend_users(postgres_dsn, mysql_dsn))):
            assert time.monotonic() < deadline, f"left behind: {users}"
            time.sleep(0.2)
    finally:
        for name in ("pg", "my"):  # whatever went live goes (on a failure: the old bug)
            api("PUT", f"sys/leases/revoke-prefix/{name}/", {"sync": True})
        broker.stop()


def test_the_stale_pending_job_rolls_back_a_marked_row_after_a_crash(
    tmp_path: Path, postgres_dsn: str, mysql_dsn: str, pg_cleanup: None,
) -> None:
    """A pending row a revoke-prefix marked, whose issuer died, is rolled back by the job:
    the row goes and the backend is asked to delete its user."""
    store_url = f"sqlite:///{tmp_path / 'broker.db'}"
    slow = SlowRoles(postgres_dsn, mysql_dsn, PREFIX)
    broker = start_broker(write_config(tmp_path, slow.mounts() + FAST_ROLES,
                                       storage_url=store_url))
    try:
        assert broker.state is not None
        lease = make_lease("pg/creds/slow/crashed", issue_time=time.time() - 3600)
        lease.revocation = {"username": f"{PREFIX}crashed-pg"}
        broker.call(broker.state.store.insert_pending(lease))
        api = _api(broker)
        assert api("PUT", "sys/leases/revoke-prefix/pg/").status_code in (200, 204)
        assert broker.call(broker.state.engine.rollback_stale_pending()) == 1
        assert broker.call(broker.state.store.get(lease.id)) is None
        assert [e for e in _audit(broker) if e["type"] == "rollback"
                and e["lease"]["id"] == lease.id and e.get("user_deleted")]
    finally:
        broker.stop()


def test_a_lease_is_never_revoked_through_another_plugin_after_a_restart(
    tmp_path: Path, postgres_dsn: str, mysql_dsn: str, pg_cleanup: None,
) -> None:
    """Mount ``pg`` issued a PostgreSQL role, then the broker restarted with ``pg`` running
    the mysql plugin (a reload refuses that while leases live; a restart cannot). The
    revocation is not handed to mysql, whose DROP USER IF EXISTS found nothing and
    "succeeded": the lease read revoked while the role and its password lived on. Now
    it fails for good naming both plugins (irrevocable, listed), and revoke-force ends
    it without a backend call."""
    store_url = f"sqlite:///{tmp_path / 'broker.db'}"
    broker = start_broker(write_config(tmp_path, _pg_mount(postgres_dsn, "1h"),
                                       storage_url=store_url))
    try:
        issued = _api(broker)("GET", "pg/creds/short").json()
    finally:
        broker.stop()
    lease_id, role = issued["lease_id"], issued["data"]["username"]
    other = tmp_path / "mysql-now"
    other.mkdir()
    swapped = _my_mount(mysql_dsn).replace("[mounts.my]", "[mounts.pg]").replace(
        "[mounts.my.roles.app]", "[mounts.pg.roles.short]")
    broker = start_broker(write_config(other, swapped, storage_url=store_url))
    try:
        refused = _api(broker)("PUT", "sys/leases/revoke", {"lease_id": lease_id})
        assert refused.status_code == 502, refused.text
        error = refused.json()["errors"][0]
        assert "issued by plugin 'postgres'" in error and "now runs 'mysql'" in error, error
        assert _lease(broker, lease_id).state is LeaseState.IRREVOCABLE
        assert role in run(pg_roles(postgres_dsn, PREFIX))  # honest: it still exists
        forced = _api(broker)("PUT", f"sys/leases/revoke-force/{lease_id}")
        assert forced.status_code in (200, 204), forced.text
        deadline = time.monotonic() + 10  # the forced ending is the sweeper's
        while _lease(broker, lease_id).state is not LeaseState.REVOKED:
            assert time.monotonic() < deadline, _lease(broker, lease_id)
            time.sleep(0.1)
    finally:
        broker.stop()
