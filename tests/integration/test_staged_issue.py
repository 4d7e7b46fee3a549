"""Issuing through a staging backend (PostgreSQL): the overlaps keep the crash-safety order.

The engine writes a lease's intent while the plugin runs its statements in an
open transaction, then commits the role and activates the lease together
(``LeaseEngine._issue_staged``). These tests hold or break each step on the
real servers and check that no role is ever committed without its intent,
and that every failure ends with no role and no live lease.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import hvac
import pytest
import requests

from broker.lease import LeaseFilter, LeaseState
from tests.conftest import run
from tests.integration.broker_harness import (
    BrokerThread,
    TcpProxy,
    dsn_port,
    pg_roles,
    start_broker,
    via_proxy,
    write_config,
)
from tests.integration.store_fixtures import fresh_postgres_database

pytestmark = pytest.mark.integration

#: The default creation statement, as a TOML string body.
CREATE = r"""CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'"""


def _mount(dsn: str, prefix: str, roles: dict[str, list[str] | None], leases: str = "") -> str:
    """Mount ``pg`` (one admin connection) with a role per entry; None: default statements."""
    lines = [f"""
[leases]
{leases}

[mounts.pg]
plugin = "postgres"
connection_url = "{dsn}"
max_open_connections = 1
"""]
    for name, statements in roles.items():
        lines.append(f"""
[mounts.pg.roles.{name}]
username_template = "{prefix}{name}-{{{{random 8}}}}"
default_ttl = "1h"
max_ttl = "1h"
""")
        if statements is not None:
            quoted = ", ".join(f'"{s}"' for s in statements)
            lines.append(f"creation_statements = [{quoted}]\n")
    return "".join(lines)


async def _admin_sessions(dsn: str, state: str, query: str = "%") -> int:
    """The broker's admin connections of mount pg in ``state`` running ``query`` (LIKE)."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'broker:pg'"
            " AND state = $1 AND query LIKE $2", state, query))
    finally:
        await conn.close()


async def _eventually(check: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _issue(broker: BrokerThread, role: str) -> requests.Response:
    return requests.post(f"{broker.url}/v1/pg/creds/{role}", timeout=30,
                         headers={"X-Vault-Token": broker.root_token})


def _leases(broker: BrokerThread, role: str) -> list[str]:
    assert broker.state is not None
    store = broker.state.store
    return broker.call(store.list_ids(LeaseFilter(prefix=f"pg/creds/{role}/")))


@pytest.fixture
def prefix(postgres_dsn: str) -> Iterator[str]:
    """A role-name prefix of this test's own; whatever it left is dropped afterwards."""
    tag = f"stg{os.getpid() % 10000}-"
    yield tag

    async def drop() -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            for name in await conn.fetch(
                    "SELECT rolname FROM pg_roles WHERE starts_with(rolname, $1)", tag):
                await conn.execute('DROP ROLE IF EXISTS "{}"'.format(name[0].replace('"', '""')))
        finally:
            await conn.close()
    run(drop())


@pytest.fixture
async def slow_commit(postgres_dsn: str) -> AsyncIterator[str]:
    """A table whose inserted rows make their transaction's COMMIT sleep 3 s.

    A deferred constraint trigger runs at COMMIT: a role created in the same
    transaction commits 3 s late, as if waiting for a synchronous standby.
    """
    table = f"stg_slow_{os.getpid()}"
    admin = await asyncpg.connect(postgres_dsn)
    try:
        await admin.execute(f"""
            DROP TABLE IF EXISTS {table};
            CREATE TABLE {table} (id int);
            CREATE OR REPLACE FUNCTION {table}_sleep() RETURNS trigger LANGUAGE plpgsql
                AS $$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER {table}_sleep AFTER INSERT ON {table}
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {table}_sleep();
        """)
        yield table
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {table};"
                            f" DROP FUNCTION IF EXISTS {table}_sleep()")
        await admin.close()


def _stop(broker: BrokerThread) -> None:
    requests.put(f"{broker.url}/v1/sys/leases/revoke-prefix/pg/", json={"sync": True},
                 headers={"X-Vault-Token": broker.root_token}, timeout=120)
    broker.stop()


async def test_role_commits_only_after_its_intent_is_durable(
        tmp_path: Path, postgres_dsn: str, prefix: str, request: pytest.FixtureRequest) -> None:
    """With the store's lease table locked, the role's statements run but it never commits."""
    store = await fresh_postgres_database(request)
    broker = start_broker(write_config(tmp_path, _mount(postgres_dsn, prefix, {"app": None}),
                                       storage_url=store))
    try:
        client = hvac.Client(url=broker.url, token=broker.root_token)

        def issue() -> dict[str, Any]:
            return client.secrets.database.generate_credentials("app", mount_point="pg")

        first = await asyncio.to_thread(issue)  # store migrated, admin pool connected
        assert await pg_roles(postgres_dsn, prefix) == {first["data"]["username"]}
        blocker = await asyncpg.connect(store)
        try:
            hold = blocker.transaction()
            await hold.start()
            # The intent (an INSERT into leases) waits on this lock; reads go on.
            await blocker.execute("LOCK TABLE leases IN EXCLUSIVE MODE")
            pending = asyncio.ensure_future(asyncio.to_thread(issue))
            # The role's statements ran: the admin connection waits, inside its transaction.
            await _eventually(lambda: _admin_sessions(postgres_dsn, "idle in transaction"),
                              10, "the staged role")
            await asyncio.sleep(0.5)
            assert not pending.done()
            assert await pg_roles(postgres_dsn, prefix) == {first["data"]["username"]}, \
                "a role committed before its intent was durable"
        finally:
            await hold.rollback()
            await blocker.close()
        second = await asyncio.wait_for(pending, 30)
        name = second["data"]["username"]
        assert await pg_roles(postgres_dsn, prefix) == {first["data"]["username"], name}
        host_part = postgres_dsn.split("@", 1)[1]
        conn = await asyncpg.connect(f"postgresql://{name}:{second['data']['password']}"
                                     f"@{host_part}")
        await conn.close()
        lease = second["lease_id"]
        assert lease in await asyncio.to_thread(_leases, broker, "app")
    finally:
        await asyncio.to_thread(_stop, broker)


async def test_an_intent_that_fails_leaves_no_role(
        tmp_path: Path, postgres_dsn: str, prefix: str, request: pytest.FixtureRequest) -> None:
    """The store refuses the pending row: the staged role is rolled back, the connection reused."""
    store = await fresh_postgres_database(request)
    broker = start_broker(write_config(
        tmp_path, _mount(postgres_dsn, prefix, {"app": None, "refused": None}),
        storage_url=store))
    try:
        assert (await asyncio.to_thread(_issue, broker, "app")).status_code == 200
        conn = await asyncpg.connect(store)
        try:
            await conn.execute("ALTER TABLE leases ADD CONSTRAINT staged_test_refuse"
                               " CHECK (role <> 'refused')")
        finally:
            await conn.close()
        for _ in range(3):  # one admin connection: a leaked one would hang the next issue
            refused = await asyncio.to_thread(_issue, broker, "refused")
            assert refused.status_code >= 500, refused.text
            assert refused.json()["errors"]
            assert (await asyncio.to_thread(_issue, broker, "app")).status_code == 200
        assert await pg_roles(postgres_dsn, f"{prefix}refused") == set()
        assert await asyncio.to_thread(_leases, broker, "refused") == []
        assert len(await pg_roles(postgres_dsn, f"{prefix}app")) == 4
    finally:
        await asyncio.to_thread(_stop, broker)


async def test_a_commit_that_fails_undoes_the_lease_and_the_role(
        tmp_path: Path, postgres_dsn: str, prefix: str) -> None:
    """A deferred constraint fails the role's COMMIT: no role, no lease, a rollback audited."""
    parent, child = f"stg_parent_{os.getpid()}", f"stg_child_{os.getpid()}"
    admin = await asyncpg.connect(postgres_dsn)
    await admin.execute(f"""
        DROP TABLE IF EXISTS {child}, {parent};
        CREATE TABLE {parent} (id int PRIMARY KEY);
        CREATE TABLE {child} (id int REFERENCES {parent} DEFERRABLE INITIALLY DEFERRED);
    """)
    broker = start_broker(write_config(tmp_path, _mount(postgres_dsn, prefix, {
        "app": None,
        # Runs fine; its COMMIT fails (no parent row 1).
        "deferred": [CREATE, f"INSERT INTO {child} VALUES (1)"],
    })))
    try:
        failed = await asyncio.to_thread(_issue, broker, "deferred")
        assert failed.status_code == 400, failed.text
        assert "foreign key" in failed.json()["errors"][0]
        assert await pg_roles(postgres_dsn, f"{prefix}deferred") == set()
        assert await asyncio.to_thread(_leases, broker, "deferred") == []
        assert broker.state is not None
        stats = broker.state.engine.mounts["pg"].stats
        assert stats["commit_user"].errors == 1  # it failed at the commit, not before
        lines = (await asyncio.to_thread(Path(broker.audit_path).read_text)).splitlines()
        rollbacks = [e for e in map(json.loads, lines)
                     if e["type"] == "rollback" and e["lease"]["role"] == "deferred"]
        assert len(rollbacks) == 1, rollbacks
        assert "foreign key" in rollbacks[0]["reason"]
        # The issue line was written beside the COMMIT that then failed: the
        # request's lines are its request, that issue line, and the rollback.
        request_id = rollbacks[0]["request"]["id"]
        mine = [e for e in map(json.loads, lines)
                if (e.get("request") or {}).get("id") == request_id]
        assert [(e["type"], e["outcome"]) for e in mine] == [
            ("request", "ok"), ("issue", "ok"), ("rollback", "ok")], mine
        assert mine[1]["lease"]["id"] == rollbacks[0]["lease"]["id"]
        # The one admin connection is usable again.
        assert (await asyncio.to_thread(_issue, broker, "app")).status_code == 200

    finally:
        await asyncio.to_thread(_stop, broker)
        await admin.execute(f"DROP TABLE IF EXISTS {child}, {parent}")
        await admin.close()


async def test_a_cancelled_issue_leaves_nothing(tmp_path: Path, postgres_dsn: str,
                                                prefix: str) -> None:
    """Cancelled while its statements run (shutdown, timeout): no role, no row, no lost connection."""
    broker = start_broker(write_config(tmp_path, _mount(postgres_dsn, prefix, {
        "app": None,
        "slow": [CREATE, "SELECT pg_sleep(2)"],
    })))
    try:
        assert broker.state is not None
        engine, store = broker.state.engine, broker.state.store
        token = broker.call(store.token_by_accessor("test-root"))
        assert token is not None
        issuing = asyncio.run_coroutine_threadsafe(engine.issue("pg", "slow", token=token),
                                                   broker.loop)
        await _eventually(lambda: _admin_sessions(postgres_dsn, "active"), 10,
                          "the slow statements")
        issuing.cancel()
        await _eventually(lambda: _no_active_admin_session(postgres_dsn), 10,
                          "the aborted transaction")
        await _eventually(lambda: _no_leases(broker, "slow"), 10, "the rolled-back row")
        assert await pg_roles(postgres_dsn, f"{prefix}slow") == set()
        assert (await asyncio.to_thread(_issue, broker, "app")).status_code == 200
    finally:
        await asyncio.to_thread(_stop, broker)


async def _no_active_admin_session(dsn: str) -> bool:
    return await _admin_sessions(dsn, "active") == 0


async def _no_leases(broker: BrokerThread, role: str) -> bool:
    return await asyncio.to_thread(_leases, broker, role) == []


async def test_a_commit_cut_off_by_the_timeout_is_settled_before_the_rollback(
        tmp_path: Path, postgres_dsn: str, prefix: str, slow_commit: str) -> None:
    """A COMMIT still running when the call times out is ended on the server, not orphaned.

    A deferred trigger makes the COMMIT sleep 3 s; the backend timeout is 1 s.
    The broker gives up and rolls back, but the server would go on and commit
    the role after the rollback's DROP found nothing, unless the rollback
    first ends that session (``PostgresBackend._settle``).
    """
    broker = start_broker(write_config(tmp_path, _mount(postgres_dsn, prefix, {
        "app": None,
        "slowcommit": [CREATE, f"INSERT INTO {slow_commit} VALUES (1)"],
    }, leases='backend_timeout = "1s"')))
    try:
        failed = await asyncio.to_thread(_issue, broker, "slowcommit")
        assert failed.status_code == 503, failed.text
        assert "timed out" in failed.json()["errors"][0]
        await _no_orphan_of_the_slow_commit(broker, postgres_dsn, prefix)
    finally:
        await asyncio.to_thread(_stop, broker)


async def _no_orphan_of_the_slow_commit(broker: BrokerThread, dsn: str, prefix: str) -> None:
    """Once the slow COMMIT would have ended: no role, no lease, and the mount still issues."""
    await asyncio.sleep(4)  # past the trigger's sleep: an orphan would be there by now
    assert await pg_roles(dsn, f"{prefix}slowcommit") == set()
    assert await asyncio.to_thread(_leases, broker, "slowcommit") == []
    assert (await asyncio.to_thread(_issue, broker, "app")).status_code == 200


async def test_a_cut_off_commit_whose_rollback_cannot_reach_the_server_is_revoked_later(
        tmp_path: Path, postgres_dsn: str, prefix: str, slow_commit: str) -> None:
    """The COMMIT is cut off and the server is then unreachable: the lease is revoked, not left.

    The role's COMMIT sleeps 3 s (a deferred trigger); the backend timeout is
    1 s; the connection to PostgreSQL (through a proxy) is cut meanwhile. The
    rollback cannot reach the server, and the server commits the role anyway
    once the trigger is done. The lease row had gone active with the COMMIT,
    so it is queued for revocation; once the server is reachable again the
    sweeper drops the role, instead of the role living until the lease's
    expiry an hour later.
    """
    proxy = TcpProxy(dsn_port(postgres_dsn))
    broker = start_broker(write_config(tmp_path, _mount(
        via_proxy(postgres_dsn, proxy.port), prefix,
        {"app": None, "cut": [CREATE, f"INSERT INTO {slow_commit} VALUES (1)"]},
        leases='backend_timeout = "1s"\nrevoke_backoff_base = "1s"\n'
               'revoke_backoff_max = "2s"\nrevoke_max_attempts = 20')))
    try:
        assert (await asyncio.to_thread(_issue, broker, "app")).status_code == 200
        issuing = asyncio.ensure_future(asyncio.to_thread(_issue, broker, "cut"))
        await _eventually(lambda: _admin_sessions(postgres_dsn, "active", "COMMIT"), 10,
                          "the COMMIT in the trigger's sleep")
        proxy.down()
        failed = await asyncio.wait_for(issuing, 30)
        assert failed.status_code == 503, failed.text
        [lease_id] = await asyncio.to_thread(_leases, broker, "cut")
        assert broker.state is not None
        store = broker.state.store

        async def state() -> LeaseState | None:
            lease = await asyncio.to_thread(broker.call, store.get(lease_id))
            return None if lease is None else lease.state

        # Queued for revocation, not left active until its expiry.
        await _eventually(lambda: _is(state, LeaseState.REVOKING), 10, "the queued revocation")
        # The server commits the role after the trigger's 3 s sleep. Waited for, not a
        # fixed 3 s from here: the COMMIT may start up to the 1 s timeout after the
        # issue, which a loaded machine pushes late, and the check came too soon.

        async def committed() -> bool:
            return len(await pg_roles(postgres_dsn, f"{prefix}cut")) == 1

        await _eventually(committed, 15, "the cut-off COMMIT to commit the role")
        proxy.up()
        await _eventually(lambda: _is(state, LeaseState.REVOKED), 30, "the revocation")
        assert await pg_roles(postgres_dsn, f"{prefix}cut") == set()
    finally:
        proxy.up()
        await asyncio.to_thread(_stop, broker)
        await asyncio.to_thread(proxy.close)


async def _is(state: Any, wanted: LeaseState) -> bool:
    return bool(await state() is wanted)


async def test_a_commit_whose_connection_is_lost_is_settled_before_the_rollback(
        tmp_path: Path, postgres_dsn: str, prefix: str, slow_commit: str) -> None:
    """The connection breaks once the COMMIT has reached the server; its answer never comes.

    The COMMIT then runs on without the broker (a deferred trigger makes it
    sleep 3 s). Before, a COMMIT whose connection was lost counted as one the
    server had answered, so its session was not settled: the rollback waited
    on the role until the COMMIT was done, then dropped it. Now the rollback
    ends that session first, as after a timeout, and answers at once.
    """
    proxy = TcpProxy(dsn_port(postgres_dsn))
    broker = start_broker(write_config(tmp_path, _mount(
        via_proxy(postgres_dsn, proxy.port), prefix,
        {"app": None, "slowcommit": [CREATE, f"INSERT INTO {slow_commit} VALUES (1)"]})))
    try:
        proxy.cut_on = (b"COMMIT", "after")
        loop = asyncio.get_running_loop()
        started = loop.time()
        failed = await asyncio.to_thread(_issue, broker, "slowcommit")
        answered = loop.time() - started
        assert proxy.cut_on is None  # the cut happened
        assert failed.status_code == 503, failed.text
        # Settled, not waited out: the rollback ended the COMMIT's session, where
        # before its DROP waited until the COMMIT was done (the trigger's 3 s; a
        # COMMIT stuck on a synchronous standby: until the backend timeout).
        assert answered < 2.5, answered
        assert "connection was closed" in failed.json()["errors"][0]
        await _no_orphan_of_the_slow_commit(broker, postgres_dsn, prefix)
    finally:
        await asyncio.to_thread(_stop, broker)
        await asyncio.to_thread(proxy.close)
