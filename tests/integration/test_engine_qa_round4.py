"""QA round 4 of the lease engine: a reload that lowers a role's ``max_ttl`` caps live leases.

A lease issued under ``max_ttl = 24h`` kept renewing up to 24 h after a SIGHUP
had lowered the role to a shorter ``max_ttl``: the engine only looked at the
max expiry written at issue. Vault re-reads the role's (and the mount's) max
TTL on every renewal (``framework.CalculateTTL``, counted from the lease's
issue time); so does the broker now, with a warning when the cap cuts the
renewal short. Real broker, real PostgreSQL backend; the reload is
``broker.server.reload``, what the SIGHUP handler runs, on a rewritten config
file.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import hvac
import hvac.exceptions
import pytest
import requests

from broker.server import reload
from tests.integration.broker_harness import BrokerThread, start_broker, write_config

pytestmark = pytest.mark.integration

MOUNT = "pgr4"


def pg_body(dsn: str, *, default_ttl: str, max_ttl: str) -> str:
    return f"""
[mounts.{MOUNT}]
plugin = "postgres"
connection_url = "{dsn}"

[mounts.{MOUNT}.roles.app]
creation_statements = [
  "CREATE ROLE \\"{{{{name}}}}\\" WITH LOGIN PASSWORD '{{{{password}}}}' VALID UNTIL '{{{{expiration}}}}'",
]
default_ttl = "{default_ttl}"
max_ttl = "{max_ttl}"
"""


@pytest.fixture
def broker(tmp_path: Path, postgres_dsn: str) -> Iterator[tuple[BrokerThread, Path]]:
    path = write_config(tmp_path, pg_body(postgres_dsn, default_ttl="1h", max_ttl="24h"))
    server = start_broker(path)
    yield server, path
    # Leave no role behind on the shared server.
    requests.put(f"{server.url}/v1/sys/leases/revoke-prefix/{MOUNT}/", json={"sync": True},
                 headers={"X-Vault-Token": server.root_token}, timeout=60)
    server.stop()


def reconfigure(server: BrokerThread, path: Path, dsn: str, *, default_ttl: str,
                max_ttl: str) -> None:
    """Rewrite the role's TTLs in the config file and reload it, as SIGHUP does."""
    text = path.read_text()
    head = text[:text.index(f"[mounts.{MOUNT}]")]
    path.write_text(head + pg_body(dsn, default_ttl=default_ttl, max_ttl=max_ttl))
    assert server.state is not None
    assert server.call(reload(server.state)), "the reload was rejected"
    role = server.state.engine.role(MOUNT, "app")
    assert role.max_ttl == _seconds(max_ttl)


def _seconds(duration: str) -> int:
    return int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]


def lookup(client: hvac.Client, lease_id: str) -> dict[str, Any]:
    data: dict[str, Any] = client.sys.read_lease(lease_id)["data"]
    return data


def ts(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


async def valid_until(dsn: str, user: str) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval("SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1", user)
    finally:
        await conn.close()
    assert value is not None
    return float(value.timestamp())


def test_renew_after_a_reload_lowered_max_ttl_is_capped_with_a_warning(
    broker: tuple[BrokerThread, Path], postgres_dsn: str,
) -> None:
    """Issued under max_ttl=24h, then max_ttl=10m: a renewal (hvac's, no increment) ends at
    issue + 10m, not now + default_ttl, says so in ``warnings``, and pushes that expiry to
    PostgreSQL's VALID UNTIL. A later reload that raises max_ttl again lets renewals past
    the lowered cap again (it is not stuck at what the lower config said)."""
    server, path = broker
    client = hvac.Client(url=server.url, token=server.root_token)
    issued = client.secrets.database.generate_credentials("app", mount_point=MOUNT)
    lease_id, user = issued["lease_id"], issued["data"]["username"]
    assert issued["lease_duration"] == 3600
    issue_time = ts(lookup(client, lease_id)["issue_time"])

    reconfigure(server, path, postgres_dsn, default_ttl="10m", max_ttl="10m")
    time.sleep(2)  # so that "capped" differs from the 600 s a renewal extends by
    renewed = client.sys.renew_lease(lease_id)
    assert renewed["lease_duration"] <= 598, renewed
    assert renewed["lease_duration"] >= 590, renewed
    warnings = renewed["warnings"] or []
    assert any("capped at the lease's max expiry" in w and "max_ttl is now 600s" in w
               for w in warnings), renewed
    data = lookup(client, lease_id)
    assert abs(ts(data["max_expire_time"]) - (issue_time + 600)) < 1, data
    assert abs(ts(data["expire_time"]) - (issue_time + 600)) < 1, data
    # The backend was told the capped expiry, not now + 600 s.
    assert abs(server.call(valid_until(postgres_dsn, user)) - (issue_time + 600)) < 2

    # Raised again: the cap follows the config, up to issue + 2h.
    reconfigure(server, path, postgres_dsn, default_ttl="1h", max_ttl="2h")
    again = client.sys.renew_lease(lease_id, increment=3600)
    assert again["lease_duration"] == 3600, again
    assert not again["warnings"], again
    data = lookup(client, lease_id)
    assert abs(ts(data["max_expire_time"]) - (issue_time + 7200)) < 1, data


def test_an_increment_past_the_lowered_max_ttl_is_capped_saying_why(
    broker: tuple[BrokerThread, Path], postgres_dsn: str,
) -> None:
    """An explicit increment past the lowered cap is capped there with Vault's warning
    (``CalculateTTL``), which names the new max_ttl; within the cap, no warning."""
    server, path = broker
    client = hvac.Client(url=server.url, token=server.root_token)
    issued = client.secrets.database.generate_credentials("app", mount_point=MOUNT)
    lease_id = issued["lease_id"]
    issue_time = ts(lookup(client, lease_id)["issue_time"])
    reconfigure(server, path, postgres_dsn, default_ttl="5m", max_ttl="10m")
    capped = client.sys.renew_lease(lease_id, increment=3600)
    assert 590 <= capped["lease_duration"] <= 600, capped
    warnings = capped["warnings"] or []
    assert any('TTL of "3600s" exceeded the effective max_ttl' in w
               and "max_ttl is now 600s" in w for w in warnings), capped
    assert abs(ts(lookup(client, lease_id)["expire_time"]) - (issue_time + 600)) < 1
    # Within the new cap: fine, and no warning (nothing was cut short).
    ok = client.sys.renew_lease(lease_id, increment=300)
    assert ok["lease_duration"] == 300 and not ok["warnings"], ok


def test_a_lease_already_past_the_lowered_max_ttl_cannot_be_renewed(
    broker: tuple[BrokerThread, Path], postgres_dsn: str,
) -> None:
    """Lowered below the lease's age: as Vault's CalculateTTL ("past the max TTL, cannot
    renew"), the renewal is refused, whether it asks for an increment or not."""
    server, path = broker
    client = hvac.Client(url=server.url, token=server.root_token)
    issued = client.secrets.database.generate_credentials("app", mount_point=MOUNT)
    lease_id = issued["lease_id"]
    time.sleep(2.5)
    reconfigure(server, path, postgres_dsn, default_ttl="2s", max_ttl="2s")
    for increment in (None, 60):
        with pytest.raises(hvac.exceptions.InvalidRequest) as info:
            client.sys.renew_lease(lease_id, increment=increment)
        message = str(info.value)
        assert "past its max TTL" in message and "max_ttl is now 2s" in message, message
    assert lookup(client, lease_id)["state"] == "active"


def test_a_renewal_capped_by_the_owner_token_names_the_token(
    broker: tuple[BrokerThread, Path],
) -> None:
    """A lease issued by a 2-minute token is capped by that token's expiry, not the role's
    24 h max_ttl: an increment past it is capped with Vault's warning, which names the
    token as the limit (not the role's max_ttl)."""
    server, _ = broker
    root = hvac.Client(url=server.url, token=server.root_token)
    token = root.auth.token.create(policies=["root"], ttl="2m")["auth"]["client_token"]
    client = hvac.Client(url=server.url, token=token)
    lease_id = client.secrets.database.generate_credentials("app", mount_point=MOUNT)["lease_id"]
    renewed = client.sys.renew_lease(lease_id, increment=3600)
    assert 100 <= renewed["lease_duration"] <= 120, renewed
    warnings = renewed["warnings"] or []
    assert any("TTL value is capped accordingly" in w
               and "expiry of the token that owns the lease" in w for w in warnings), renewed
