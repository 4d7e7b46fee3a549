"""Set-up shared by the day-2 operations tests (QA rounds 5 and 6, rotate-root, a hung
backend at start-up, the sweeper and an unhealthy mount): a no-op broker, one whose lease
store can be cut, a broker's mounts removed by a reload, a PostgreSQL mount and the
prefix of its roles, a server that never answers, the mounts' health, a MariaDB admin
account of the test's own, and a wait for a condition.

Fixtures here (``blackhole``, ``quick_probe``, ``proxied_store_broker``) are used by
binding them to a name in the test module (``blackhole = ops_fixtures.blackhole``):
pytest finds a fixture by the name it has there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from broker import jobs
from broker.bench.noop import register
from broker.config import load_config
from broker.templating import generate_password
from tests.integration.broker_harness import (
    ROOT_TOKEN,
    BrokerThread,
    TcpProxy,
    drop_pg_roles,
    dsn_port,
    start_broker,
    via_proxy,
    write_config,
)
from tests.integration.store_fixtures import fresh_postgres_database
from tests.integration.test_api_mysql_aws import mysql_connect

__all__ = [
    "NOOP",
    "blackhole",
    "mount_health",
    "mounts_health",
    "mysql_admin_account",
    "mysql_statement",
    "pg_mount",
    "pg_role_prefix",
    "proxied_store_broker",
    "quick_probe",
    "reload_without_mounts",
    "wait_for",
]

#: One no-op mount ``noop`` with role ``a``: a broker that needs no database server.
NOOP = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.a]
default_ttl = "1h"
"""


def wait_for(what: str, check: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll ``check`` until it is true; fail saying ``what`` did not happen in ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.05)


def pg_mount(name: str, url: str, template: str, *, default_ttl: str = "1h",
             max_ttl: str | None = None) -> str:
    """The config of a postgres mount ``name`` at ``url`` with one role ``app``, whose
    users are named ``template-<random>`` (see :func:`pg_role_prefix`)."""
    body = f"""
[mounts.{name}]
plugin = "postgres"
connection_url = "{url}"

[mounts.{name}.roles.app]
username_template = "{template}-{{{{random 10}}}}"
creation_statements = [
  "CREATE ROLE \\"{{{{name}}}}\\" WITH LOGIN PASSWORD '{{{{password}}}}' VALID UNTIL '{{{{expiration}}}}'",
]
default_ttl = "{default_ttl}"
"""
    return body if max_ttl is None else body + f'max_ttl = "{max_ttl}"\n'


@contextmanager
def pg_role_prefix(dsn: str, start: str) -> Iterator[str]:
    """A username prefix for a test's roles, ``start`` and this process's id (a run in
    another checkout has its own); whatever roles of it are left are dropped on exit."""
    name = f"{start}{os.getpid() % 10000}"
    try:
        yield name
    finally:
        asyncio.run(drop_pg_roles(dsn, name))


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port that completes TCP handshakes and never answers (a hung server): a
    listening socket nobody accepts on; the kernel queues the connections."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


@pytest.fixture
def quick_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mount-health job every second: an outage is seen, and its end, quickly."""
    monkeypatch.setattr(jobs, "HEALTH_INTERVAL", 1)


def mounts_health(server: BrokerThread) -> dict[str, dict[str, Any]]:
    """``sys/health``'s ``mounts`` (name -> plugin, healthy, error), which must answer 200."""
    resp = requests.get(f"{server.url}/v1/sys/health", headers={"X-Vault-Token": ROOT_TOKEN},
                        timeout=10)
    assert resp.status_code == 200, resp.text
    mounts: dict[str, dict[str, Any]] = resp.json()["mounts"]
    return mounts


def mount_health(server: BrokerThread, name: str) -> dict[str, Any]:
    """Mount ``name``'s entry in ``sys/health`` (plugin, healthy, error)."""
    return mounts_health(server)[name]


@pytest.fixture
def proxied_store_broker(request: pytest.FixtureRequest, tmp_path: Path
                         ) -> Iterator[tuple[BrokerThread, TcpProxy]]:
    """A broker whose PostgreSQL lease store is reached through a TcpProxy (cut with down())."""
    dsn = asyncio.run(fresh_postgres_database(request))
    proxy = TcpProxy(dsn_port(dsn))
    register()
    server = start_broker(write_config(tmp_path, NOOP, storage_url=via_proxy(dsn, proxy.port)))
    try:
        yield server, proxy
    finally:
        proxy.up()
        server.stop()
        proxy.close()


def reload_without_mounts(broker: BrokerThread, tmp_path: Path) -> None:
    """Reload ``broker`` on a config with no mount (same port, store and audit), as an
    operator removing every mount from the file does."""
    assert broker.state is not None
    without = tmp_path / "without"
    without.mkdir()
    config = load_config(write_config(without, "", port=broker.config.server.port,
                                      storage_url=broker.config.storage.url))
    broker.call(broker.state.engine.reload(dataclasses.replace(
        config, audit=broker.config.audit)))


async def mysql_statement(dsn: str, statement: str) -> None:
    """Run one ``statement`` on the MariaDB server of ``dsn`` as the DSN's user."""
    url = urlsplit(dsn)
    conn = await mysql_connect(dsn, url.username or "root", url.password or "")
    try:
        async with conn.cursor() as cur:
            await cur.execute(statement)
    finally:
        conn.close()


@contextmanager
def mysql_admin_account(mysql_dsn: str, prefix: str) -> Iterator[tuple[str, str]]:
    """A MariaDB admin account ``prefix...`` of the test's own, dropped on exit: (user, its
    password). MariaDB checks passwords on loopback, so a test of the admin's secret needs
    one (the local PostgreSQL trusts 127.0.0.1)."""
    user, password = f"{prefix}{secrets.token_hex(3)}", generate_password()
    asyncio.run(mysql_statement(mysql_dsn,
                                f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"))
    asyncio.run(mysql_statement(
        mysql_dsn, f"GRANT ALL PRIVILEGES ON *.* TO '{user}'@'%' WITH GRANT OPTION"))
    try:
        yield user, password
    finally:
        asyncio.run(mysql_statement(mysql_dsn, f"DROP USER IF EXISTS '{user}'@'%'"))
