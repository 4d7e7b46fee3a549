"""An issue cut off by ``backend_timeout`` while its creation statement runs on the server.

Before, the broker dropped the connection (asyncpg's ``terminate()``), which
closes the socket but leaves the statement running on the server: the session
stayed ``active`` inside the staged transaction, still holding its locks (the
mount's DDL advisory lock among them), so other issues on the mount timed out
too, and the client's answer came only when the statement ended (the issue's
rollback waits for the staged role's creation to end). Now the broker ends
that session server-side, in the background, and answers at ``backend_timeout``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

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

pytestmark = pytest.mark.integration

#: the mount's backend_timeout, in seconds.
BACKEND_TIMEOUT = 2
#: how late after backend_timeout the 503 may come. 3 s, not 1.5 s: a loaded machine
#: took longer. The failures stay far off: a blocked issue that is not cut off waits for
#: ever, the sleepy one 10 s (BACKEND_TIMEOUT + MARGIN + GONE_WITHIN stays below those
#: 10 s, so its pg_sleep cannot end by itself within the check).
MARGIN = 3
#: how soon after the 503 the cut-off statement must be gone from the server (was 2 s).
GONE_WITHIN = 4
MOUNT = "pgcut"
#: a creation statement, as a TOML string body.
CREATE = r"""CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'"""


class Setup:
    """The test's broker, its unique prefix and the tables its roles use."""

    def __init__(self, broker: BrokerThread, dsn: str, prefix: str) -> None:
        self.broker = broker
        self.dsn = dsn
        self.prefix = prefix
        self.locked = f"{prefix}locked"  # the outside blocker locks it
        self.table = f"{prefix}t"  # the normal role is granted SELECT on it

    def issue(self, role: str) -> tuple[requests.Response, float]:
        """GET creds of ``role``: the response and how long it took."""
        started = time.monotonic()
        resp = requests.get(f"{self.broker.url}/v1/{MOUNT}/creds/{role}",
                            headers={"X-Vault-Token": self.broker.root_token}, timeout=60)
        return resp, time.monotonic() - started


@pytest.fixture
def setup(tmp_path: Path, postgres_dsn: str) -> Iterator[Setup]:
    prefix = f"pgcut-{secrets.token_hex(3)}-"
    locked, table = f'"{prefix}locked"', f'"{prefix}t"'
    asyncio.run(pg_execute(postgres_dsn, f"CREATE TABLE {locked} (id int)",
                           f"CREATE TABLE {table} (id int)"))
    # GRANT ... ON: both roles take the mount's DDL advisory lock (serialize_ddl "auto").
    grant = rf"GRANT SELECT ON \"{prefix}t\" TO \"{{{{name}}}}\""
    roles = {
        "blocked": [CREATE, grant, rf"LOCK TABLE \"{prefix}locked\" IN SHARE MODE"],
        "sleepy": [CREATE, "SELECT pg_sleep(10)"],
        "normal": [CREATE, grant],
    }
    body = [f"""
[leases]
backend_timeout = "{BACKEND_TIMEOUT}s"

[mounts.{MOUNT}]
plugin = "postgres"
connection_url = "{postgres_dsn}"
max_open_connections = 2
"""]
    for name, statements in roles.items():
        quoted = ", ".join(f'"{s}"' for s in statements)
        body.append(f"""
[mounts.{MOUNT}.roles.{name}]
username_template = "{prefix}{name}-{{{{random 8}}}}"
default_ttl = "1h"
creation_statements = [{quoted}]
""")
    broker: BrokerThread | None = None
    try:
        broker = start_broker(write_config(tmp_path, "".join(body)))
        yield Setup(broker, postgres_dsn, prefix)
    finally:
        if broker is not None:
            requests.put(f"{broker.url}/v1/sys/leases/revoke-prefix/{MOUNT}/",
                         json={"sync": True}, headers={"X-Vault-Token": broker.root_token},
                         timeout=60)
            broker.stop()
        # Dropping the tables drops the roles' grants on them.
        asyncio.run(pg_execute(postgres_dsn, f"DROP TABLE IF EXISTS {locked}, {table}"))
        asyncio.run(drop_pg_roles(postgres_dsn, prefix))


async def _running(dsn: str, needle: str) -> list[str]:
    """Queries of the mount's admin sessions not idle and running a statement with ``needle``."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT state FROM pg_stat_activity WHERE application_name = $1"
            " AND state <> 'idle' AND strpos(query, $2) > 0", f"broker:{MOUNT}", needle)
        return [r["state"] for r in rows]
    finally:
        await conn.close()


async def _gone(dsn: str, needle: str, within: float) -> bool:
    """Whether no session of the mount runs ``needle`` within ``within`` seconds."""
    deadline = time.monotonic() + within
    while await _running(dsn, needle):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def test_an_issue_cut_off_behind_a_lock_ends_its_session_and_frees_the_mount(
        setup: Setup) -> None:
    """503 at backend_timeout, the server session ends, and the mount issues meanwhile."""

    async def scenario() -> None:
        blocker = await asyncpg.connect(setup.dsn)
        try:
            async with blocker.transaction():
                await blocker.execute(f'LOCK TABLE "{setup.locked}" IN ACCESS EXCLUSIVE MODE')
                resp, took = await asyncio.to_thread(setup.issue, "blocked")
                assert resp.status_code == 503, resp.text
                assert took < BACKEND_TIMEOUT + MARGIN, took
                # Its statement no longer runs (nor holds the DDL advisory lock).
                assert await _gone(setup.dsn, setup.locked, within=GONE_WITHIN), \
                    await _running(setup.dsn, setup.locked)
                # Another issue that takes the same advisory lock goes through,
                # while the blocker still holds its table.
                resp, took = await asyncio.to_thread(setup.issue, "normal")
                assert resp.status_code == 200, resp.text
                assert took < BACKEND_TIMEOUT, took
        finally:
            await blocker.close()
        assert await pg_roles(setup.dsn, f"{setup.prefix}blocked") == set()
        assert len(await pg_roles(setup.dsn, f"{setup.prefix}normal")) == 1

    asyncio.run(scenario())


def test_an_issue_cut_off_mid_sleep_answers_at_backend_timeout(setup: Setup) -> None:
    """A creation statement still running past backend_timeout: 503 then, its session ended."""
    resp, took = setup.issue("sleepy")
    assert resp.status_code == 503, resp.text
    assert took < BACKEND_TIMEOUT + MARGIN, took
    assert asyncio.run(_gone(setup.dsn, "pg_sleep(10)", within=GONE_WITHIN))
    assert asyncio.run(pg_roles(setup.dsn, f"{setup.prefix}sleepy")) == set()
