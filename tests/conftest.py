"""Shared fixtures: the real servers the integration tests talk to.

Servers come from ``BROKER_TEST_POSTGRES_DSN`` / ``BROKER_TEST_MYSQL_DSN`` when
set, else from testcontainers when a Docker engine is reachable, else the local
servers (the variables' defaults). Under ``CI=true`` a missing server fails the test; it never
silently skips.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_MYSQL_DSN = "mysql://root@127.0.0.1:3306/test"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def server_missing(what: str) -> None:
    """Fail under CI, skip elsewhere: an integration test never passes without its server."""
    if _in_ci():
        pytest.fail(f"{what} is required in CI but not reachable", pytrace=False)
    pytest.skip(f"{what} not reachable")


def _docker_reachable() -> bool:
    if os.environ.get("BROKER_TEST_NO_DOCKER"):
        return False
    # Probe only when an engine could be there: docker.from_env() leaks a socket
    # (a ResourceWarning, an error under filterwarnings=error) when none is.
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
        return True
    except Exception:
        return False


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A superuser DSN for a real PostgreSQL server."""
    dsn = os.environ.get("BROKER_TEST_POSTGRES_DSN")
    if not dsn and _docker_reachable():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    dsn = dsn or DEFAULT_POSTGRES_DSN
    parts = urlsplit(dsn)
    if not _tcp_open(parts.hostname or "127.0.0.1", parts.port or 5432):
        server_missing(f"PostgreSQL at {parts.hostname}:{parts.port}")
    yield dsn


@pytest.fixture(scope="session")
def mysql_dsn() -> Iterator[str]:
    """An admin DSN (mysql://user[:pw]@host:port/db) for a real MySQL/MariaDB server."""
    dsn = os.environ.get("BROKER_TEST_MYSQL_DSN")
    if not dsn and _docker_reachable():
        from testcontainers.mysql import MySqlContainer

        with MySqlContainer("mysql:8.0") as my:
            url = urlsplit(my.get_connection_url())
            yield f"mysql://root:{my.root_password}@{url.hostname}:{url.port}/{my.dbname}"
        return
    dsn = dsn or DEFAULT_MYSQL_DSN
    parts = urlsplit(dsn)
    if not _tcp_open(parts.hostname or "127.0.0.1", parts.port or 3306):
        server_missing(f"MySQL/MariaDB at {parts.hostname}:{parts.port}")
    yield dsn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's server mode on a free loopback port: a real HTTP AWS endpoint."""
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(exe):
        server_missing("moto_server (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not _tcp_open("127.0.0.1", port):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            server_missing("moto_server did not start")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def run(coro):  # type: ignore[no-untyped-def]
    """Run a coroutine from a sync test (hvac tests are sync)."""
    return asyncio.run(coro)
