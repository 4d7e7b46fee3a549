"""A revocation's audit line is written before its ending is committed to the store.

Before, the ending was committed first and the line written after it: a
``kill -9`` between the two left a lease ended in the store that no audit line
ever showed (nobody revokes it again, so nobody audits it again; up to
``RECORD_BATCH`` x ``RECORD_WRITES`` endings could be in that window, and
``broker audit verify`` cannot see a line that was never written). Now the line
comes first: a crash after it leaves the lease claimed, and whoever takes the
claim over revokes it again (idempotently) and writes another line, so the
audit log may repeat an ending but never miss one.

The test holds the ending's commit (a row lock on the lease in the PostgreSQL
store) after the backend has dropped the role, and checks that the line is in
the file while the store still has the lease unended, i.e. where a crash
would leave it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import requests

from tests.integration.broker_harness import (
    BrokerThread,
    drop_pg_roles,
    pg_execute,
    pg_roles,
    start_broker,
    write_config,
)
from tests.integration.store_fixtures import fresh_postgres_database
from tests.integration.token_fixtures import audit_events

pytestmark = pytest.mark.integration

MOUNT = "pgorder"
#: how long the test waits for each step (generous: nothing here should take > 1 s).
WAIT = 30.0


class Setup:
    def __init__(self, broker: BrokerThread, dsn: str, store_dsn: str, prefix: str) -> None:
        self.broker = broker
        self.dsn = dsn
        self.store_dsn = store_dsn
        self.prefix = prefix
        self.gate = f'"{prefix}gate"'

    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        return requests.request(method, f"{self.broker.url}/v1/{path}",
                                headers={"X-Vault-Token": self.broker.root_token},
                                timeout=60, **kw)


@pytest.fixture
def setup(tmp_path: Path, postgres_dsn: str, request: pytest.FixtureRequest) -> Iterator[Setup]:
    prefix = f"v-order-{secrets.token_hex(3)}-"
    store_dsn = asyncio.run(fresh_postgres_database(request))
    asyncio.run(pg_execute(postgres_dsn, f'CREATE TABLE "{prefix}gate" (id int)'))
    create = r"""CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}'"""
    # The revocation waits for the gate the test holds: the test can see it in flight.
    gate = rf"LOCK TABLE \"{prefix}gate\" IN SHARE MODE"
    drop = r"""DROP ROLE \"{{name}}\""""
    body = f"""
[mounts.{MOUNT}]
plugin = "postgres"
connection_url = "{postgres_dsn}"

[mounts.{MOUNT}.roles.r]
username_template = "{prefix}{{{{random 8}}}}"
default_ttl = "1h"
creation_statements = ["{create}"]
revocation_statements = ["{gate}", "{drop}"]
"""
    broker: BrokerThread | None = None
    try:
        broker = start_broker(write_config(tmp_path, body, storage_url=store_dsn))
        yield Setup(broker, postgres_dsn, store_dsn, prefix)
    finally:
        if broker is not None:
            broker.stop()
        asyncio.run(pg_execute(postgres_dsn, f'DROP TABLE IF EXISTS "{prefix}gate"'))
        asyncio.run(drop_pg_roles(postgres_dsn, prefix))


async def _until(check: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if got := await check():
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {WAIT}s: {what}")


def _revoke_lines(s: Setup, lease_id: str) -> list[dict[str, Any]]:
    return [e for e in audit_events(s.broker, "revoke") if e["lease"]["id"] == lease_id]


def test_the_revoke_line_is_written_before_the_ending_is_committed(setup: Setup) -> None:
    s = setup
    resp = s.api("GET", f"{MOUNT}/creds/r")
    assert resp.status_code == 200, resp.text
    lease_id, username = resp.json()["lease_id"], resp.json()["data"]["username"]

    async def scenario() -> None:
        gate = await asyncpg.connect(s.dsn)
        watcher = await asyncpg.connect(s.dsn)  # a superuser sees other roles' queries
        store = await asyncpg.connect(s.store_dsn)
        try:
            gate_tx = gate.transaction()
            await gate_tx.start()
            await gate.execute(f"LOCK TABLE {s.gate} IN EXCLUSIVE MODE")
            answer = await asyncio.to_thread(
                s.api, "PUT", "sys/leases/revoke", json={"lease_id": lease_id, "sync": False})
            assert answer.status_code in (202, 204), answer.text

            async def revocation_waits_at_the_gate() -> bool:
                # Not on ``gate``: inside a transaction pg_stat_activity is a snapshot.
                return bool(await watcher.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND strpos(query, $1) > 0", f"{s.prefix}gate"))

            await _until(revocation_waits_at_the_gate, "the revocation waiting at the gate")
            # Claimed and in the backend: hold the ending's commit, then let the backend go.
            store_tx = store.transaction()
            await store_tx.start()
            await store.execute("SELECT 1 FROM leases WHERE id = $1 FOR UPDATE", lease_id)
            await gate_tx.rollback()

            async def role_gone() -> bool:
                return username not in await pg_roles(s.dsn, s.prefix)

            await _until(role_gone, "the backend dropping the role")

            async def line_written() -> bool:
                return bool(_revoke_lines(s, lease_id))

            await _until(line_written, "the revoke line, while the ending's commit waits")
            # The point of the test: the store has not ended the lease yet (its commit is
            # held), so a crash now would leave it to be revoked and audited again.
            reader = await asyncpg.connect(s.store_dsn)
            try:
                assert await reader.fetchval(
                    "SELECT state FROM leases WHERE id = $1", lease_id) == "revoking"
            finally:
                await reader.close()
            await store_tx.rollback()

            async def ended() -> bool:
                return await store.fetchval(
                    "SELECT state FROM leases WHERE id = $1", lease_id) == "revoked"

            await _until(ended, "the ending committed once the row lock is gone")
        finally:
            await gate.close()
            await watcher.close()
            await store.close()

    asyncio.run(scenario())
    assert len(_revoke_lines(s, lease_id)) == 1
