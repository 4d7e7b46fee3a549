"""Vault compatibility of the system side, against a real broker over HTTP (hvac where a
Vault client is the point): response wrapping is refused before anything is issued, and
``GET sys/leader`` answers in Vault's shape.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from tests.integration.broker_harness import (
    ROOT_TOKEN,
    BrokerThread,
    drop_pg_roles,
    pg_roles,
    start_broker,
    write_config,
)
from tests.integration.store_fixtures import broker_store_url

pytestmark = pytest.mark.integration

WRAPPED = {"errors": ["response wrapping (X-Vault-Wrap-TTL) is not supported"]}
PREFIX = "wrapt-"  # the roles this module's mount creates, so none is left behind


def pg_mount(dsn: str) -> str:
    return f"""
[mounts.pg]
plugin = "postgres"
connection_url = "{dsn}"

[mounts.pg.roles.readonly]
creation_statements = [
  "CREATE ROLE \\"{{{{name}}}}\\" WITH LOGIN PASSWORD '{{{{password}}}}' VALID UNTIL '{{{{expiration}}}}'",
]
revocation_statements = ["DROP ROLE IF EXISTS \\"{{{{name}}}}\\""]
username_template = "{PREFIX}{{{{random 10}}}}"
default_ttl = "1h"
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, postgres_dsn: str
           ) -> Iterator[BrokerThread]:
    server = start_broker(write_config(tmp_path_factory.mktemp("vault-compat-system"),
                                       pg_mount(postgres_dsn)))
    yield server
    requests.put(f"{server.url}/v1/sys/leases/revoke-prefix/pg/", json={"sync": True},
                 headers={"X-Vault-Token": ROOT_TOKEN}, timeout=120)
    server.stop()
    asyncio.run(drop_pg_roles(postgres_dsn, PREFIX))


def root(broker: BrokerThread) -> hvac.Client:
    return hvac.Client(url=broker.url, token=ROOT_TOKEN)


def stats(broker: BrokerThread) -> dict[str, int]:
    return dict(root(broker).read("sys/leases/stats")["data"])


def tokens_created(broker: BrokerThread) -> int:
    """How many tokens the broker has made (each is audited as token_create)."""
    lines = Path(broker.audit_path).read_text().splitlines()
    return sum(1 for line in lines if json.loads(line)["type"] == "token_create")


# -- 1. response wrapping ---------------------------------------------------------------


def test_wrapped_requests_are_refused_and_issue_nothing(broker: BrokerThread,
                                                        postgres_dsn: str) -> None:
    """With X-Vault-Wrap-TTL (hvac's wrap_ttl=), an issue, a token create and a login are
    a 400 saying wrapping is not supported, and nothing is created: no lease, no database
    role, no token. (The secret used to come back in plaintext with wrap_info null.)"""
    before, tokens_before = stats(broker), tokens_created(broker)
    with pytest.raises(hvac.exceptions.InvalidRequest, match=r"response wrapping"):
        root(broker).read("pg/creds/readonly", wrap_ttl="60s")
    with pytest.raises(hvac.exceptions.InvalidRequest, match=r"response wrapping"):
        root(broker).auth.token.create(policies=["default"], wrap_ttl="5m")
    for method, path in [("POST", "pg/creds/readonly"), ("GET", "pg/creds/readonly"),
                         ("PUT", "auth/token/create"), ("POST", "auth/github/login"),
                         ("GET", "sys/health"), ("GET", "no/such/path")]:
        resp = requests.request(method, f"{broker.url}/v1/{path}", timeout=30,
                                headers={"X-Vault-Token": ROOT_TOKEN, "X-Vault-Wrap-TTL": "120"})
        assert (resp.status_code, resp.json()) == (400, WRAPPED), (method, path, resp.text)
    assert stats(broker) == before
    assert tokens_created(broker) == tokens_before
    with pytest.raises(hvac.exceptions.InvalidPath):  # Vault's 404 for an empty listing
        root(broker).sys.list_leases("pg/creds/readonly/")
    assert asyncio.run(pg_roles(postgres_dsn, PREFIX)) == set()


def test_without_wrapping_the_same_calls_work(broker: BrokerThread, postgres_dsn: str) -> None:
    """An empty X-Vault-Wrap-TTL asks for no wrapping (as in Vault): the issue goes
    through, plaintext, with wrap_info null."""
    resp = requests.get(f"{broker.url}/v1/pg/creds/readonly", timeout=60,
                        headers={"X-Vault-Token": ROOT_TOKEN, "X-Vault-Wrap-TTL": ""})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["wrap_info"] is None and body["data"]["username"].startswith(PREFIX)
    root(broker).sys.revoke_lease(body["lease_id"])


# -- 2. GET sys/leader --------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerThread]:
    url = broker_store_url(request, tmp_path)
    server = start_broker(write_config(tmp_path, "", storage_url=url))
    yield server
    server.stop()


def test_sys_leader_answers_vaults_shape_without_a_token(store_broker: BrokerThread) -> None:
    """hvac's sys.read_leader_status (what `vault status` asks) with no token: this broker
    is the active node; HA is enabled exactly when the store is PostgreSQL (replicas)."""
    status = hvac.Client(url=store_broker.url, token="").sys.read_leader_status()
    postgres = store_broker.config.storage.url.startswith("postgresql")
    expected: dict[str, Any] = {
        "ha_enabled": postgres,
        "is_self": True,
        "leader_address": store_broker.url,
        "leader_cluster_address": "",
        "performance_standby": False,
        "performance_standby_last_remote_wal": 0,
    }
    assert {k: status[k] for k in expected} == expected, json.dumps(status)
    assert status["active_time"].endswith("Z")
    # no token was needed, and none was audited as a failure
    events = [json.loads(line) for line in Path(store_broker.audit_path).read_text().splitlines()]
    assert not [e for e in events if e["type"] == "auth_failure"]
