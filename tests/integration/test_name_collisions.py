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
from collections.abc import Iterator
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


def test_an_existing_postgres_role_survives_an_issue_that_collides_with_it(
        broker: BrokerThread, postgres_dsn: str) -> None:
    name = f"{TAG}-fixed"
    run(_pg(postgres_dsn, f'CREATE ROLE "{name}" LOGIN'))
    resp = _issue(broker, "pg")
    assert resp.status_code >= 400 and "already exists" in resp.text, resp.text
    assert run(_pg(postgres_dsn, "SELECT count(*) FROM pg_roles WHERE rolname = $1", name)) == 1
    assert _pending_and_active(broker, "pg/") == (0, 0)  # the lease is forgotten, not left
    [rollback] = _rollbacks(broker)
    assert rollback["user_deleted"] is False


def test_a_live_postgres_lease_survives_a_second_issue_of_the_same_name(
        broker: BrokerThread, postgres_dsn: str) -> None:
    first = _issue(broker, "pg")
    assert first.status_code == 200, first.text
    second = _issue(broker, "pg")
    assert second.status_code >= 400 and "already exists" in second.text, second.text
    # The first lease's user still logs in with its password.
    data = first.json()["data"]
    run(_login_pg(postgres_dsn, data["username"], data["password"]))
    assert _pending_and_active(broker, "pg/") == (0, 1)


def test_an_existing_mysql_user_survives_an_issue_that_collides_with_it(
        broker: BrokerThread, mysql_dsn: str) -> None:
    name = f"{TAG}-fixed"
    run(_my(mysql_dsn, f"CREATE USER '{name}'@'%' IDENTIFIED BY 'not-the-brokers'"))
    resp = _issue(broker, "my")
    assert resp.status_code >= 400, resp.text
    assert run(_my(mysql_dsn, "SELECT count(*) FROM mysql.user WHERE user = %s", name)) == 1
    assert _pending_and_active(broker, "my/") == (0, 0)
    [rollback] = _rollbacks(broker)
    assert rollback["user_deleted"] is False


def test_a_live_mysql_lease_survives_a_second_issue_of_the_same_name(
        broker: BrokerThread, mysql_dsn: str) -> None:
    first = _issue(broker, "my")
    assert first.status_code == 200, first.text
    second = _issue(broker, "my")
    assert second.status_code >= 400, second.text
    data = first.json()["data"]
    run(_login_my(mysql_dsn, data["username"], data["password"]))
    assert _pending_and_active(broker, "my/") == (0, 1)
