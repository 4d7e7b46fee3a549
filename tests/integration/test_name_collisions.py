"""A failed issue never deletes a database user the broker did not create.

A role's ``username_template`` may render a name that already exists: an
account made by hand, or the user of another live lease (a template without
``{{random}}``). The server then refuses the creation ("role already
exists", MySQL error 1396). Before, the engine "rolled back" such an issue
like any failed one, with the revocation statements: it dropped the existing
user, and a caller who could pick the name (a display name, a role) could
pick whom to drop. Now a refusal that certainly created nothing only forgets
the lease; the existing user stays, and so does every lease of its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomysql
import asyncpg
import pytest
import requests

from tests.conftest import run
from tests.integration.broker_harness import BrokerThread, start_broker, write_config

pytestmark = pytest.mark.integration

#: One name per test process, so parallel runs on a shared server never meet.
TAG = f"bkrcol{os.getpid() % 100000}"


def _config(postgres_dsn: str, mysql_dsn: str) -> str:
    url = urlsplit(mysql_dsn)
    return f"""
[mounts.pg]
plugin = "postgres"
connection_url = "{postgres_dsn}"

[mounts.pg.roles.fixed]
username_template = "{TAG}-{{{{role}}}}"
default_ttl = "1h"

[mounts.my]
plugin = "mysql"
connection_url = "mysql://{url.username}@{url.hostname}:{url.port or 3306}{url.path}"
{'password_file = "my.pw"' if url.password else ''}

[mounts.my.roles.fixed]
database = "{url.path.lstrip('/') or 'test'}"
username_template = "{TAG}-{{{{role}}}}"
default_ttl = "1h"
"""


@pytest.fixture
def broker(tmp_path: Path, postgres_dsn: str, mysql_dsn: str) -> Iterator[BrokerThread]:
    (tmp_path / "my.pw").write_text(urlsplit(mysql_dsn).password or "")
    server = start_broker(write_config(tmp_path, _config(postgres_dsn, mysql_dsn)))
    yield server
    for prefix in ("pg/", "my/"):
        requests.put(f"{server.url}/v1/sys/leases/revoke-prefix/{prefix}", json={"sync": True},
                     headers={"X-Vault-Token": server.root_token}, timeout=60)
    server.stop()
    run(_drop_pg(postgres_dsn, f"{TAG}-fixed"))
    run(_drop_my(mysql_dsn, f"{TAG}-fixed"))


async def _pg(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def _drop_pg(dsn: str, name: str) -> None:
    await _pg(dsn, f'DROP ROLE IF EXISTS "{name}"')


async def _my(dsn: str, sql: str, *args: Any) -> Any:
    url = urlsplit(dsn)
    conn = await aiomysql.connect(host=url.hostname, port=url.port or 3306, user=url.username,
                                  password=url.password or "", autocommit=True)
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql, args or None)
            row = await cur.fetchone()
            return row[0] if row else None
    finally:
        conn.close()


async def _drop_my(dsn: str, name: str) -> None:
    # (IF EXISTS on a missing user is a server warning, which the test run treats as an error)
    if await _my(dsn, "SELECT count(*) FROM mysql.user WHERE user = %s", name):
        await _my(dsn, f"DROP USER '{name}'@'%'")


async def _login_pg(dsn: str, user: str, password: str) -> None:
    url = urlsplit(dsn)
    conn = await asyncpg.connect(host=url.hostname, port=url.port or 5432, user=user,
                                 password=password, database="postgres")
    await conn.close()


async def _login_my(dsn: str, user: str, password: str) -> None:
    url = urlsplit(dsn)
    conn = await aiomysql.connect(host=url.hostname, port=url.port or 3306, user=user,
                                  password=password)
    conn.close()


def _issue(broker: BrokerThread, mount: str) -> requests.Response:
    return requests.get(f"{broker.url}/v1/{mount}/creds/fixed", timeout=30,
                        headers={"X-Vault-Token": broker.root_token})


def _rollbacks(broker: BrokerThread) -> list[dict[str, Any]]:
    with open(broker.audit_path) as f:
        lines = [json.loads(line) for line in f]
    return [line for line in lines if line["type"] == "rollback"]


def _pending_and_active(broker: BrokerThread, prefix: str) -> tuple[int, int]:
    data = requests.get(f"{broker.url}/v1/sys/leases/stats", params={"prefix": prefix},
                        headers={"X-Vault-Token": broker.root_token}, timeout=10).json()["data"]
    return data["pending"], data["active"]


async def _create_pg(dsn: str, name: str) -> None:
    await _pg(dsn, f'CREATE ROLE "{name}" LOGIN')


async def _count_pg(dsn: str, name: str) -> Any:
    return await _pg(dsn, "SELECT count(*) FROM pg_roles WHERE rolname = $1", name)


async def _create_my(dsn: str, name: str) -> None:
    await _my(dsn, f"CREATE USER '{name}'@'%' IDENTIFIED BY 'not-the-brokers'")


async def _count_my(dsn: str, name: str) -> Any:
    return await _my(dsn, "SELECT count(*) FROM mysql.user WHERE user = %s", name)


@dataclass(frozen=True)
class Server:
    """One database server the broker issues users on, and how a test reaches it."""

    mount: str
    dsn_fixture: str
    create_user: Callable[[str, str], Awaitable[None]]
    count_users: Callable[[str, str], Awaitable[Any]]
    login: Callable[[str, str, str], Awaitable[None]]
    #: what the refusal of a taken name says (MySQL's error 1396 has no fixed wording)
    refusal: str | None


SERVERS = pytest.mark.parametrize("server", [
    Server("pg", "postgres_dsn", _create_pg, _count_pg, _login_pg, "already exists"),
    Server("my", "mysql_dsn", _create_my, _count_my, _login_my, None),
], ids=["postgres", "mysql"])


@SERVERS
def test_an_existing_user_survives_an_issue_that_collides_with_it(
        broker: BrokerThread, server: Server, request: pytest.FixtureRequest) -> None:
    """A user made outside the broker under the templated name stays; the lease is forgotten."""
    dsn = request.getfixturevalue(server.dsn_fixture)
    name = f"{TAG}-fixed"
    run(server.create_user(dsn, name))
    resp = _issue(broker, server.mount)
    assert resp.status_code >= 400, resp.text
    if server.refusal:
        assert server.refusal in resp.text, resp.text
    assert run(server.count_users(dsn, name)) == 1
    # the lease is forgotten, not left
    assert _pending_and_active(broker, f"{server.mount}/") == (0, 0)
    [rollback] = _rollbacks(broker)
    assert rollback["user_deleted"] is False


@SERVERS
def test_a_live_lease_survives_a_second_issue_of_the_same_name(
        broker: BrokerThread, server: Server, request: pytest.FixtureRequest) -> None:
    """A second issue of a live lease's name is refused; the first user still logs in."""
    dsn = request.getfixturevalue(server.dsn_fixture)
    first = _issue(broker, server.mount)
    assert first.status_code == 200, first.text
    second = _issue(broker, server.mount)
    assert second.status_code >= 400, second.text
    if server.refusal:
        assert server.refusal in second.text, second.text
    # The first lease's user still logs in with its password.
    data = first.json()["data"]
    run(server.login(dsn, data["username"], data["password"]))
    assert _pending_and_active(broker, f"{server.mount}/") == (0, 1)
