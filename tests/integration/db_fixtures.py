"""Set-up shared by the MySQL/MariaDB and PostgreSQL plugin tests against real servers.

The MySQL tests (``test_mysql_*.py``) and the PostgreSQL ones
(``test_postgres_*.py``, ``test_pg_*.py``) each built the same pieces again:
a mount pointing at the test server, backends that must be closed when the
test ends, the admin's own connection for checks, the cleanup of the
accounts a test made, the PostgreSQL conformance harness. They live here
once. None of them is a fixture: pytest looks for fixtures in the test module
or a ``conftest.py``, not in a module it imports, so each test module keeps
thin fixtures that call these.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pymysql
import pytest

from broker.backend import BackendError, MountSpec, NewUserRequest, NewUserResponse, RoleSpec
from broker.conformance import BackendHarness
from broker.templating import generate_password, render_username
from plugins.mysql import MySQLBackend
from plugins.postgres import PostgresBackend

__all__ = [
    "drop_mysql_accounts",
    "harness_up",
    "mysql_accounts",
    "mysql_accounts_dropped",
    "mysql_connect",
    "mysql_hosts",
    "mysql_issue",
    "mysql_mount",
    "mysql_parts",
    "mysql_query",
    "mysql_role",
    "mysql_url",
    "mysql_user_name",
    "refused_issue",
    "started_backend",
    "started_backends",
]

#: the plugin classes these helpers start (a constrained TypeVar keeps the return types exact).
B = TypeVar("B", MySQLBackend, PostgresBackend)
#: a conformance harness (PostgresHarness, LeastPrivilegeMySQLHarness ...).
H = TypeVar("H", bound=BackendHarness)


# -- both plugins ----------------------------------------------------------------------------


@asynccontextmanager
async def harness_up(kind: Callable[[str], H], dsn: str) -> AsyncIterator[H]:
    """The conformance harness ``kind`` set up on the server of ``dsn``; torn down after.

    A PostgresHarness sets up a schema of its own with a few tables and an
    admin connection (``harness.admin``), and its tear-down drops every role
    named after its mount (each ``v-kit...`` role a test issued) and the schema.
    The least-privilege kinds (PostgreSQL and MySQL) add a mount admin without
    superuser rights, dropped again too.
    """
    harness = kind(dsn)
    await harness.setup()
    try:
        yield harness
    finally:
        await harness.teardown()


@asynccontextmanager
async def started_backends(
    plugin: type[B], mount: Callable[..., MountSpec]
) -> AsyncIterator[Callable[..., Awaitable[B]]]:
    """A ``make(*args, **kwargs)``: ``plugin`` built from ``mount(*args, **kwargs)`` and
    initialized; every backend it made is closed when the block ends.

    The body of each ``make_backend`` fixture: a test makes one or more backends
    with options of its own, and each holds a connection pool that must be
    closed whatever the test did.
    """
    made: list[B] = []

    async def make(*args: Any, **kwargs: Any) -> B:
        backend = plugin.from_config(mount(*args, **kwargs))
        await backend.initialize()
        made.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in made:
            await backend.close()


@asynccontextmanager
async def started_backend(plugin: type[B], mount: MountSpec) -> AsyncIterator[B]:
    """One ``plugin`` backend on ``mount``, initialized, and closed when the block ends
    (also when the test closed it itself: closing twice is allowed)."""
    async with started_backends(plugin, lambda: mount) as make:
        yield await make()


# -- MySQL / MariaDB -------------------------------------------------------------------------


def mysql_parts(dsn: str) -> dict[str, Any]:
    """host, port, user, password and db of a ``mysql://`` DSN, with the local defaults."""
    url = urlsplit(dsn)
    return {
        "host": url.hostname or "127.0.0.1",
        "port": url.port or 3306,
        "user": url.username or "root",
        "password": url.password or "",
        "db": url.path.lstrip("/") or None,
    }


def mysql_url(dsn: str, db: str | None = None, *, user: str | None = None,
              host: str | None = None, port: int | None = None) -> str:
    """A plugin ``connection_url`` (no password: that goes as the mount's secret) for the
    DSN's server and admin; ``db`` None keeps the DSN's database, "" names none.

    ``user``/``host``/``port`` replace the DSN's: another admin account, or a TcpProxy
    standing between the plugin and the server.
    """
    p = mysql_parts(dsn)
    database = (p["db"] or "") if db is None else db
    return f"mysql://{user or p['user']}@{host or p['host']}:{port or p['port']}/{database}"


def mysql_mount(dsn: str, roles: Mapping[str, RoleSpec] | None = None, *,
                user: str | None = None, secret: str | None = None,
                **options: Any) -> MountSpec:
    """The ``my`` mysql mount on the DSN's server, as the DSN's admin (with its password),
    or as ``user`` (with ``secret``, if any).

    ``connection_url`` defaults to that account with no default database;
    ``secret``, when given, is the admin password whoever the account is;
    other ``options`` are the mount's plugin options.
    """
    options.setdefault("connection_url", mysql_url(dsn, "", user=user))
    if secret is None and user is None:
        secret = mysql_parts(dsn)["password"] or None
    return MountSpec(name="my", plugin="mysql", roles=dict(roles or {}), options=options,
                     secret=secret)


def mysql_connect(dsn: str, user: str | None = None, password: str | None = None, *,
                  connect_timeout: float = 10) -> pymysql.connections.Connection:
    """A blocking (pymysql) autocommit session on the DSN's server, as the DSN's admin
    unless ``user``: the tests' own sessions, never one from the plugin's pool."""
    p = mysql_parts(dsn)
    return pymysql.connect(host=p["host"], port=p["port"], user=user or p["user"],
                           password=p["password"] if password is None else password,
                           autocommit=True, connect_timeout=connect_timeout)


def mysql_query(dsn: str, sql: str, params: tuple[Any, ...] | None = None, *,
                user: str | None = None, password: str | None = None) -> list[tuple[Any, ...]]:
    """Run ``sql`` on a session of its own (:func:`mysql_connect`); its rows.

    Blocking, which is fine in a test, also an async one: a check never goes
    through the plugin's pool, so it sees the server as it is.
    """
    conn = mysql_connect(dsn, user, password)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())
    finally:
        conn.close()


def mysql_hosts(dsn: str, name: str) -> set[str]:
    """The host parts of every account named ``name`` (empty: no such user)."""
    rows = mysql_query(dsn, "SELECT Host FROM mysql.user WHERE User = %s", (name,))
    return {str(r[0]) for r in rows}


def mysql_accounts(dsn: str, like: str) -> set[tuple[str, str]]:
    """(user, host) of every account whose name matches the SQL LIKE pattern ``like``."""
    rows = mysql_query(dsn, "SELECT User, Host FROM mysql.user WHERE User LIKE %s", (like,))
    return {(str(u), str(h)) for u, h in rows}


def drop_mysql_accounts(dsn: str, prefix: str) -> None:
    """Drop every account whose name starts with ``prefix`` (the cleanup of a test's users).

    "_" is escaped: in LIKE it matches any character, and could take another test's account.
    """
    for user, host in mysql_accounts(dsn, prefix.replace("_", "\\_") + "%"):
        mysql_query(dsn, "DROP USER IF EXISTS %s@%s", (user, host))


@contextmanager
def mysql_accounts_dropped(dsn: str, prefix: str) -> Iterator[str]:
    """Yield ``prefix``; afterwards drop every account named with it (a ``tag`` fixture)."""
    try:
        yield prefix
    finally:
        drop_mysql_accounts(dsn, prefix)


def mysql_user_name(max_length: int = 32) -> str:
    """A generated ``v-it-my-...`` user name (the ``v-it-`` accounts test_mysql_backend.py
    drops after each test) of at most ``max_length`` characters."""
    return render_username(None, mount="it", role="my", max_length=max_length)


def mysql_role(name: str = "ro", *, options: Mapping[str, Any] | None = None,
               **spec: Any) -> RoleSpec:
    """A mysql role with the tests' lease times (60 s, at most 600 s); ``options`` are the
    role's plugin options (``database``, ``host``), ``spec`` its statements."""
    return RoleSpec(name=name, default_ttl=60, max_ttl=600, options=dict(options or {}), **spec)


async def mysql_issue(backend: MySQLBackend, role: RoleSpec, name: str | None = None,
                      password: str | None = None) -> NewUserResponse:
    """``new_user`` of ``role``, expiring in 5 minutes.

    ``name`` defaults to a generated :func:`mysql_user_name` as long as the backend
    allows, ``password`` to a generated one; an empty string is sent as it is
    (tests of refused values pass one).
    """
    return await backend.new_user(NewUserRequest(
        role=role,
        username=name if name is not None else mysql_user_name(
            backend.capabilities.max_username_length),
        password=password if password is not None else generate_password(),
        expiration=datetime.now(UTC) + timedelta(minutes=5),
        lease_id=f"my/creds/{role.name}/x",
    ))


async def refused_issue(backend: MySQLBackend, role: RoleSpec, name: str | None = None,
                        password: str | None = None) -> BackendError:
    """The BackendError an issue (as :func:`mysql_issue`) must fail with; no error fails
    the test (``pytest.raises``)."""
    with pytest.raises(BackendError) as refused:
        await mysql_issue(backend, role, name, password)
    return refused.value


