"""Set-up shared by the day-2 operations tests (QA rounds 5 and 6, rotate-root): a no-op
broker, one whose lease store can be cut, a broker's mounts removed by a reload, a MariaDB
admin account of the test's own, and a wait for a condition.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from broker.bench.noop import register
from broker.config import load_config
from broker.templating import generate_password
from tests.integration.broker_harness import (
    BrokerThread,
    TcpProxy,
    dsn_port,
    start_broker,
    via_proxy,
    write_config,
)
from tests.integration.store_fixtures import fresh_postgres_database
from tests.integration.test_api_mysql_aws import mysql_connect

__all__ = [
    "NOOP",
    "mysql_admin_account",
    "mysql_statement",
    "proxied_store_broker",
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
