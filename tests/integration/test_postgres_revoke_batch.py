"""Batch revocation against a real PostgreSQL, through a real broker state.

A broker (``server.build_state``: SQLite store, audit log, engine, sweeper)
with a postgres mount on the test server. Leases are issued through the
engine (real roles), made due at one instant, and the sweeper is started:
they are claimed together and revoked in one ``delete_users`` call, which the
mount's call statistics (``/v1/sys/metrics``) show.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker import server
from broker.bench.seed import set_due
from broker.config import load_config
from broker.lease import LeaseState
from broker.state import BrokerState
from tests.conformance.harnesses import PostgresHarness
from tests.integration.broker_harness import write_config
from tests.integration.db_fixtures import harness_up
from tests.integration.store_fixtures import make_token

pytestmark = pytest.mark.integration


@pytest.fixture
async def harness(postgres_dsn: str) -> AsyncIterator[PostgresHarness]:
    """The conformance harness on the test server (a schema of its own, a superuser admin)."""
    async with harness_up(PostgresHarness, postgres_dsn) as h:
        yield h


class PgBroker:
    """A broker state with one postgres mount; its mounts are up, its sweeper not yet."""

    def __init__(self, harness: PostgresHarness, state: BrokerState) -> None:
        self.harness = harness
        self.state = state
        self.mount = harness.mount_name
        self.token = make_token("acc-batch", expire_time=None)

    async def issue(self, role: str, n: int) -> list[tuple[str, dict[str, Any]]]:
        """``n`` leases of ``role``: (lease id, credentials)."""
        out = []
        for _ in range(n):
            issued = await self.state.engine.issue(self.mount, role, token=self.token)
            out.append((issued.lease.id, dict(issued.data)))
        return out

    async def expire_all_and_sweep(self, count: int, timeout: float = 30) -> None:
        """Make every lease due now, start the sweeper, wait until ``count`` have ended."""
        await set_due(self.state.config.storage.url, f"{self.mount}/", time.time())
        self.state.sweeper.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = await self.state.store.count_by_state()
            if sum(counts.get(s, 0) for s in ("expired", "irrevocable")) >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"not all ended: {await self.state.store.count_by_state()}")

    async def state_of(self, lease_id: str) -> LeaseState:
        lease = await self.state.store.get(lease_id)
        assert lease is not None
        return lease.state

    async def assert_expired_and_dropped(
        self, leases: Sequence[tuple[str, dict[str, Any]]]
    ) -> None:
        """Each of ``leases`` (as :meth:`issue` returns them) ended EXPIRED, its role gone."""
        for lease_id, creds in leases:
            assert await self.state_of(lease_id) is LeaseState.EXPIRED
            assert not await self.harness.user_exists(creds["username"])

    def calls(self, op: str) -> int:
        stats = self.state.engine.mounts[self.mount].stats.get(op)
        return stats.calls if stats else 0

    def audit(self) -> list[dict[str, Any]]:
        with open(self.state.config.audit.path) as f:
            return [json.loads(line) for line in f if line.strip()]


ROLES = """
[mounts.{mount}.roles.r]
creation_statements = [
  "CREATE ROLE \\"{{{{name}}}}\\" WITH LOGIN PASSWORD '{{{{password}}}}' VALID UNTIL '{{{{expiration}}}}'",
  "GRANT USAGE, CREATE ON SCHEMA \\"{schema}\\" TO \\"{{{{name}}}}\\"",
]

[mounts.{mount}.roles.custom]
revocation_statements = [
  "INSERT INTO \\"{schema}\\".revoked VALUES ('{{{{name}}}}')",
  "DROP ROLE IF EXISTS \\"{{{{name}}}}\\"",
]
"""


@pytest.fixture
async def pg_broker(harness: PostgresHarness, tmp_path: Path) -> AsyncIterator[PgBroker]:
    mount = harness.make_mount()
    secret_line = ""
    if mount.secret:
        (tmp_path / "pg-admin").write_text(mount.secret)
        secret_line = f'password_file = "{tmp_path / "pg-admin"}"'
    body = f"""
[mounts.{mount.name}]
plugin = "postgres"
connection_url = "{mount.options['connection_url']}"
max_open_connections = 4
{secret_line}
""" + ROLES.format(mount=mount.name, schema=harness.schema)
    await harness.admin.execute(f'CREATE TABLE "{harness.schema}".revoked (name text)')
    state = await server.build_state(load_config(write_config(tmp_path, body)))
    await state.engine.start_mounts()
    try:
        broker = PgBroker(harness, state)
        # A lease goes live only while its token is active in the store.
        await state.store.insert_token(broker.token)
        yield broker
    finally:
        await server.stop(state, 5.0)


async def sessions(harness: PostgresHarness, creds: Sequence[dict[str, Any]]
                   ) -> list[asyncpg.Connection]:
    out = [await harness.connect_as(c) for c in creds]
    await out[0].execute("BEGIN; SELECT 1")  # one idle in a transaction
    return out


async def test_a_batch_of_roles_with_sessions_is_revoked_in_one_call(
    pg_broker: PgBroker,
) -> None:
    """Six due leases of a default-statement role, each with an open session and
    one owning a table: one delete_users call ends them all; roles gone,
    sessions dead, the table kept and handed to the admin, each audited."""
    harness = pg_broker.harness
    leases = await pg_broker.issue("r", 6)
    open_ = await sessions(harness, [creds for _, creds in leases])
    table = f'"{harness.schema}".made_by_lease'
    await open_[1].execute(f"CREATE TABLE {table} (x int); INSERT INTO {table} VALUES (7)")

    await pg_broker.expire_all_and_sweep(6)

    assert pg_broker.calls("delete_users") == 1
    assert pg_broker.calls("delete_user") == 0
    await pg_broker.assert_expired_and_dropped(leases)
    for session in open_:
        assert not await harness.session_alive(session)
        await harness.close_session(session)
    owner = await harness.admin.fetchval(
        "SELECT tableowner FROM pg_tables WHERE schemaname = $1 AND tablename = 'made_by_lease'",
        harness.schema)
    assert owner == harness.admin_user
    assert await harness.admin.fetchval(f"SELECT x FROM {table}") == 7
    expired = [e["lease"]["id"] for e in pg_broker.audit() if e["type"] == "expire"]
    assert sorted(expired) == sorted(lease_id for lease_id, _ in leases)


async def test_one_failing_role_does_not_fail_the_others(
    pg_broker: PgBroker, postgres_dsn: str,
) -> None:
    """One role of the batch holds a privilege in another database that accepts no
    connections, so DROP ROLE fails for it: the batch falls back to one
    revocation per role; the others are revoked and recorded, the bad one is
    recorded as failed (redacted)."""
    harness = pg_broker.harness
    leases = await pg_broker.issue("r", 4)
    bad_id, bad = leases[2]
    other_db = f"broker_batch_{secrets.token_hex(3)}"
    await harness.admin.execute(f'CREATE DATABASE "{other_db}"')
    try:
        other = await asyncpg.connect(harness.dsn.rsplit("/", 1)[0] + f"/{other_db}")
        try:
            await other.execute(f'CREATE TABLE t (x int); GRANT SELECT ON t TO "{bad["username"]}"')
        finally:
            await other.close()
        # The plugin cleans up other databases too, but cannot enter this one.
        await harness.admin.execute(f'ALTER DATABASE "{other_db}" ALLOW_CONNECTIONS false')

        await pg_broker.expire_all_and_sweep(4)

        assert pg_broker.calls("delete_users") == 1
        await pg_broker.assert_expired_and_dropped([lease for lease in leases
                                                    if lease[0] != bad_id])
        failed = await pg_broker.state.store.get(bad_id)
        assert failed is not None and failed.state is LeaseState.IRREVOCABLE
        assert failed.revoke_attempts == 1 and "SQLSTATE 2BP01" in (failed.last_error or "")
        assert f'"{other_db}" accept no connections' in (failed.last_error or "")
        assert await harness.user_exists(bad["username"])
        # NOLOGIN committed all the same: the credential is dead although the role is not.
        assert not await harness.admin.fetchval(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", bad["username"])
        events = {e["lease"]["id"]: e for e in pg_broker.audit() if "lease" in e}
        assert events[bad_id]["type"] == "irrevocable"
        assert {events[i]["type"] for i, _ in leases if i != bad_id} == {"expire"}
        assert bad["password"] not in json.dumps(events[bad_id])
    finally:
        await harness.admin.execute(f'DROP DATABASE IF EXISTS "{other_db}"')


async def test_custom_revocation_statements_take_the_per_lease_path(
    pg_broker: PgBroker,
) -> None:
    """A batch mixing default and custom-statement roles: one delete_users call;
    the custom statements run for each custom role (the batch protocol would not
    run them), the default roles are dropped."""
    harness = pg_broker.harness
    default = await pg_broker.issue("r", 2)
    custom = await pg_broker.issue("custom", 2)
    open_ = await sessions(harness, [creds for _, creds in custom])

    await pg_broker.expire_all_and_sweep(4)

    assert pg_broker.calls("delete_users") == 1
    logged = await harness.admin.fetch(f'SELECT name FROM "{harness.schema}".revoked')
    assert sorted(r["name"] for r in logged) == sorted(c["username"] for _, c in custom)
    await pg_broker.assert_expired_and_dropped(default + custom)
    for session in open_:  # custom statements still come after the sessions are ended
        assert not await harness.session_alive(session)
        await harness.close_session(session)


async def test_a_role_already_dropped_counts_as_revoked(pg_broker: PgBroker) -> None:
    """A role dropped behind the broker's back is revoked as far as the batch goes:
    its lease ends like the others, in the same call."""
    harness = pg_broker.harness
    leases = await pg_broker.issue("r", 3)
    await harness.drop_role(leases[0][1]["username"])

    await pg_broker.expire_all_and_sweep(3)

    assert pg_broker.calls("delete_users") == 1
    assert pg_broker.calls("delete_user") == 0
    await pg_broker.assert_expired_and_dropped(leases)
    assert [e["type"] for e in pg_broker.audit() if "lease" in e].count("expire") == 3


async def test_a_batch_of_roles_all_gone_is_revoked(pg_broker: PgBroker) -> None:
    """Every role of the batch is already gone: nothing to do, all leases end."""
    harness = pg_broker.harness
    leases = await pg_broker.issue("r", 2)
    for _, creds in leases:
        await harness.drop_role(creds["username"])
    await pg_broker.expire_all_and_sweep(2)
    assert pg_broker.calls("delete_users") == 1
    for lease_id, _ in leases:
        assert await pg_broker.state_of(lease_id) is LeaseState.EXPIRED
