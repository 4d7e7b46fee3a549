"""A PostgreSQL lease store, and a broker on one, with a short ``command_timeout``, and
sessions holding the locks that stall them: for the tests of what a stalled store
answers (test_store_request_deadline, test_store_probe_tables).

A module binds the fixtures it uses by their names (``pg_dsn = stall_fixtures.pg_dsn``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from broker.bench.noop import register as register_noop_plugin
from broker.store.postgres import PostgresStore
from tests.integration.broker_harness import BrokerThread, start_broker, write_config
from tests.integration.store_fixtures import fresh_postgres_database

#: command_timeout of the stores here (seconds).
TIMEOUT = 2.0

#: the no-op mount the brokers here issue from (``noop/creds/r``).
MOUNT = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.r]
default_ttl = "1h"
max_ttl = "2h"
"""


@pytest.fixture
async def pg_dsn(request: pytest.FixtureRequest) -> str:
    """A fresh PostgreSQL database for this test's store."""
    return await fresh_postgres_database(request)


@pytest.fixture
async def pg_store(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    """The lease store on ``pg_dsn``, opened, with a TIMEOUT ``command_timeout``."""
    store = PostgresStore.from_url(f"{pg_dsn}?command_timeout={TIMEOUT}")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def pg_broker(tmp_path: Path, pg_dsn: str) -> Iterator[BrokerThread]:
    """A broker serving MOUNT on a store on ``pg_dsn`` with a TIMEOUT ``command_timeout``."""
    register_noop_plugin()
    broker = start_broker(write_config(tmp_path, MOUNT,
                                       storage_url=f"{pg_dsn}?command_timeout={TIMEOUT}"))
    try:
        yield broker
    finally:
        broker.stop()


async def locked(dsn: str, *statements: str) -> asyncpg.Connection:
    """A session that ran ``statements`` in a transaction it keeps open (its locks held)."""
    conn = await asyncpg.connect(dsn)
    await conn.execute("BEGIN")
    for statement in statements:
        await conn.execute(statement)
    return conn
