"""Revoking a token while it is issuing a lease: that lease never goes live.

Revoking a token ends it, then queues the live leases it owns. A lease still
being issued at that moment is pending, so the queueing misses it; before the
fix it then went active and its credential (a real role or user) lived on
until its TTL, owned by a revoked token. Now the lease is activated only while
its token is active, checked in the activation's own write, so the issue
fails (403), the role or user is undone, and nothing is left.

The creation statements sleep (``SLOW`` s), and the revoke is sent once the
issue is seen in that sleep, so it lands mid-issue every time: on PostgreSQL (a staging backend: the role waits in an open
transaction) and on MySQL (created at once, before the activation), with the
lease store on SQLite and on PostgreSQL (where the check takes a share lock
on the token's row).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import requests

from broker.lease import LeaseFilter, LeaseState
from tests.integration.broker_harness import BrokerThread, start_broker, write_config
from tests.integration.store_fixtures import broker_store_url
from tests.integration.test_api_mysql_aws import mysql_connect
from tests.integration.test_issue_audit_failclosed import _leftovers

pytestmark = pytest.mark.integration

PREFIX = "v-aud-"  # _leftovers searches both servers for it
#: How long the slow roles' creation statements sleep: the window the revoke must land
#: in. It was 1 s, with the revoke sent after a fixed 0.4 s: an issue slower than 0.4 s
#: to reach its statements, or a revoke slower than 0.6 s, on a loaded machine failed
#: the test. Now the revoke goes once the issue is seen in the sleep (wait_in_flight),
#: and has SLOW s to land; the bug (the lease going live after all) shows the same.
SLOW = 3


def _mounts(postgres_dsn: str, mysql_dsn: str) -> str:
    return f"""
[mounts.pg]
plugin = "postgres"
connection_url = "{postgres_dsn}"

[mounts.pg.roles.slow]
username_template = "{PREFIX}{{{{random 8}}}}-pg"
creation_statements = [
  "CREATE ROLE \\"{{{{name}}}}\\" WITH LOGIN PASSWORD '{{{{password}}}}' VALID UNTIL '{{{{expiration}}}}'",
  "SELECT pg_sleep({SLOW})",
]

[mounts.my]
plugin = "mysql"
connection_url = "{mysql_dsn}"

[mounts.my.roles.slow]
username_template = "{PREFIX}{{{{random 8}}}}-my"
creation_statements = [
  "CREATE USER '{{{{name}}}}'@'%' IDENTIFIED BY '{{{{password}}}}'",
  "DO SLEEP({SLOW})",
]

[policies.app]
"pg/creds/slow" = ["read"]
"my/creds/slow" = ["read"]
"""


async def _sleeping(postgres_dsn: str, mysql_dsn: str, mount: str) -> bool:
    """Whether a session on mount ``mount``'s server runs the slow creation statement."""
    if mount == "pg":
        conn = await asyncpg.connect(postgres_dsn)
        try:
            # The mount sends its creation statements as one query text.
            return bool(await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                " AND application_name = 'broker:pg' AND strpos(query, $1) > 0",
                f"SELECT pg_sleep({SLOW})"))
        finally:
            await conn.close()
    url = urlsplit(mysql_dsn)
    my = await mysql_connect(mysql_dsn, url.username or "root", url.password or "")
    try:
        async with my.cursor() as cur:
            await cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                              " WHERE INSTR(INFO, %s) > 0 AND ID <> CONNECTION_ID()",
                              (f"DO SLEEP({SLOW})",))
            row = await cur.fetchone()
            return bool(row and row[0])
    finally:
        my.close()


def wait_in_flight(broker: BrokerThread, path: str, postgres_dsn: str, mysql_dsn: str) -> None:
    """Until the issue of ``path`` (``pg/creds/slow``) has its pending row and runs its
    creation statements' sleep: the moment a revoke must land in (a fixed wait was
    too short on a loaded machine)."""
    assert broker.state is not None
    store = broker.state.store
    deadline = time.monotonic() + 30
    while not (broker.call(store.list_ids(LeaseFilter(prefix=path + "/"),
                                          states=[LeaseState.PENDING]))
               and asyncio.run(_sleeping(postgres_dsn, mysql_dsn, path.split("/")[0]))):
        assert time.monotonic() < deadline, f"the issue of {path} never reached its sleep"
        time.sleep(0.05)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return broker_store_url(request, tmp_path)


def _api(broker: BrokerThread, token: str, method: str, path: str,
         body: dict[str, Any] | None = None) -> requests.Response:
    return requests.request(method, f"{broker.url}/v1/{path}", json=body,
                            headers={"X-Vault-Token": token}, timeout=60)


@pytest.mark.parametrize("path", ["pg/creds/slow", "my/creds/slow"])
def test_a_lease_being_issued_when_its_token_is_revoked_never_goes_live(
        tmp_path: Path, store_url: str, postgres_dsn: str, mysql_dsn: str, path: str) -> None:
    broker = start_broker(write_config(tmp_path, _mounts(postgres_dsn, mysql_dsn),
                                       storage_url=store_url))
    try:
        created = _api(broker, broker.root_token, "POST", "auth/token/create",
                       {"policies": ["app"], "ttl": "1h"})
        assert created.status_code == 200, created.text
        token = created.json()["auth"]["client_token"]
        answers: list[requests.Response] = []
        issuing = threading.Thread(target=lambda: answers.append(_api(broker, token, "GET",
                                                                      path)))
        issuing.start()
        wait_in_flight(broker, path, postgres_dsn, mysql_dsn)  # in its statements' sleep
        revoked = _api(broker, broker.root_token, "POST", "auth/token/revoke", {"token": token})
        assert revoked.status_code == 204, revoked.text
        issuing.join(30)
        [answer] = answers
        assert answer.status_code == 403, answer.text
        assert "revoked or expired while lease" in answer.json()["errors"][0]
        # Nothing live is left in the store, and no role or user on the server.
        live = _api(broker, broker.root_token, "LIST", f"sys/leases/lookup/{path}/")
        assert live.status_code == 404, live.text
        assert asyncio.run(_leftovers(postgres_dsn, mysql_dsn)) == []
        # The same token's issue fails at once now (403): it is dead.
        assert _api(broker, token, "GET", path).status_code == 403
    finally:
        for mount in ("pg", "my"):  # whatever went live goes (on a failure: the old bug)
            _api(broker, broker.root_token, "PUT", f"sys/leases/revoke-prefix/{mount}/",
                 {"sync": True})
        broker.stop()
