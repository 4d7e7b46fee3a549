"""A real broker on a real PostgreSQL: sub-second TTLs, and rollbacks under a short backend_timeout.

1. A duration under one second used to truncate to 0, which every TTL and
   increment reads as "the default": a client asking for a 500 ms lease got
   the role's default (an hour here). Now it is a 400 and no role is made.
2. With ``backend_timeout`` under the 10 s the rollback's "is a CREATE ROLE of
   this name under way?" check may wait, the call's timeout cancelled the
   check inside its explicit transaction, and the pool reset the connection
   with an ERROR log line ("Resetting connection with an active transaction").
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
import requests

from broker.lease import Lease, LeaseState
from tests.integration.broker_harness import (
    BrokerThread,
    drop_pg_roles,
    pg_roles,
    root_api,
    start_broker,
    write_config,
)

pytestmark = pytest.mark.integration

MOUNT = "pgr3"
#: the broker's backend_timeout, in seconds: well under the check's 10 s wait.
BACKEND_TIMEOUT = 2


class Setup:
    """The module's broker, the prefix of every role it makes, and the server's DSN."""

    def __init__(self, broker: BrokerThread, dsn: str, prefix: str) -> None:
        self.broker = broker
        self.dsn = dsn
        self.prefix = prefix
        self.api = root_api(broker)

    def roles(self) -> set[str]:
        return asyncio.run(pg_roles(self.dsn, self.prefix))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, postgres_dsn: str) -> Iterator[Setup]:
    prefix = f"r3-{secrets.token_hex(3)}-"
    body = f"""
[leases]
backend_timeout = "{BACKEND_TIMEOUT}s"

[mounts.{MOUNT}]
plugin = "postgres"
connection_url = "{postgres_dsn}"

[mounts.{MOUNT}.roles.ro]
username_template = "{prefix}{{{{random 8}}}}"
default_ttl = "1h"
max_ttl = "2h"
"""
    broker: BrokerThread | None = None
    try:
        broker = start_broker(write_config(tmp_path_factory.mktemp("pg-round3"), body))
        yield Setup(broker, postgres_dsn, prefix)
    finally:
        if broker is not None:
            requests.put(f"{broker.url}/v1/sys/leases/revoke-prefix/{MOUNT}/",
                         json={"sync": True}, headers={"X-Vault-Token": broker.root_token},
                         timeout=60)
            broker.stop()
        asyncio.run(drop_pg_roles(postgres_dsn, prefix))


def _refused(resp: requests.Response, name: str, shown: str) -> None:
    """``resp`` is a 400 whose one error names the parameter and the value."""
    assert resp.status_code == 400, resp.text
    errors = resp.json()["errors"]
    assert len(errors) == 1 and errors[0].startswith(f"{name}: "), errors
    assert "must be at least 1s" in errors[0] and shown in errors[0], errors


# -- 1. sub-second TTLs ----------------------------------------------------------------------


def test_a_sub_second_ttl_is_a_400_and_makes_no_role(setup: Setup) -> None:
    """ttl=500ms (query or body, string or number) is a 400 naming ttl and makes no role;
    ttl=0s still means the role's default TTL."""
    before = setup.roles()
    _refused(setup.api("GET", f"{MOUNT}/creds/ro", params={"ttl": "500ms"}), "ttl", "'500ms'")
    _refused(setup.api("POST", f"{MOUNT}/creds/ro", json={"ttl": 0.5}), "ttl", "0.5")
    assert setup.roles() == before
    default = setup.api("POST", f"{MOUNT}/creds/ro", json={"ttl": "0s"})
    assert default.status_code == 200, default.text
    assert default.json()["lease_duration"] == 3600


def test_fractional_ttls_truncate_to_exact_whole_seconds(setup: Setup) -> None:
    """ttl=4.1m is a 246 s lease (binary floating point made it 245 s)."""
    resp = setup.api("GET", f"{MOUNT}/creds/ro", params={"ttl": "4.1m"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["lease_duration"] == 246


def test_a_sub_second_renew_increment_or_token_ttl_is_a_400(setup: Setup) -> None:
    """increment=500ms on renew and ttl=500ms on token create are 400s, not the default."""
    issued = setup.api("GET", f"{MOUNT}/creds/ro", params={"ttl": "10m"})
    assert issued.status_code == 200, issued.text
    lease_id = issued.json()["lease_id"]
    _refused(setup.api("PUT", "sys/leases/renew",
                       json={"lease_id": lease_id, "increment": "500ms"}),
             "increment", "'500ms'")
    looked = setup.api("PUT", "sys/leases/lookup", json={"lease_id": lease_id})
    assert looked.status_code == 200 and looked.json()["data"]["ttl"] <= 600, looked.text
    _refused(setup.api("POST", "auth/token/create", json={"ttl": "500ms"}), "ttl", "'500ms'")


# -- 2. a rollback's check cut short by a short backend_timeout ------------------------------


async def _hold_create(dsn: str, name: str, lease_id: str) -> asyncpg.Connection:
    """A session with ``CREATE ROLE name`` uncommitted: an issue whose COMMIT is not in yet
    (tagged as the issue of ``lease_id`` tags its role: its rollback drops only such a role)."""
    from plugins._pg_revoke import _owner_tag

    conn = await asyncpg.connect(dsn)
    await conn.execute("BEGIN")
    await conn.execute(f'CREATE ROLE "{name}" LOGIN')
    await conn.execute(f"COMMENT ON ROLE \"{name}\" IS '{_owner_tag(lease_id)}'")
    return conn


def test_a_rollback_cut_short_by_backend_timeout_logs_no_error(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """A stale pending lease whose role is still being created elsewhere: with a 2s
    backend_timeout the rollback gives up with a WARNING (no ERROR), the row stays
    pending, and once that CREATE commits the next rollback drops the role."""
    broker = setup.broker
    assert broker.state is not None
    engine, store = broker.state.engine, broker.state.store
    name = f"{setup.prefix}held"
    now = time.time()
    lease = Lease(id=f"{MOUNT}/creds/ro/{secrets.token_hex(8)}", mount=MOUNT, role="ro",
                  owner="test", issue_time=now - 600, expire_time=now + 3000,
                  max_expire_time=now + 6600, revocation={"username": name})
    loop = asyncio.new_event_loop()
    holder: Any = None
    try:
        holder = loop.run_until_complete(_hold_create(setup.dsn, name, lease.id))
        broker.call(store.insert_pending(lease))
        caplog.set_level(logging.INFO)
        started = time.monotonic()
        assert broker.call(engine.rollback_stale_pending(older_than=0)) == 0
        assert time.monotonic() - started < BACKEND_TIMEOUT + 1.5
        pending = broker.call(store.get(lease.id))
        assert pending is not None and pending.state is LeaseState.PENDING
        # The CREATE commits after all: the retry must find its role and drop it.
        loop.run_until_complete(holder.execute("COMMIT"))
        assert name in setup.roles()
        assert broker.call(engine.rollback_stale_pending(older_than=0)) == 1
        assert broker.call(store.get(lease.id)) is None
        assert name not in setup.roles()
        # The admin connections went back to the pool clean: the mount still issues.
        assert setup.api("GET", f"{MOUNT}/creds/ro").status_code == 200
    finally:
        if holder is not None:
            loop.run_until_complete(holder.close())
        loop.close()
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records
              if r.levelno >= logging.ERROR]
    assert errors == []
    assert any(f"rollback of {lease.id} failed" in r.getMessage() for r in caplog.records)


def test_the_created_meanwhile_probe_quotes_any_role_name(postgres_dsn: str) -> None:
    """The probe's DO block is dollar-quoted: a name holding the tag stays a name.

    With a fixed ``$broker$`` tag such a name ended the block early: the probe
    failed with a syntax error and took an existing role as absent, and the
    rest of the name was parsed as SQL.
    """
    from plugins._pg_revoke import _created_meanwhile

    tagged = f"t$broker$-{secrets.token_hex(3)}"
    victim = f"inj_{secrets.token_hex(3)}"
    injected = f"x$broker$; CREATE ROLE {victim}; DO $broker$ BEGIN"

    async def probe() -> tuple[bool, bool, set[str]]:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f'CREATE ROLE "{tagged}" NOLOGIN')
            exists = await _created_meanwhile(conn, tagged)
            absent = await _created_meanwhile(conn, injected, f"plain-{victim}")
            rows = await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1",
                                    f"%{victim}%")
            return exists, absent, {r["rolname"] for r in rows}
        finally:
            await conn.execute(f'DROP ROLE IF EXISTS "{tagged}"')
            await conn.close()

    exists, absent, roles = asyncio.run(probe())
    assert exists is True  # the role is there: the probe's CREATE ROLE ran and collided
    assert absent is False
    assert roles == set()  # nothing created, not even through a broken quote
