"""The MySQL/MariaDB plugin against a real server: issue, use, renew, revoke, refuse."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import socket
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, NamedTuple

import aiomysql
import pymysql
import pytest

from broker.backend import (
    Backend,
    BackendError,
    DeleteUserRequest,
    MountSpec,
    NewUserResponse,
    PluginConfigError,
    RenewUserRequest,
    RoleSpec,
    RotateRootRequest,
    load_plugin,
)
from broker.templating import generate_password, render_username
from plugins.mysql import MySQLBackend
from tests.conformance.mysql_harness import LeastPrivilegeMySQLHarness
from tests.integration.broker_harness import TcpProxy
from tests.integration.db_fixtures import (
    drop_mysql_accounts,
    harness_up,
    mysql_issue,
    mysql_mount,
    mysql_parts,
    mysql_role,
    mysql_url,
    mysql_user_name,
    started_backend,
    started_backends,
)

pytestmark = pytest.mark.integration

Admin = Callable[[str], Awaitable[list[tuple[Any, ...]]]]
MakeBackend = Callable[..., Awaitable[MySQLBackend]]


async def _connect_as(dsn: str, user: str, password: str, db: str | None) -> aiomysql.Connection:
    p = mysql_parts(dsn)
    return await aiomysql.connect(
        host=p["host"], port=p["port"], user=user, password=password, db=db, autocommit=True,
        connect_timeout=5,
    )


@pytest.fixture
async def admin(mysql_dsn: str) -> AsyncIterator[Admin]:
    """Run SQL as the admin: a separate connection, not the plugin's pool."""
    p = mysql_parts(mysql_dsn)
    conn = await aiomysql.connect(
        host=p["host"], port=p["port"], user=p["user"], password=p["password"], autocommit=True
    )

    async def run(sql: str) -> list[tuple[Any, ...]]:
        async with conn.cursor() as cur:
            await cur.execute(sql)
            return list(await cur.fetchall())

    try:
        yield run
    finally:
        conn.close()


@pytest.fixture
async def database(admin: Admin) -> AsyncIterator[str]:
    """A throwaway database with one table holding one row."""
    db = f"broker_it_{secrets.token_hex(4)}"
    await admin(f"CREATE DATABASE `{db}`")
    await admin(f"CREATE TABLE `{db}`.items (id INT PRIMARY KEY, label VARCHAR(20))")
    await admin(f"INSERT INTO `{db}`.items VALUES (1, 'one')")
    await admin(f"CREATE TABLE `{db}`.revlog (username VARCHAR(80))")
    try:
        yield db
    finally:
        await admin(f"DROP DATABASE IF EXISTS `{db}`")


@pytest.fixture
async def make_backend(mysql_dsn: str) -> AsyncIterator[MakeBackend]:
    """``make(roles, **options)``: an initialized backend of the ``my`` mount on the DSN's
    database; every backend closed and every ``v-it-`` user dropped afterwards."""
    mount = partial(mysql_mount, mysql_dsn, connection_url=mysql_url(mysql_dsn))
    async with started_backends(MySQLBackend, mount) as make:
        yield make
    drop_mysql_accounts(mysql_dsn, "v-it-")


class Issued(NamedTuple):
    """One user of the default role, and the backend that issued it."""

    role: RoleSpec
    backend: MySQLBackend
    response: NewUserResponse


@pytest.fixture
async def issued(make_backend: MakeBackend, database: str) -> Issued:
    """What most tests here start from: the default role (SELECT on ``database``), a
    backend of a mount with that role, and one user it issued."""
    role = mysql_role(options={"database": database})
    backend = await make_backend({"ro": role})
    return Issued(role, backend, await mysql_issue(backend, role))


async def _users(admin: Admin, name: str) -> list[str]:
    return [str(r[0]) for r in await admin(f"SELECT Host FROM mysql.user WHERE User = '{name}'")]


async def test_entry_point_and_protocol(make_backend: MakeBackend) -> None:
    """The mysql entry point loads this class and an instance satisfies the Backend protocol."""
    assert load_plugin("mysql") is MySQLBackend
    backend = await make_backend()
    assert isinstance(backend, Backend)
    caps = backend.capabilities
    assert (caps.can_renew, caps.can_revoke, caps.server_side_expiry) == (False, True, False)
    assert caps.max_username_length == 32
    assert dict(caps.env_names) == {"username": "MYSQL_USER", "password": "MYSQL_PWD"}
    await backend.verify()


async def test_issue_select_but_not_write(
    issued: Issued, database: str, mysql_dsn: str, admin: Admin,
) -> None:
    """The default role can SELECT from its one database and nothing more."""
    resp = issued.response
    user, pw = resp.data["username"], resp.data["password"]
    assert set(resp.data) == {"username", "password"}
    assert resp.revocation == {"host": "%"}
    conn = await _connect_as(mysql_dsn, user, pw, database)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT label FROM items WHERE id = 1")
            assert await cur.fetchall() == (("one",),)
            with pytest.raises(pymysql.err.OperationalError) as denied:
                await cur.execute("INSERT INTO items VALUES (2, 'two')")
            assert denied.value.args[0] == 1142  # command denied
    finally:
        conn.close()
    grants = " ".join(str(r[0]) for r in await admin(f"SHOW GRANTS FOR '{user}'@'%'"))
    # "_" escaped: a database-level GRANT reads it as a wildcard otherwise.
    assert f"GRANT SELECT ON `{database}`.*".replace("_", "\\_") in grants
    assert "ALL PRIVILEGES" not in grants


async def test_renew_keeps_the_user_working(
    issued: Issued, database: str, mysql_dsn: str,
) -> None:
    """renew_user (nothing to push) returns the requested expiration; the login still works."""
    role, backend, resp = issued
    later = datetime.now(UTC) + timedelta(hours=1, minutes=5)
    renewed = await backend.renew_user(RenewUserRequest(
        role=role, username=resp.data["username"], revocation=resp.revocation, expiration=later))
    assert renewed.expiration == later
    conn = await _connect_as(mysql_dsn, resp.data["username"], resp.data["password"], database)
    conn.close()


async def test_revoke_kills_open_session(
    issued: Issued, database: str, mysql_dsn: str, admin: Admin,
) -> None:
    """An open connection of the user is dead after delete_user, and the user is gone."""
    role, backend, resp = issued
    user, pw = resp.data["username"], resp.data["password"]
    conn = await _connect_as(mysql_dsn, user, pw, database)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT 1")
        await backend.delete_user(DeleteUserRequest(
            role=role, username=user, revocation={"username": user, **resp.revocation}))
        with pytest.raises((pymysql.err.OperationalError, pymysql.err.InterfaceError)):
            async with conn.cursor() as cur:
                await cur.execute("SELECT label FROM items")
    finally:
        conn.close()
    assert await _users(admin, user) == []
    rows = await admin(
        f"SELECT ID FROM information_schema.PROCESSLIST WHERE USER = '{user}' "
        "AND COMMAND <> 'Killed'")
    assert rows == []
    with pytest.raises(pymysql.err.OperationalError) as denied:
        await _connect_as(mysql_dsn, user, pw, database)
    # 1698: MariaDB fakes a random auth plugin for unknown users, so either denial may come.
    assert denied.value.args[0] in {1045, 1698}


async def test_revoke_kills_a_session_in_a_long_query(
    issued: Issued, database: str, mysql_dsn: str,
) -> None:
    """A session busy in a running query is killed too, not only idle ones."""
    role, backend, resp = issued
    user, pw = resp.data["username"], resp.data["password"]
    conn = await _connect_as(mysql_dsn, user, pw, database)

    async def sleeper() -> None:
        async with conn.cursor() as cur:
            await cur.execute("SELECT SLEEP(30)")
            await cur.fetchall()
            await cur.execute("SELECT 1")

    task = asyncio.create_task(sleeper())
    try:
        await asyncio.sleep(0.5)
        await backend.delete_user(DeleteUserRequest(
            role=role, username=user, revocation=resp.revocation))
        with pytest.raises((pymysql.err.OperationalError, pymysql.err.InterfaceError)):
            await asyncio.wait_for(task, 10)
    finally:
        conn.close()


async def test_custom_revocation_statements_run_after_kill(
    make_backend: MakeBackend, database: str, admin: Admin,
) -> None:
    """revocation_statements run, and the user is still dropped afterwards."""
    role = mysql_role(options={"database": database}, revocation_statements=(
        f"INSERT INTO `{database}`.revlog VALUES ('{{{{name}}}}')",))
    backend = await make_backend({"ro": role})
    resp = await mysql_issue(backend, role)
    user = resp.data["username"]
    await backend.delete_user(DeleteUserRequest(role=role, username=user,
                                                revocation=resp.revocation))
    assert await admin(f"SELECT username FROM `{database}`.revlog") == [(user,)]
    assert await _users(admin, user) == []


async def test_delete_is_idempotent(issued: Issued, admin: Admin) -> None:
    """Deleting twice, or deleting a user that never existed, succeeds."""
    role, backend, resp = issued
    user = resp.data["username"]
    req = DeleteUserRequest(role=role, username=user, revocation=resp.revocation)
    await backend.delete_user(req)
    await backend.delete_user(req)
    await backend.delete_user(DeleteUserRequest(role=None, username=mysql_user_name(),
                                                revocation={}))
    assert await _users(admin, user) == []


async def test_delete_finds_every_host(
    make_backend: MakeBackend, database: str, admin: Admin,
) -> None:
    """A user created under another host part by custom statements is still dropped."""
    role = mysql_role(options={"database": database}, creation_statements=(
        "CREATE USER '{{name}}'@'10.9.8.7' IDENTIFIED BY '{{password}}'",
        "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'",
    ))
    backend = await make_backend({"ro": role})
    resp = await mysql_issue(backend, role)
    user = resp.data["username"]
    assert sorted(await _users(admin, user)) == ["%", "10.9.8.7"]
    await backend.delete_user(DeleteUserRequest(role=None, username=user, revocation={}))
    assert await _users(admin, user) == []


async def test_role_host_option(
    make_backend: MakeBackend, database: str, admin: Admin,
) -> None:
    """A role's host option becomes the account's host part and its revocation data."""
    role = mysql_role(options={"database": database, "host": "127.0.0.1"})
    backend = await make_backend({"ro": role}, host="10.0.0.%")
    resp = await mysql_issue(backend, role)
    user = resp.data["username"]
    assert resp.revocation == {"host": "127.0.0.1"}
    assert await _users(admin, user) == ["127.0.0.1"]
    await backend.delete_user(DeleteUserRequest(role=role, username=user,
                                                revocation=resp.revocation))
    assert await _users(admin, user) == []


async def test_thirty_concurrent_issues(
    make_backend: MakeBackend, database: str, admin: Admin,
) -> None:
    """30 concurrent new_user calls of one role all succeed through a pool of 4."""
    role = mysql_role(options={"database": database})
    backend = await make_backend({"ro": role})
    results = await asyncio.gather(*(mysql_issue(backend, role) for _ in range(30)))
    names = {r.data["username"] for r in results}
    assert len(names) == 30
    rows = await admin("SELECT COUNT(*) FROM mysql.user WHERE User LIKE 'v-it-%'")
    assert rows[0][0] >= 30
    await asyncio.gather(*(
        backend.delete_user(DeleteUserRequest(role=role, username=n, revocation={}))
        for n in names
    ))
    for n in names:
        assert await _users(admin, n) == []


@pytest.mark.parametrize("limit", [16, 32])
async def test_username_limit_honoured(
    make_backend: MakeBackend, database: str, admin: Admin,
    limit: int,
) -> None:
    """A name of exactly username_max_length works; one character more is refused unsent."""
    role = mysql_role(options={"database": database})
    options = {} if limit == 32 else {"username_max_length": limit}
    backend = await make_backend({"ro": role}, **options)
    assert backend.capabilities.max_username_length == limit
    fitting = ("v-it-" + secrets.token_hex(40))[:limit]
    resp = await mysql_issue(backend, role, name=fitting)
    assert await _users(admin, resp.data["username"]) == ["%"]
    too_long = ("v-it-" + secrets.token_hex(40))[: limit + 1]
    with pytest.raises(BackendError) as err:
        await mysql_issue(backend, role, name=too_long)
    assert err.value.retryable is False
    assert await _users(admin, too_long) == []
    generated = mysql_user_name(limit)
    assert len(generated) <= limit


@pytest.mark.parametrize("name", ["v-it-x'; DROP DATABASE test; --", "v-it-`x`", "V-IT-UPPER",
                                  "v-it-x\\", "", "v-it-x y"])
async def test_unquotable_username_refused(
    make_backend: MakeBackend, database: str, admin: Admin, name: str,
) -> None:
    """A username outside [a-z0-9_-] is refused before any SQL runs."""
    role = mysql_role(options={"database": database})
    backend = await make_backend({"ro": role})
    with pytest.raises(BackendError) as err:
        await mysql_issue(backend, role, name=name)
    assert err.value.retryable is False
    with pytest.raises(BackendError):
        await backend.delete_user(DeleteUserRequest(role=role, username=name, revocation={}))
    assert await admin("SELECT User FROM mysql.user WHERE User LIKE 'v-it-x%'") == []


@pytest.mark.parametrize("password", ["abc'def", "abc\\'; DROP USER root; --", "pass word", ""])
async def test_unquotable_password_refused(
    make_backend: MakeBackend, database: str, password: str,
) -> None:
    """A password that is not alphanumeric is refused, and not echoed in the error."""
    role = mysql_role(options={"database": database})
    backend = await make_backend({"ro": role})
    with pytest.raises(BackendError) as err:
        await mysql_issue(backend, role, password=password)
    assert err.value.retryable is False
    if password:
        assert password not in str(err.value)


async def test_password_never_in_error_text(
    make_backend: MakeBackend, database: str, admin: Admin,
) -> None:
    """A failing statement that echoes the password gives a redacted, non-retryable error."""
    role = mysql_role(options={"database": database}, creation_statements=(
        "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'",
        "GRANT SELEKT ON x TO '{{name}}'@'%' IDENTIFIED BY '{{password}}' oops",
    ))
    backend = await make_backend({"ro": role})
    password = generate_password()
    name = mysql_user_name()
    with pytest.raises(BackendError) as err:
        await mysql_issue(backend, role, name=name, password=password)
    text = "".join(traceback.format_exception(err.value))
    assert "1064" in str(err.value)  # the server's syntax error came through...
    assert password not in text  # ...but not the password it echoed
    assert password[:8] not in text and password[-8:] not in text
    assert err.value.retryable is False
    # The half-created user (first statement succeeded) was cleaned up.
    assert await _users(admin, name) == []


async def test_connection_error_is_retryable_and_redacted(mysql_dsn: str) -> None:
    """An unreachable server gives a retryable BackendError without the admin secret."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "Sup3rS3cretAdminPw"
    mount = mysql_mount(mysql_dsn, secret=secret,
                        connection_url=f"mysql://root@127.0.0.1:{port}/test")
    async with started_backend(MySQLBackend, mount) as backend:
        with pytest.raises(BackendError) as err:
            await backend.verify()
        assert err.value.retryable is True
        assert secret not in "".join(traceback.format_exception(err.value))


async def test_wrong_admin_password_is_retryable_and_redacted(mysql_dsn: str) -> None:
    """A refused admin login is a retryable connection error that hides the secret."""
    secret = "WrongAdminPassw0rd"
    mount = mysql_mount(mysql_dsn, user="v-it-nobody", secret=secret)
    async with started_backend(MySQLBackend, mount) as backend:
        with pytest.raises(BackendError) as err:
            await backend.verify()
        assert err.value.retryable is True
        assert "1045" in str(err.value)
        assert secret not in "".join(traceback.format_exception(err.value))


async def test_rotate_root(mysql_dsn: str, admin: Admin) -> None:
    """rotate_root changes the admin's own password; the old one stops working, the backend not."""
    user, old = f"v-it-admin{secrets.token_hex(3)}", generate_password()
    await admin(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{old}'")
    # A broker admin has CREATE USER anyway, and MariaDB wants it for ALTER USER.
    await admin(f"GRANT CREATE USER ON *.* TO '{user}'@'%'")
    try:
        async with started_backend(MySQLBackend,
                                   mysql_mount(mysql_dsn, user=user, secret=old)) as backend:
            await backend.verify()
            resp = await backend.rotate_root(RotateRootRequest())
            new = resp.new_password
            assert new and new != old
            await backend.verify()  # the fresh pool logs in with the new password
            conn = await _connect_as(mysql_dsn, user, new, None)
            conn.close()
            with pytest.raises(pymysql.err.OperationalError):
                await _connect_as(mysql_dsn, user, old, None)
    finally:
        await admin(f"DROP USER IF EXISTS '{user}'@'%'")


async def test_uninitialized_backend_is_a_retryable_error(mysql_dsn: str) -> None:
    """Calls before initialize() raise BackendError instead of crashing."""
    backend = MySQLBackend.from_config(MountSpec(
        name="my", plugin="mysql", roles={}, options={"connection_url": mysql_url(mysql_dsn)}))
    with pytest.raises(BackendError) as err:
        await backend.verify()
    assert err.value.retryable is True


# -- configuration (no server needed, but cheap enough to keep beside the rest) ------------


def _mount(roles: dict[str, RoleSpec] | None = None, **options: Any) -> MountSpec:
    options.setdefault("connection_url", "mysql://admin@db:3306/app")
    return MountSpec(name="my", plugin="mysql", roles=roles or {}, options=options)


@pytest.mark.parametrize(("options", "key"), [
    ({"username_max_length": 7}, "username_max_length"),
    ({"username_max_length": 81}, "username_max_length"),
    ({"username_max_length": "32"}, "username_max_length"),
    ({"max_open_connections": 0}, "max_open_connections"),
    ({"connection_url": "mysql://admin:pw@db:3306/app"}, "connection_url"),
    ({"connection_url": "postgresql://admin@db/app"}, "connection_url"),
    ({"connection_url": "mysql://db:3306/app"}, "connection_url"),
    ({"connection_url": "mysql://admin@db/ap`p"}, "connection_url"),
    ({"host": "x'y"}, "host"),
    ({"password": "x"}, "password"),
])
def test_from_config_refuses(options: dict[str, Any], key: str) -> None:
    """Bad mount options are a PluginConfigError naming the key."""
    with pytest.raises(PluginConfigError) as err:
        MySQLBackend.from_config(_mount(**options))
    assert err.value.key == key


def test_from_config_defaults() -> None:
    """Defaults: 32-character usernames; 16 and 80 are accepted."""
    assert MySQLBackend.from_config(_mount()).capabilities.max_username_length == 32
    for limit in (16, 80):
        caps = MySQLBackend.from_config(_mount(username_max_length=limit)).capabilities
        assert caps.max_username_length == limit


def test_default_role_needs_a_database() -> None:
    """A role on default statements with no database anywhere is refused at load."""
    with pytest.raises(PluginConfigError) as err:
        MySQLBackend.from_config(_mount({"ro": mysql_role()}, connection_url="mysql://admin@db"))
    assert err.value.key == "roles.ro.database"
    MySQLBackend.from_config(_mount({"ro": mysql_role(options={"database": "app"})},
                                    connection_url="mysql://admin@db"))


@pytest.mark.parametrize("stmt", [
    "GRANT ALL ON *.* TO '{{name}}'@'%'",
    "grant all privileges on *.* to '{{name}}'@'%'",
    "GRANT ALL PRIVILEGES ON `*`.`*` TO '{{name}}'@'%' WITH GRANT OPTION",
])
def test_grant_all_on_everything_refused(stmt: str) -> None:
    """A creation statement granting ALL ON *.* is refused with the reason."""
    role = mysql_role(creation_statements=(
        "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'", stmt))
    with pytest.raises(PluginConfigError) as err:
        MySQLBackend.validate_role(role)
    assert "server administrator" in err.value.message
    assert err.value.key == "roles.ro.creation_statements[1]"


def test_grant_all_on_one_database_allowed() -> None:
    """ALL on one database is the operator's choice and is accepted."""
    MySQLBackend.validate_role(mysql_role(creation_statements=(
        "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'",
        "GRANT ALL ON `app`.* TO '{{name}}'@'%'",
    )))


@pytest.mark.parametrize(("role", "key"), [
    (mysql_role(options={"database": "a`b"}), "roles.ro.database"),
    (mysql_role(options={"database": "a'b"}), "roles.ro.database"),
    (mysql_role(options={"host": "%' OR '1"}), "roles.ro.host"),
    (mysql_role(options={"schema": "x"}), "roles.ro.schema"),
    (mysql_role(creation_statements=("GRANT SELECT ON app.* TO someone",)),
     "roles.ro.creation_statements"),
    (mysql_role(revocation_statements=("SELECT '{{password}}'",)),
     "roles.ro.revocation_statements"),
    (mysql_role(renew_statements=("SELECT '{{name}}'",)), "roles.ro.renew_statements"),
    (mysql_role(rollback_statements=("SELECT '{{expiration}}'",)), "roles.ro.rollback_statements"),
])
def test_validate_role_refuses(role: RoleSpec, key: str) -> None:
    """Unquotable names, unknown options and impossible templates are refused at load."""
    with pytest.raises(PluginConfigError) as err:
        MySQLBackend.validate_role(role)
    assert err.value.key == key


async def test_a_statement_cut_off_by_the_timeout_is_ended_before_the_rollback(
    make_backend: MakeBackend, database: str, admin: Admin,
) -> None:
    """A creation cut off mid-statement goes on on the server; the rollback ends it first.

    Closing a connection does not stop the statement it runs. ``DO SLEEP(5)``
    stands in for a ``CREATE USER`` held up (by a lock, say): the rollback's
    revocation must kill that session and wait for it, not leave it running
    behind a DROP that found nothing to drop.
    """
    role = mysql_role("slow", options={"database": database}, creation_statements=(
        "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'", "DO SLEEP(5)"))
    backend = await make_backend({"slow": role})
    name = mysql_user_name(backend.capabilities.max_username_length)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(mysql_issue(backend, role, name), 1)  # the broker's backend timeout
    await _rollback_ends_the_sleeping_statement(backend, role, name, admin)


async def _rollback_ends_the_sleeping_statement(backend: MySQLBackend, role: RoleSpec,
                                                name: str, admin: Admin) -> None:
    """The cut-off ``DO SLEEP(5)`` still runs; the rollback ends it at once and drops the user."""
    sleeping = await admin("SELECT ID FROM information_schema.PROCESSLIST"
                           " WHERE INFO = 'DO SLEEP(5)'")
    assert sleeping, "the cut-off statement should still be running on the server"
    await backend.delete_user(DeleteUserRequest(role=role, username=name, revocation={},
                                                reason="rollback"))
    # Gone at once, not after the rest of its 5 s.
    assert await admin("SELECT ID FROM information_schema.PROCESSLIST"
                       f" WHERE ID = {int(sleeping[0][0])}") == []
    assert await _users(admin, name) == []


async def test_a_statement_whose_connection_is_lost_is_ended_before_the_rollback(
    make_backend: MakeBackend, database: str, admin: Admin,
    mysql_dsn: str,
) -> None:
    """As above, but the connection breaks (a proxy cuts it) instead of the call timing out.

    Before, only a cancelled statement was recorded for settling: one whose
    connection was lost came back as a BackendError, went unrecorded, and
    the rollback left it running behind a DROP that found nothing to drop.
    """
    role = mysql_role("slow", options={"database": database}, creation_statements=(
        "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'", "DO SLEEP(5)"))
    proxy = TcpProxy(mysql_parts(mysql_dsn)["port"])
    try:
        backend = await make_backend({"slow": role},
                                     connection_url=mysql_url(mysql_dsn, port=proxy.port))
        name = mysql_user_name(backend.capabilities.max_username_length)
        proxy.cut_on = (b"DO SLEEP(5)", "after")
        with pytest.raises(BackendError, match="Lost connection"):
            await mysql_issue(backend, role, name)
        await _rollback_ends_the_sleeping_statement(backend, role, name, admin)
    finally:
        await asyncio.to_thread(proxy.close)


async def test_a_session_dropped_before_a_server_restart_is_forgotten_not_killed(
    make_backend: MakeBackend, mysql_dsn: str, admin: Admin,
) -> None:
    """Thread ids start again from 1 when the server restarts.

    A dropped session recorded before the server (re)started died with the
    old server; its id may name a live connection now, which the revocation
    must leave alone. The same id recorded under the running server is ended.
    """
    backend = await make_backend()
    p = mysql_parts(mysql_dsn)
    bystander = await aiomysql.connect(host=p["host"], port=p["port"], user=p["user"],
                                       password=p["password"], autocommit=True)
    try:
        thread_id = bystander.thread_id()
        uptime = int((await admin("SHOW GLOBAL STATUS LIKE 'Uptime'"))[0][1])
        loop = asyncio.get_running_loop()
        backend._unsettled[thread_id] = loop.time() - uptime - 5  # under the previous server
        await backend.delete_user(DeleteUserRequest(role=None, username=mysql_user_name(),
                                                    revocation={}))
        assert backend._unsettled == {}
        async with bystander.cursor() as cur:
            await cur.execute("SELECT 1")
            assert await cur.fetchone() == (1,)

        backend._unsettled[thread_id] = loop.time()  # under this server: its session is ended
        await backend.delete_user(DeleteUserRequest(role=None, username=mysql_user_name(),
                                                    revocation={}))
        assert backend._unsettled == {}
        assert await admin(f"SELECT ID FROM information_schema.PROCESSLIST"
                           f" WHERE ID = {thread_id:d}") == []
    finally:
        bystander.close()


async def test_a_least_privilege_admin_ends_a_statement_it_cut_off(
    mysql_dsn: str, admin: Admin,
) -> None:
    """The settle step works for the admin docs/plugins.md describes (no root, no SUPER).

    Issuing and revoking as that admin is the conformance suite's
    (``mysql-least-privilege``); this is what only the plugin does on top: it
    ends its own statement cut off by the timeout before the rollback's DROP.
    """
    async with harness_up(LeastPrivilegeMySQLHarness, mysql_dsn) as harness:
        slow = mysql_role("slow", options={"database": harness.database}, creation_statements=(
            "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'", "DO SLEEP(5)"))
        mount = harness.make_mount()
        mount = dataclasses.replace(mount, roles={**mount.roles, "slow": slow})
        async with started_backend(MySQLBackend, mount) as backend:
            # Named after the harness's mount: its teardown drops it if we fail.
            cut = render_username(None, mount=harness.mount_name, role="slow",
                                  max_length=backend.capabilities.max_username_length)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(mysql_issue(backend, slow, cut), 1)
            sleeping = "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO = 'DO SLEEP(5)'"
            assert await admin(sleeping), "the cut-off statement should still be running"
            await backend.delete_user(DeleteUserRequest(role=slow, username=cut, revocation={},
                                                        reason="rollback"))
            assert await admin(sleeping) == []
            assert await _users(admin, cut) == []


# -- review fixes ----------------------------------------------------------------------------

# Vault's MySQL revocation statement: operators migrating from Vault copy it.
_VAULT_REVOKE = "REVOKE ALL PRIVILEGES, GRANT OPTION FROM '{{name}}'@'%'"


async def test_custom_revocation_of_a_user_dropped_by_hand_is_success(
    make_backend: MakeBackend, database: str, admin: Admin,
    mysql_dsn: str,
) -> None:
    """A user already gone is revoked (its open session still killed), custom statements or not.

    Vault-style ``REVOKE ... FROM`` failed for a missing user (error 1269) on
    every retry, so the lease ended irrevocable.
    """
    role = mysql_role(options={"database": database}, revocation_statements=(_VAULT_REVOKE,))
    backend = await make_backend({"ro": role})
    resp = await mysql_issue(backend, role)
    user = resp.data["username"]
    session = await _connect_as(mysql_dsn, user, resp.data["password"], database)
    try:
        await admin(f"DROP USER '{user}'@'%'")  # by hand; its session lives on
        req = DeleteUserRequest(role=role, username=user, revocation=resp.revocation)
        await backend.delete_user(req)
        await backend.delete_user(req)
        with pytest.raises((pymysql.err.OperationalError, pymysql.err.InterfaceError)):
            async with session.cursor() as cur:
                await cur.execute("SELECT 1")
    finally:
        session.close()
    assert await _users(admin, user) == []


async def test_rollback_after_a_failed_creation_with_custom_rollback_statements(
    make_backend: MakeBackend, database: str, admin: Admin,
) -> None:
    """A creation that fails after CREATE USER drops the user; the engine's rollback
    (``rollback_statements`` in Vault's style) then succeeds instead of failing forever."""
    role = mysql_role(options={"database": database}, creation_statements=(
        "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'",
        f"GRANT SELECT ON `{database}`.no_such_table TO '{{{{name}}}}'@'%'",
    ), rollback_statements=(_VAULT_REVOKE,))
    backend = await make_backend({"ro": role})
    name = mysql_user_name()
    with pytest.raises(BackendError) as failed:
        await mysql_issue(backend, role, name)
    assert not failed.value.created_nothing  # so the engine calls delete_user
    await backend.delete_user(DeleteUserRequest(role=role, username=name, revocation={},
                                                reason="rollback"))
    assert await _users(admin, name) == []


async def test_default_grant_is_not_a_wildcard_over_similar_databases(
    make_backend: MakeBackend, database: str, admin: Admin,
    mysql_dsn: str,
) -> None:
    """GRANT ON `broker_it_x`.* treats "_" as a wildcard: it also opened `brokerZitZx`."""
    assert "_" in database
    sibling = database.replace("_", "z")
    await admin(f"CREATE DATABASE `{sibling}`")
    try:
        await admin(f"CREATE TABLE `{sibling}`.secret (v INT)")
        await admin(f"INSERT INTO `{sibling}`.secret VALUES (42)")
        role = mysql_role(options={"database": database})
        backend = await make_backend({"ro": role})
        resp = await mysql_issue(backend, role)
        conn = await _connect_as(mysql_dsn, resp.data["username"], resp.data["password"], None)
        try:
            async with conn.cursor() as cur:
                await cur.execute(f"SELECT label FROM `{database}`.items")  # its own: granted
                assert await cur.fetchall() == (("one",),)
                with pytest.raises(pymysql.err.OperationalError) as denied:
                    await cur.execute(f"SELECT v FROM `{sibling}`.secret")
                assert denied.value.args[0] == 1142
        finally:
            conn.close()
    finally:
        await admin(f"DROP DATABASE IF EXISTS `{sibling}`")


async def test_default_grant_works_for_the_documented_least_privilege_admin(
    mysql_dsn: str, admin: Admin,
) -> None:
    """The escaped GRANT is covered by the admin's plain ``GRANT SELECT ON app.* ... WITH
    GRANT OPTION`` of docs/plugins.md; the user reads its database and is revoked."""
    async with (harness_up(LeastPrivilegeMySQLHarness, mysql_dsn) as harness,
                started_backend(MySQLBackend, harness.make_mount()) as backend):
        role = mysql_role(options={"database": harness.database})
        name = render_username(None, mount=harness.mount_name, role="ro",
                               max_length=backend.capabilities.max_username_length)
        resp = await mysql_issue(backend, role, name)
        session = await harness.connect_as(resp.data)
        await harness.exercise(session)
        await backend.delete_user(DeleteUserRequest(role=role, username=name,
                                                    revocation=resp.revocation))
        assert not await harness.session_alive(session)
        await harness.close_session(session)
        assert await _users(admin, name) == []


async def _until_no_sessions(admin: Admin, user: str, timeout: float = 10.0) -> None:
    """Wait until the server lists no connection of ``user`` (a closed one lingers briefly)."""
    deadline = time.monotonic() + timeout
    while (await admin("SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                       f"WHERE USER = '{user}'"))[0][0]:
        assert time.monotonic() < deadline, f"{user} still has sessions after {timeout}s"
        await asyncio.sleep(0.05)


async def test_rotate_root_never_loses_the_admin_password(mysql_dsn: str, admin: Admin) -> None:
    """The server takes the new password but the new login fails (here the account's
    MAX_USER_CONNECTIONS; on a busy server "too many connections"): the broker must
    still know a password that logs in, and the operator must learn it.

    The new password was dropped with the error: the old one was refused, the
    admin locked out once the pooled connections closed.
    """
    user, old = f"v-it-admin{secrets.token_hex(3)}", generate_password()
    await admin(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{old}' WITH MAX_USER_CONNECTIONS 1")
    await admin(f"GRANT CREATE USER ON *.* TO '{user}'@'%'")
    try:
        mount = mysql_mount(mysql_dsn, user=user, secret=old, max_open_connections=1)
        async with started_backend(MySQLBackend, mount) as backend:
            await backend.verify()  # the pool now holds the account's one connection
            try:
                current = (await backend.rotate_root(RotateRootRequest())).new_password
            except BackendError:
                current = old  # a failed rotation must leave the old password in force
            assert current
            await backend.close()
            # The account allows one connection, and the server counts a closed
            # one until it has processed the disconnect (error 1226 before that).
            await _until_no_sessions(admin, user)
            await backend.initialize()
            await backend.verify()  # the password the broker holds logs in
            await backend.close()
            await _until_no_sessions(admin, user)
            conn = await _connect_as(mysql_dsn, user, current, None)  # and the operator's
            conn.close()
    finally:
        await admin(f"DROP USER IF EXISTS '{user}'@'%'")
