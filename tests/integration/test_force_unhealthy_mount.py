"""A forced revocation of a lease whose mount is unhealthy, against a real broker and PostgreSQL.

``revoke-force`` is the break-glass for a backend that is gone: it used to call
the backend all the same, and against one that hangs waited ``backend_timeout``
per lease before ending it. A mount already known to be unhealthy is not called.
(The sweeper still leaves the lease ``FORCE_TAKEOVER`` seconds to a replica that
may have the mount healthy, as for a mount it lacks.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
import requests

from broker.lease import LeaseState
from broker.store.base import FORCE_TAKEOVER
from tests.integration import ops_fixtures
from tests.integration.broker_harness import (
    ROOT_TOKEN,
    TcpProxy,
    dsn_port,
    start_broker,
    via_proxy,
    write_config,
)
from tests.integration.ops_fixtures import mount_health, pg_mount, pg_role_prefix, wait_for

pytestmark = pytest.mark.integration

#: the hung mount's calls time out after this (s): the old code's forced revoke waited it,
#: after FORCE_TAKEOVER.
BACKEND_TIMEOUT = 8

blackhole = ops_fixtures.blackhole
quick_probe = ops_fixtures.quick_probe


@pytest.fixture
def template(postgres_dsn: str) -> Iterator[str]:
    with pg_role_prefix(postgres_dsn, "v-fu") as name:
        yield name


def test_a_forced_revoke_of_a_hung_mounts_lease_ends_it_without_calling_the_backend(
        tmp_path: Path, postgres_dsn: str, blackhole: int, template: str,
        quick_probe: None) -> None:
    """The mount's backend hangs (seen unhealthy): ``revoke-force`` with ``sync`` ends its
    lease after ``FORCE_TAKEOVER`` without waiting ``backend_timeout`` on top (it took
    more than 13 s), audited as forced,
    ``backend_revoked: false``, naming why the backend was not called."""
    proxy = TcpProxy(dsn_port(postgres_dsn))
    config = f'[leases]\nbackend_timeout = "{BACKEND_TIMEOUT}s"\n' + pg_mount(
        "hung", via_proxy(postgres_dsn, proxy.port), template)
    server = start_broker(write_config(tmp_path, config))
    try:
        assert server.state is not None
        client = hvac.Client(url=server.url, token=ROOT_TOKEN, timeout=30)
        lease_id = client.read("hung/creds/app")["lease_id"]
        proxy.down()
        proxy.target_port = blackhole
        proxy.up()
        wait_for("hung unhealthy", lambda: not mount_health(server, "hung")["healthy"],
                 BACKEND_TIMEOUT + 4)

        started = time.monotonic()
        resp = requests.put(f"{server.url}/v1/sys/leases/revoke-force/hung/",
                            headers={"X-Vault-Token": ROOT_TOKEN}, json={"sync": True},
                            timeout=60)
        took = time.monotonic() - started
        assert resp.status_code in (200, 204), resp.text
        assert took < FORCE_TAKEOVER + 2.5, f"the forced revoke took {took:.1f}s"
        lease = server.call(server.state.store.get(lease_id))
        assert lease is not None and lease.state is LeaseState.REVOKED, lease
        stats = server.state.engine.mounts["hung"].stats
        assert "delete_user" not in stats and "delete_users" not in stats, stats
        lines = [json.loads(line) for line in Path(server.audit_path).read_text().splitlines()]
        forced = [ev for ev in lines if ev.get("action") == "revoke_force"
                  and ev.get("lease", {}).get("id") == lease_id]
        assert len(forced) == 1, forced
        assert forced[0]["outcome"] == "forced" and forced[0]["backend_revoked"] is False
        assert "the backend was not called" in forced[0]["error"], forced[0]
    finally:
        server.stop()
        proxy.close()
