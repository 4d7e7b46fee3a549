"""Revoking a token while it is issuing a lease: that lease never goes live.

Revoking a token ends it, then queues the live leases it owns. A lease still
being issued at that moment is pending, so the queueing misses it; before the
fix it then went active and its credential (a real role or user) lived on
until its TTL, owned by a revoked token. Now the lease is activated only while
its token is active, checked in the activation's own write, so the issue
fails (403), the role or user is undone, and nothing is left.

The creation statements sleep (``token_fixtures.SLOW`` s), and the revoke is
sent once the issue is seen in that sleep, so it lands mid-issue every time: on
PostgreSQL (a staging backend: the role waits in an open transaction) and on
MySQL (created at once, before the activation), with the lease store on SQLite
and on PostgreSQL (where the check takes a share lock on the token's row). The
sleep is recognised by a marker unique to the test (``SlowRoles.marker``), not
by any ``pg_sleep(3)`` on the shared servers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.broker_harness import BrokerThread, start_broker, write_config
from tests.integration.store_fixtures import broker_store_url
from tests.integration.test_issue_audit_failclosed import _leftovers
from tests.integration.token_fixtures import SlowRoles

pytestmark = pytest.mark.integration

PREFIX = "v-aud-"  # _leftovers searches both servers for it

#: What the slow roles (token_fixtures.SlowRoles) are read with.
POLICY = """
[policies.app]
"pg/creds/slow" = ["read"]
"my/creds/slow" = ["read"]
"""


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
    slow = SlowRoles(postgres_dsn, mysql_dsn, PREFIX)
    broker = start_broker(write_config(tmp_path, slow.mounts() + POLICY, storage_url=store_url))
    try:
        created = _api(broker, broker.root_token, "POST", "auth/token/create",
                       {"policies": ["app"], "ttl": "1h"})
        assert created.status_code == 200, created.text
        token = created.json()["auth"]["client_token"]
        issued = slow.start_issue(broker, path, token)  # back once in its statements' sleep
        revoked = _api(broker, broker.root_token, "POST", "auth/token/revoke", {"token": token})
        assert revoked.status_code == 204, revoked.text
        answer = issued()
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
