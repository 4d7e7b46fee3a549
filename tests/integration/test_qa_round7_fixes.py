"""Fixes from this session's QA pass (round 7), each on real servers.

- A single-use JWT whose login failed on a stalled store is not used up: the record's
  removal gets a full command_timeout, not what the request's spent budget left.
- An explicit deny on ``sys/auth/NAME/tune`` or ``sys/mounts/NAME/tune`` wins over the
  ``read`` on ``sys/auth`` / ``sys/mounts`` that otherwise reaches them.
- ``broker token capabilities`` takes a path whose mount starts like a token prefix.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import hvac
import hvac.exceptions
import pytest

from broker.cli.commands import _check_capabilities_path
from tests.integration.broker_harness import BrokerThread, start_broker, write_config
from tests.integration.jwt_fixtures import jwt_role, oidc_issuer_fixture, oidc_method
from tests.integration.store_fixtures import fresh_postgres_database
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

issuer = oidc_issuer_fixture()

#: command_timeout of the PostgreSQL store here (seconds).
TIMEOUT = 2.0


@pytest.fixture
async def pg_dsn(request: pytest.FixtureRequest) -> str:
    return await fresh_postgres_database(request)


@pytest.fixture
def jwt_broker(tmp_path: Path, pg_dsn: str, issuer: OIDCIssuer) -> Iterator[BrokerThread]:
    config = (oidc_method(issuer) + jwt_role("once") + "single_use = true\n"
              + '\n[policies.app]\n"x/y" = ["read"]\n')
    broker = start_broker(write_config(tmp_path, config,
                                       storage_url=f"{pg_dsn}?command_timeout={TIMEOUT:g}"))
    try:
        yield broker
    finally:
        broker.stop()


async def test_a_login_failed_by_a_store_stall_does_not_use_up_a_single_use_jwt(
        jwt_broker: BrokerThread, pg_dsn: str, issuer: OIDCIssuer) -> None:
    """The token's write waits out the budget on a locked tokens table (503); the
    single-use record is removed all the same, so the job's retry logs in (it got a
    403 "already used": the removal had no budget left and failed at once)."""
    jwt = issuer.mint(issuer.github_claims(run_id="stall-1"))
    client = hvac.Client(url=jwt_broker.url, timeout=30)
    locker = await asyncpg.connect(pg_dsn)
    try:
        await locker.execute("BEGIN")
        await locker.execute("LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(hvac.exceptions.VaultDown):
            await asyncio.to_thread(client.auth.jwt.jwt_login, role="once", jwt=jwt,
                                    path="github")
        assert time.monotonic() - started < 2 * TIMEOUT
    finally:
        await locker.close()
    answer = await asyncio.to_thread(client.auth.jwt.jwt_login, role="once", jwt=jwt,
                                     path="github")
    assert answer["auth"]["client_token"]
    # And it is single-use still: the replay of a JWT that logged in is refused.
    with pytest.raises(hvac.exceptions.Forbidden):
        await asyncio.to_thread(client.auth.jwt.jwt_login, role="once", jwt=jwt,
                                path="github")


TUNE_POLICIES = """
[policies.auth_reader]
"sys/auth" = ["read"]
"sys/auth/token/tune" = ["deny"]

[policies.mount_reader]
"sys/mounts" = ["read"]
"sys/mounts/noop/tune" = ["deny"]

[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.r]
default_ttl = "1h"
max_ttl = "2h"

[mounts.other]
plugin = "bench-noop"

[mounts.other.roles.r]
default_ttl = "1h"
max_ttl = "2h"
"""


@pytest.fixture
def tune_broker(tmp_path: Path) -> Iterator[BrokerThread]:
    from broker.bench.noop import register

    register()
    broker = start_broker(write_config(tmp_path, TUNE_POLICIES))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.parametrize(("policy", "denied", "other"), [
    ("auth_reader", "sys/auth/token/tune", "sys/auth/github/tune"),
    ("mount_reader", "sys/mounts/noop/tune", "sys/mounts/other/tune"),
])
def test_a_deny_on_a_tune_path_wins_over_the_listing_s_read(
        tune_broker: BrokerThread, policy: str, denied: str, other: str) -> None:
    root = hvac.Client(url=tune_broker.url, token=tune_broker.root_token)
    token = root.auth.token.create(policies=[policy], ttl="10m")["auth"]["client_token"]
    client = hvac.Client(url=tune_broker.url, token=token)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.read(denied)
    # sys/capabilities-self says the same as the read does.
    caps = client.adapter.post("/v1/sys/capabilities-self", json={"paths": [denied]})
    assert caps[denied] == ["deny"]
    if policy == "mount_reader":  # the listing's read still reaches the others
        answer = client.adapter.get(f"/v1/{other}")
        assert answer["default_lease_ttl"] >= 0, answer


@pytest.mark.parametrize("path", ["brk.app/creds/x", "s.ops/creds/r", "hvs.team/roles/"])
def test_token_capabilities_takes_a_path_whose_mount_starts_like_a_token(path: str) -> None:
    _check_capabilities_path(path, alone=True)  # no UsageError
