"""Revoking a token ends it and queues its leases in one store write.

Before, the broker ended the token in one write and queued its leases in the
next. A crash (or a store error) between the two left the token revoked and
its leases live: real roles, owned by a revoked token, until their TTL, and
no way to revoke them through the token again (it was already ended).

Here the second half is made to fail inside the real store, by a trigger
that refuses to move a lease to ``revoking``. The revoke must then fail as a
whole: the token is still active, so the operator's retry does the whole job
once the store works again. On the old code the token was revoked and the
lease stayed active; the retry queued nothing.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import requests

from tests.integration.broker_harness import BrokerThread, start_broker, write_config
from tests.integration.store_fixtures import broker_store_url

pytestmark = pytest.mark.integration

PREFIX = "v-tend-"

_SQLITE_TRIGGER = (
    "CREATE TRIGGER refuse_queue BEFORE UPDATE OF state ON leases"
    " WHEN NEW.state = 'revoking' BEGIN SELECT RAISE(ABORT, 'injected: queue refused'); END"
)
_PG_TRIGGER = [
    "CREATE FUNCTION refuse_queue() RETURNS trigger LANGUAGE plpgsql AS"
    " $$BEGIN RAISE EXCEPTION 'injected: queue refused'; END$$",
    "CREATE TRIGGER refuse_queue BEFORE UPDATE ON leases FOR EACH ROW"
    " WHEN (NEW.state = 'revoking') EXECUTE FUNCTION refuse_queue()",
]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return broker_store_url(request, tmp_path)


def _store_sql(store_url: str, statements: list[str]) -> None:
    """Run ``statements`` on the broker's own store, beside the running broker."""
    if store_url.startswith("sqlite:///"):
        conn = sqlite3.connect(store_url.removeprefix("sqlite:///"), timeout=10)
        try:
            for sql in statements:
                conn.execute(sql)
            conn.commit()
        finally:
            conn.close()
        return

    async def run() -> None:
        pg = await asyncpg.connect(store_url)
        try:
            for sql in statements:
                await pg.execute(sql)
        finally:
            await pg.close()

    asyncio.run(run())


def _drop_trigger(store_url: str) -> None:
    on = "" if store_url.startswith("sqlite") else " ON leases"
    _store_sql(store_url, [f"DROP TRIGGER IF EXISTS refuse_queue{on}"])


async def _roles(postgres_dsn: str) -> list[str]:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        return [r[0] for r in await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE $1", PREFIX + "%")]
    finally:
        await conn.close()


def _api(broker: BrokerThread, token: str, method: str, path: str,
         body: dict[str, Any] | None = None) -> requests.Response:
    return requests.request(method, f"{broker.url}/v1/{path}", json=body,
                            headers={"X-Vault-Token": token}, timeout=60)


def _lease_state(broker: BrokerThread, lease_id: str) -> str:
    got = _api(broker, broker.root_token, "PUT", "sys/leases/lookup", {"lease_id": lease_id})
    if got.status_code == 400 and f"{lease_id} is revoked;" in got.text:
        return "revoked"  # a lookup of an ended lease is refused, naming its state
    assert got.status_code == 200, got.text
    return str(got.json()["data"]["state"])


def test_a_revoke_whose_lease_queueing_fails_leaves_the_token_active(
        tmp_path: Path, store_url: str, postgres_dsn: str) -> None:
    body = f"""
[mounts.pg]
plugin = "postgres"
connection_url = "{postgres_dsn}"

[mounts.pg.roles.ro]
username_template = "{PREFIX}{{{{random 8}}}}"
creation_statements = [
  "CREATE ROLE \\"{{{{name}}}}\\" WITH LOGIN PASSWORD '{{{{password}}}}' VALID UNTIL '{{{{expiration}}}}'",
]

[policies.app]
"pg/creds/ro" = ["read"]
"""
    broker = start_broker(write_config(tmp_path, body, storage_url=store_url))
    try:
        created = _api(broker, broker.root_token, "POST", "auth/token/create",
                       {"policies": ["app"], "ttl": "1h"})
        assert created.status_code == 200, created.text
        auth = created.json()["auth"]
        issued = _api(broker, auth["client_token"], "GET", "pg/creds/ro")
        assert issued.status_code == 200, issued.text
        lease_id = issued.json()["lease_id"]
        assert len(asyncio.run(_roles(postgres_dsn))) == 1

        _store_sql(store_url, [_SQLITE_TRIGGER] if store_url.startswith("sqlite") else _PG_TRIGGER)
        failed = _api(broker, broker.root_token, "POST", "auth/token/revoke-accessor",
                      {"accessor": auth["accessor"]})
        assert failed.status_code >= 500, failed.text
        assert "injected" not in failed.text  # store internals stay out of the answer
        # Nothing was half done: the token still works, its lease is still active.
        assert _api(broker, auth["client_token"], "GET", "auth/token/lookup-self").status_code \
            == 200
        assert _lease_state(broker, lease_id) == "active"

        _drop_trigger(store_url)
        retried = _api(broker, broker.root_token, "POST", "auth/token/revoke-accessor",
                       {"accessor": auth["accessor"]})
        assert retried.status_code == 204, retried.text
        assert _api(broker, auth["client_token"], "GET", "auth/token/lookup-self").status_code \
            == 403
        for _ in range(100):  # the sweeper revokes it within moments
            if _lease_state(broker, lease_id) == "revoked":
                break
            time.sleep(0.1)
        assert _lease_state(broker, lease_id) == "revoked"
        assert asyncio.run(_roles(postgres_dsn)) == []
    finally:
        _drop_trigger(store_url)  # a failed assertion must not leave the role behind
        _api(broker, broker.root_token, "PUT", "sys/leases/revoke-prefix/pg/", {"sync": True})
        broker.stop()
