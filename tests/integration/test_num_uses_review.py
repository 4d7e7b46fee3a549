"""Use-limited tokens (num_uses): fixes from the static review, on real servers.

- ``sys/health`` (and the UI's mount list), which Vault serves without a token, take
  no use of a token sent along (hvac sends it on every call).
- A renewal on a token's last use keeps its answer, as in Vault: the lease may be
  another token's, and it is not revoked with this one.
- A request whose store budget a stall spent still revokes the token whose last use
  it took (with a full command_timeout): it stayed active, its leases live.
- The token-expiry job ends a used-up token its request could not end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import hvac
import hvac.exceptions
import pytest
import requests

import broker.jobs
from broker.bench.noop import register as register_noop_plugin
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, start_broker, write_config
from tests.integration.store_fixtures import fresh_postgres_database

pytestmark = pytest.mark.integration

MOUNT = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.r]
default_ttl = "1h"
max_ttl = "2h"

[policies.renewer]
"sys/leases/renew" = ["update"]
"sys/leases/renew/noop/*" = ["update"]
"noop/creds/r" = ["read"]
"""

#: command_timeout of the PostgreSQL store (seconds).
TIMEOUT = 2.0


@pytest.fixture
def noop_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerThread]:
    monkeypatch.setattr(broker.jobs, "TOKEN_SWEEP_INTERVAL", 0.5)
    register_noop_plugin()
    server = start_broker(write_config(tmp_path, MOUNT))
    try:
        yield server
    finally:
        server.stop()


def _limited(server: BrokerThread, uses: int, policies: list[str] | None = None) -> str:
    root = hvac.Client(url=server.url, token=ROOT_TOKEN)
    answer = root.auth.token.create(policies=policies or ["renewer"], ttl="1h",
                                    num_uses=uses)
    token: str = answer["auth"]["client_token"]
    return token


def test_health_and_the_ui_mount_list_take_no_use(noop_broker: BrokerThread) -> None:
    token = _limited(noop_broker, 2)
    headers = {"X-Vault-Token": token}
    for _ in range(3):
        assert requests.get(f"{noop_broker.url}/v1/sys/health", headers=headers,
                            timeout=10).status_code == 200
        assert requests.get(f"{noop_broker.url}/v1/sys/internal/ui/mounts", headers=headers,
                            timeout=10).status_code == 200
    # Both uses are left: this lookup takes the first.
    client = hvac.Client(url=noop_broker.url, token=token)
    assert client.auth.token.lookup_self()["data"]["num_uses"] == 1


def test_a_renewal_on_the_last_use_keeps_its_answer(noop_broker: BrokerThread) -> None:
    root = hvac.Client(url=noop_broker.url, token=ROOT_TOKEN)
    lease_id = root.read("noop/creds/r")["lease_id"]  # root's lease
    client = hvac.Client(url=noop_broker.url, token=_limited(noop_broker, 1))
    renewed = client.sys.renew_lease(lease_id, increment=600)
    assert renewed["lease_id"] == lease_id
    # The token is gone, the other token's lease is not.
    with pytest.raises(hvac.exceptions.Forbidden):
        client.auth.token.lookup_self()
    assert root.sys.read_lease(lease_id)["data"]["id"] == lease_id


def test_the_token_expiry_job_ends_a_used_up_token_left_active(
        noop_broker: BrokerThread) -> None:
    """As if the request that took the last use had crashed before ending it."""
    token = _limited(noop_broker, 1, ["default"])
    state = noop_broker.state
    assert state is not None
    record = noop_broker.call(state.tokens.resolve(token, consume=False))
    assert noop_broker.call(state.store.use_token(record.accessor)) == -1
    deadline = time.monotonic() + 10
    while noop_broker.call(state.store.token_by_accessor(record.accessor)).state.value \
            == "active":
        assert time.monotonic() < deadline, "the used-up token was never ended"
        time.sleep(0.2)
    audit = Path(noop_broker.audit_path).read_text()
    assert '"action":"spent_backstop"' in audit


@pytest.fixture
async def pg_dsn(request: pytest.FixtureRequest) -> str:
    return await fresh_postgres_database(request)


async def test_a_stalled_last_use_still_ends_its_token(tmp_path: Path, pg_dsn: str) -> None:
    """The token's last use is an issue that waits out the budget on a locked leases
    table (503); the lock goes while the request ends the token, which then works
    with a full command_timeout: the token is revoked (it stayed active: the
    revocation drew on the spent budget and failed at once)."""
    register_noop_plugin()
    server = start_broker(write_config(tmp_path, MOUNT,
                                       storage_url=f"{pg_dsn}?command_timeout={TIMEOUT:g}"))
    try:
        token = _limited(server, 1)
        locker = await asyncpg.connect(pg_dsn)
        try:
            await locker.execute("BEGIN")
            await locker.execute("LOCK TABLE leases IN ACCESS EXCLUSIVE MODE")

            async def release_later() -> None:
                await asyncio.sleep(TIMEOUT + 0.7)
                await locker.execute("ROLLBACK")

            releasing = asyncio.ensure_future(release_later())
            async with aiohttp.ClientSession() as http, http.get(
                    f"{server.url}/v1/noop/creds/r",
                    headers={"X-Vault-Token": token}) as answer:
                assert answer.status == 503, await answer.text()
            await releasing
        finally:
            await locker.close()
        state = server.state
        assert state is not None
        rows = await asyncio.to_thread(server.call, state.store.live_token_accessors(
            now=time.time(), limit=100))
        root_only = [a for a in rows if a != "test-root"]
        assert root_only == [], "the token whose last use was taken is still active"
    finally:
        server.stop()
