"""Every 503 the broker answers carries ``Retry-After`` (hvac's retries and load
balancers honour it): an issue from a mount whose backend cannot be reached, any call
while the broker shuts down. Not ``sys/health``'s 503: that is Vault's ``sealedcode``,
which Vault answers without it.

A real broker (in-process, real HTTP); the backend is a PostgreSQL mount whose
server address refuses connections (a closed port), as an outage would.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tests.integration.broker_harness import (
    BrokerThread,
    free_port,
    noop_broker,
)

pytestmark = pytest.mark.integration

CONFIG = f"""
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.a]
default_ttl = "1h"

[mounts.down]
plugin = "postgres"
connection_url = "postgresql://postgres@127.0.0.1:{free_port()}/postgres"

[mounts.down.roles.app]
creation_statements = ["CREATE ROLE \\"{{{{name}}}}\\" WITH LOGIN PASSWORD '{{{{password}}}}'"]
default_ttl = "1h"
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with noop_broker(tmp_path_factory.mktemp("retry-after"), CONFIG) as server:
        yield server


def test_an_unreachable_backend_503_says_when_to_retry(broker: BrokerThread) -> None:
    """An issue from a mount whose backend refuses connections: 503 with Retry-After, a
    small whole number of seconds."""
    resp = requests.get(f"{broker.url}/v1/down/creds/app",
                        headers={"X-Vault-Token": broker.root_token}, timeout=30)
    assert resp.status_code == 503, resp.text
    assert resp.headers.get("Retry-After") == "1", resp.headers
    # Any other answer: no Retry-After.
    ok = requests.get(f"{broker.url}/v1/noop/creds/a",
                      headers={"X-Vault-Token": broker.root_token}, timeout=30)
    assert ok.status_code == 200 and "Retry-After" not in ok.headers


def test_shutting_down_503_says_when_to_retry_but_health_does_not(
        broker: BrokerThread) -> None:
    """While the broker shuts down: a call gets 503 with Retry-After; sys/health's 503
    (Vault's sealed code, for load balancers) has none, as Vault's has none."""
    assert broker.state is not None
    broker.state.serving = False
    try:
        resp = requests.get(f"{broker.url}/v1/noop/creds/a",
                            headers={"X-Vault-Token": broker.root_token}, timeout=30)
        health = requests.get(f"{broker.url}/v1/sys/health", timeout=30)
    finally:
        broker.state.serving = True
    assert resp.status_code == 503 and "shutting down" in resp.json()["errors"][0]
    assert resp.headers.get("Retry-After") == "1", resp.headers
    assert health.status_code == 503 and "Retry-After" not in health.headers
