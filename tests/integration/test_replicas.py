"""Two broker replicas sharing one PostgreSQL lease store, through the real HTTP API."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import hvac
import pytest

from tests.conftest import run
from tests.integration.broker_harness import BrokerThread, free_port, start_broker
from tests.integration.store_fixtures import fresh_postgres_database

pytestmark = pytest.mark.integration


@pytest.fixture
def store_dsn(request: pytest.FixtureRequest) -> str:
    """An empty database for the shared lease store (the session's own, tables dropped)."""
    dsn: str = run(fresh_postgres_database(request))
    return dsn


def replica_config(tmp: Path, store_dsn: str, pg_dsn: str, name: str) -> Path:
    directory = tmp / name
    directory.mkdir()
    path = directory / "broker.toml"
    path.write_text(f"""
[server]
listen = "127.0.0.1:{free_port()}"
[storage]
url = "{store_dsn}"
[audit]
path = "{directory / 'audit.jsonl'}"
hmac_key_file = "{directory / 'audit.key'}"
[mounts.pg]
plugin = "postgres"
connection_url = "{pg_dsn}"
[mounts.pg.roles.short]
username_template = "rep-{{{{random 10}}}}"
default_ttl = "2s"
max_ttl = "1h"
""")
    return path


def audit(broker: BrokerThread) -> list[dict[str, object]]:
    return [json.loads(x) for x in Path(broker.audit_path).read_text().splitlines()]


def test_two_replicas_share_leases_and_tokens(tmp_path: Path, store_dsn: str,
                                              postgres_dsn: str) -> None:
    """A token from replica A works on B; leases issued on both expire exactly once."""
    a = start_broker(replica_config(tmp_path, store_dsn, postgres_dsn, "a"))
    b = start_broker(replica_config(tmp_path, store_dsn, postgres_dsn, "b"))
    try:
        root_a = hvac.Client(url=a.url, token=a.root_token)
        token = root_a.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
        on_b = hvac.Client(url=b.url, token=token)
        assert on_b.auth.token.lookup_self()["data"]["policies"] == ["root"]
        ids = [root_a.secrets.database.generate_credentials("short", mount_point="pg")
               ["lease_id"] for _ in range(10)]
        ids += [on_b.secrets.database.generate_credentials("short", mount_point="pg")
                ["lease_id"] for _ in range(10)]
        # A lease issued on A can be looked up and renewed through B.
        assert on_b.sys.read_lease(ids[0])["data"]["id"] == ids[0]
        deadline = time.monotonic() + 15
        expired: Counter[str] = Counter()
        while time.monotonic() < deadline:
            expired = Counter(str(e["lease"]["id"]) for r in (a, b) for e in audit(r)  # type: ignore[index]
                              if e["type"] == "expire")
            if len(expired) == len(ids):
                break
            time.sleep(0.3)
        assert set(expired) == set(ids), "some leases never expired"
        assert max(expired.values()) == 1, "a lease was revoked by both replicas"
    finally:
        a.stop()
        b.stop()
