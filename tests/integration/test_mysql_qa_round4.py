"""MySQL/MariaDB QA round 4, against a real server and a real broker.

- A name that exists already on any host (an account made by hand, or the
  mount's own admin picked through ``{{display_name}}``) is never issued: the
  lease's revocation locks, kills and drops every host of its name, so it
  would take the other account (before: a token whose display name was the
  admin's user name got an account of that name, and its revocation locked
  the admin out and killed its sessions).
- A revocation does not return while a killed session of the user is still
  ending (a large write rolling back, holding its locks).
- End to end through hvac: the credential logs in with exactly its grants,
  a query in flight dies with the revocation, a bad creation statement is a
  clear 400 that leaves no user, and no password reaches a log or audit line.

Every account these tests make is named ``qa4-...`` (or a test admin's
``qa4adm-...``) and is dropped afterwards; the server's root is never the
subject of a test.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiomysql
import hvac
import pymysql
import pytest
import requests

from broker.backend import (
    BackendError,
    DeleteUserRequest,
    RoleSpec,
)
from broker.templating import generate_password, render_username
from plugins.mysql import MySQLBackend
from tests.integration.broker_harness import (
    BrokerThread,
    TcpProxy,
    root_api,
    start_broker,
    write_config,
)
from tests.integration.db_fixtures import (
    drop_mysql_accounts,
    mysql_accounts_dropped,
    mysql_connect,
    mysql_hosts,
    mysql_issue,
    mysql_mount,
    mysql_parts,
    mysql_query,
    mysql_role,
    mysql_url,
    refused_issue,
    started_backend,
    started_backends,
)

pytestmark = pytest.mark.integration


def _sessions(dsn: str, name: str) -> list[tuple[Any, ...]]:
    return mysql_query(dsn, "SELECT ID, COMMAND FROM information_schema.PROCESSLIST"
                            " WHERE USER = %s", (name,))


def _logs_in(dsn: str, user: str, password: str) -> bool:
    try:
        mysql_query(dsn, "SELECT 1", user=user, password=password)
    except pymysql.err.OperationalError:
        return False
    return True


@pytest.fixture
def tag(mysql_dsn: str) -> Iterator[str]:
    """A fresh ``qa4-XXXXXX`` name prefix; its accounts are dropped afterwards."""
    with mysql_accounts_dropped(mysql_dsn, f"qa4-{secrets.token_hex(3)}") as prefix:
        yield prefix


@pytest.fixture
def database(mysql_dsn: str) -> Iterator[str]:
    """A throwaway database with a table ``t`` holding one row."""
    db = f"qa4_{secrets.token_hex(4)}"
    mysql_query(mysql_dsn, f"CREATE DATABASE `{db}`")
    mysql_query(mysql_dsn, f"CREATE TABLE `{db}`.t (id INT, pad CHAR(200)) ENGINE=InnoDB")
    mysql_query(mysql_dsn, f"INSERT INTO `{db}`.t VALUES (1, 'one')")
    try:
        yield db
    finally:
        mysql_query(mysql_dsn, f"DROP DATABASE IF EXISTS `{db}`")


@pytest.fixture
def test_admin(mysql_dsn: str) -> Iterator[tuple[str, str]]:
    """An admin account of this test's own, on host 127.0.0.1 only: (user, password).

    Tests that make a broker pick the admin's own name use it, never the
    server's root: the code before this round locked and killed that admin.
    """
    user, password = f"qa4adm-{secrets.token_hex(3)}", generate_password()
    mysql_query(mysql_dsn, "CREATE USER %s@'127.0.0.1' IDENTIFIED BY %s", (user, password))
    mysql_query(mysql_dsn, f"GRANT ALL PRIVILEGES ON *.* TO '{user}'@'127.0.0.1' WITH GRANT OPTION")
    try:
        yield user, password
    finally:
        for (thread_id,) in mysql_query(mysql_dsn, "SELECT ID FROM information_schema.PROCESSLIST"
                                        " WHERE USER = %s", (user,)):
            try:
                mysql_query(mysql_dsn, f"KILL CONNECTION {int(thread_id)}")
            except pymysql.err.MySQLError:
                pass
        drop_mysql_accounts(mysql_dsn, user)


@pytest.fixture
async def make_backend(mysql_dsn: str) -> AsyncIterator[Callable[..., Awaitable[MySQLBackend]]]:
    """``make(roles, user=None, secret=None)``: an initialized backend of the ``my`` mount
    (as ``user`` with ``secret``, else as the DSN's admin), closed afterwards."""
    async with started_backends(MySQLBackend, partial(mysql_mount, mysql_dsn)) as make:
        yield make


def _role(db: str = "test", *creation: str) -> RoleSpec:
    """The ``qa`` role on database ``db``, made by the ``creation`` statements."""
    return mysql_role("qa", options={"database": db}, creation_statements=creation)


# -- 1. a name that exists already is not the lease's ------------------------------------------


async def test_a_name_existing_on_another_host_is_not_issued_nor_dropped(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
) -> None:
    """'n'@'localhost' made by hand: issuing 'n' (default role, host %) is refused, nothing
    made, and the hand-made account survives. Before: 'n'@'%' was made beside it, and the
    lease's revocation dropped the hand-made account too."""
    name = f"{tag}-fixed"
    mysql_query(mysql_dsn, "CREATE USER %s@'localhost' IDENTIFIED BY 'qaHandMade123'", (name,))
    role = _role()
    backend = await make_backend({"qa": role})
    try:
        resp = await mysql_issue(backend, role, name)
    except BackendError as exc:
        assert exc.created_nothing is True and exc.retryable is False
        assert f"'{name}'@'localhost' exists already" in str(exc), str(exc)
    else:  # the old code: the lease ends as leases do, and takes the other account along
        await backend.delete_user(DeleteUserRequest(role=role, username=name,
                                                    revocation=resp.revocation))
    assert mysql_hosts(mysql_dsn, name) == {"localhost"}



async def test_a_name_taken_only_with_an_odd_host_part_is_not_issued(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
) -> None:
    """'n'@'a b' (a host part the plugin does not quote for its own statements) made by
    hand: the name is still taken, so the issue is refused and the account survives.
    The lookup read such a name as "unknown" and issued it."""
    name = f"{tag}-odd"
    mysql_query(mysql_dsn, "CREATE USER %s@'a b' IDENTIFIED BY 'qaHandMade123'", (name,))
    role = _role()
    backend = await make_backend({"qa": role})
    try:
        err = await refused_issue(backend, role, name)
        assert err.created_nothing is True and "exists already" in str(err)
        assert mysql_hosts(mysql_dsn, name) == {"a b"}
    finally:
        mysql_query(mysql_dsn, "DROP USER IF EXISTS %s@'a b'", (name,))
        mysql_query(mysql_dsn, "DROP USER IF EXISTS %s@'%%'", (name,))


async def test_revocation_leaves_sessions_of_a_name_differing_in_case(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
) -> None:
    """Account names are case-sensitive, PROCESSLIST.USER compares without case: revoking
    lease user 'n' killed every session of a hand-made 'N' too (or of an admin 'N',
    the broker's own pool among them). Now only the lease's own sessions end."""
    name = f"{tag}-case"
    other, password = name.upper(), "qaHandMade123"
    mysql_query(mysql_dsn, "CREATE USER %s@'%%' IDENTIFIED BY %s", (other, password))
    held = mysql_connect(mysql_dsn, other, password, connect_timeout=5)
    role = _role()
    backend = await make_backend({"qa": role})
    try:
        resp = await mysql_issue(backend, role, name)
        await backend.delete_user(DeleteUserRequest(role=role, username=name,
                                                    revocation=resp.revocation))
        assert mysql_hosts(mysql_dsn, name) == set()
        with held.cursor() as cur:  # still there: not the lease's session
            cur.execute("SELECT 1")
            assert cur.fetchall() == ((1,),)
    finally:
        held.close()
        mysql_query(mysql_dsn, "DROP USER IF EXISTS %s@'%%'", (other,))


async def test_the_admins_own_name_is_never_issued_or_revoked(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str,
    test_admin: tuple[str, str],
) -> None:
    """The mount's admin (here 'adm'@'127.0.0.1') as a lease's name: the issue is refused,
    and a revocation of that name (a lease from before) refuses to lock, kill or drop it."""
    user, password = test_admin
    role = _role()
    backend = await make_backend({"qa": role}, user=user, secret=password)
    await backend.verify()
    err = await refused_issue(backend, role, user)
    assert err.created_nothing is True and err.retryable is False
    assert mysql_hosts(mysql_dsn, user) == {"127.0.0.1"}
    with pytest.raises(BackendError) as denied:
        await backend.delete_user(DeleteUserRequest(role=role, username=user,
                                                    revocation={"host": "%"}))
    assert denied.value.retryable is False
    assert mysql_hosts(mysql_dsn, user) == {"127.0.0.1"}
    assert _logs_in(mysql_dsn, user, password), "the admin account was locked"
    await backend.verify()


async def test_an_issue_that_never_reached_the_server_created_nothing(
    mysql_dsn: str, tag: str,
) -> None:
    """The server unreachable: the issue fails retryably and says it made nothing, so the
    engine's rollback does not go and drop every host of the name (before: unknown
    outcome, and the rollback dropped an account of that name made by hand)."""
    proxy = TcpProxy(mysql_parts(mysql_dsn)["port"])
    role = _role()
    mount = mysql_mount(mysql_dsn, {"qa": role},
                        connection_url=mysql_url(mysql_dsn, "", host="127.0.0.1", port=proxy.port))
    try:
        async with started_backend(MySQLBackend, mount) as backend:
            proxy.down()
            err = await refused_issue(backend, role, f"{tag}-down")
            assert err.retryable is True
            assert err.created_nothing is True, str(err)
    finally:
        proxy.close()


async def test_a_refused_revocation_statement_still_drops_the_user(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
) -> None:
    """A custom revocation statement the server refuses (a missing table): the revocation
    fails (the operator sees it) but the account is dropped anyway, so no locked account
    outlives the lease (before: locked and left, also after a revoke-force). The retry
    then succeeds: the user is gone, the statements are skipped."""
    role = mysql_role("qa", options={"database": "test"},
                      revocation_statements=("DELETE FROM test.qa4_no_such_table"
                                             " WHERE u = '{{name}}'",))
    backend = await make_backend({"qa": role})
    name, password = f"{tag}-revfail", generate_password()
    resp = await mysql_issue(backend, role, name, password)
    req = DeleteUserRequest(role=role, username=name, revocation=resp.revocation)
    with pytest.raises(BackendError) as err:
        await backend.delete_user(req)
    assert err.value.retryable is False
    assert "(1146)" in str(err.value) and "revocation_statements" in str(err.value)
    assert mysql_hosts(mysql_dsn, name) == set()
    assert not _logs_in(mysql_dsn, name, password)
    await backend.delete_user(req)  # the retry: success


# -- 2. revocation waits for a killed session to be gone ---------------------------------------


async def test_revocation_returns_only_once_a_killed_session_is_gone(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
    database: str,
) -> None:
    """A session killed in the middle of a large INSERT rolls back for seconds, holding its
    locks (PROCESSLIST: COMMAND 'Killed'). Before, the revocation returned meanwhile."""
    role = _role(database,
                 "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'",
                 "GRANT SELECT, INSERT ON `{{database}}`.* TO '{{name}}'@'%'")
    backend = await make_backend({"qa": role})
    name, password = f"{tag}-rollback", generate_password()
    resp = await mysql_issue(backend, role, name, password)
    p = mysql_parts(mysql_dsn)
    conn = await aiomysql.connect(host=p["host"], port=p["port"], user=name, password=password,
                                  db=database, autocommit=False)

    async def write() -> None:
        async with conn.cursor() as cur:
            await cur.execute("INSERT INTO t SELECT seq, REPEAT('x', 200)"
                              " FROM seq_1_to_2000000")

    task = asyncio.create_task(write())
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the INSERT has written a while
            rows = mysql_query(mysql_dsn, "SELECT TIME_MS FROM information_schema.PROCESSLIST"
                                          " WHERE USER = %s AND COMMAND = 'Query'", (name,))
            if rows and float(rows[0][0]) > 1000:
                break
            await asyncio.sleep(0.1)
        await backend.delete_user(DeleteUserRequest(role=role, username=name,
                                                    revocation=resp.revocation))
        assert _sessions(mysql_dsn, name) == [], "the revocation returned before the session ended"
        assert mysql_hosts(mysql_dsn, name) == set()
        with pytest.raises((pymysql.err.OperationalError, pymysql.err.InterfaceError)):
            await asyncio.wait_for(task, 30)
    finally:
        conn.close()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(150):  # let a rollback finish (30 s at most) before the db goes
            if not _sessions(mysql_dsn, name):
                break
            await asyncio.sleep(0.2)


# -- 3. end to end through a real broker and hvac -----------------------------------------------


@pytest.fixture
def broker(tmp_path: Path, mysql_dsn: str, database: str, tag: str,
           test_admin: tuple[str, str]) -> Iterator[BrokerThread]:
    """A broker whose mysql mount runs as the test's own admin (never the server's root)."""
    user, password = test_admin
    p = mysql_parts(mysql_dsn)
    (tmp_path / "my.pw").write_text(password)
    body = f"""
[mounts.my]
plugin = "mysql"
connection_url = "mysql://{user}@{p['host']}:{p['port']}/{database}"
password_file = "my.pw"

[mounts.my.roles.ro]
username_template = "{tag}-{{{{random 8}}}}"
default_ttl = "1h"
max_ttl = "2h"

[mounts.my.roles.short]
username_template = "{tag}-{{{{random 8}}}}"
default_ttl = "2s"
max_ttl = "1m"

[mounts.my.roles.dn]
username_template = "{{{{display_name}}}}"
default_ttl = "1h"

[mounts.my.roles.badsql]
username_template = "{tag}-{{{{random 8}}}}"
default_ttl = "1h"
creation_statements = [
  "CREATE USER '{{{{name}}}}'@'%' IDENTIFIED BY '{{{{password}}}}'",
  "GRANT SELEKT ON `{{{{database}}}}`.* TO '{{{{name}}}}'@'%'",
]
"""
    server = start_broker(write_config(tmp_path, body))
    try:
        yield server
    finally:
        root_api(server)("PUT", "sys/leases/revoke-prefix/my/", json={"sync": True})
        server.stop()


def test_hvac_credential_has_its_grants_and_a_query_in_flight_dies_with_the_revoke(
        broker: BrokerThread, mysql_dsn: str, database: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = hvac.Client(url=broker.url, token=broker.root_token)
    resp = client.secrets.database.generate_credentials("ro", mount_point="my")
    user, password = resp["data"]["username"], resp["data"]["password"]
    assert len(user) <= 32
    assert mysql_query(mysql_dsn, f"SELECT id FROM `{database}`.t", user=user,
                       password=password) == [(1,)]
    with pytest.raises(pymysql.err.OperationalError) as denied:  # SELECT only
        mysql_query(mysql_dsn, f"INSERT INTO `{database}`.t VALUES (2, 'two')", user=user,
                    password=password)
    assert denied.value.args[0] == 1142
    renewed = client.sys.renew_lease(resp["lease_id"], increment=600)
    assert renewed["lease_duration"] == 600

    async def scenario() -> tuple[list[tuple[Any, ...]], BaseException | None]:
        p = mysql_parts(mysql_dsn)
        conn = await aiomysql.connect(host=p["host"], port=p["port"], user=user,
                                      password=password, autocommit=True)

        async def sleep() -> None:
            async with conn.cursor() as cur:
                await cur.execute("SELECT SLEEP(30)")
                await cur.fetchall()

        task = asyncio.create_task(sleep())
        try:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(client.sys.revoke_lease, resp["lease_id"])
            left = _sessions(mysql_dsn, user)  # right when the revoke returned
            outcome = (await asyncio.gather(asyncio.wait_for(task, 10),
                                            return_exceptions=True))[0]
            return left, outcome if isinstance(outcome, BaseException) else None
        finally:
            conn.close()

    left, outcome = asyncio.run(scenario())
    assert left == [], left
    assert isinstance(outcome, pymysql.err.OperationalError), outcome
    assert not _logs_in(mysql_dsn, user, password)
    assert password not in caplog.text
    assert password not in Path(broker.audit_path).read_text()


def test_a_bad_creation_statement_is_a_clear_400_and_leaves_no_user(
        broker: BrokerThread, mysql_dsn: str, tag: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    resp = root_api(broker)("GET", "my/creds/badsql")
    assert resp.status_code == 400, resp.text
    # Which statement: the server's message quotes only what follows the wrong word.
    assert "(statement 2 of 2)" in resp.text and "(1064)" in resp.text, resp.text
    assert mysql_query(mysql_dsn, "SELECT User FROM mysql.user WHERE User LIKE %s",
                       (tag.replace("_", "\\_") + "%",)) == []
    # The generated password is never seen by the test: no IDENTIFIED BY '<not redacted>'.
    seen = resp.text + caplog.text + Path(broker.audit_path).read_text()
    assert re.search(r"IDENTIFIED\s+BY\s+'(?!\[redacted\])", seen, re.IGNORECASE) is None


def test_a_display_name_naming_the_admin_gets_no_account(
        broker: BrokerThread, mysql_dsn: str, test_admin: tuple[str, str]) -> None:
    """A token whose display name is the mount admin's user name, on a role templated
    ``{{display_name}}``: refused (4xx), the admin neither locked nor given a second
    account. Before: 'adm'@'%' was made with the lease's password, and the revocation
    locked every host of 'adm' and killed the broker's own admin sessions."""
    user, password = test_admin
    made = root_api(broker)("POST", "auth/token/create",
                            json={"display_name": user, "policies": ["root"]})
    assert made.status_code == 200, made.text
    token = made.json()["auth"]["client_token"]
    assert render_username("{{display_name}}", mount="my", role="dn", display_name=user) == user
    resp = requests.get(f"{broker.url}/v1/my/creds/dn", headers={"X-Vault-Token": token},
                        timeout=60)
    assert resp.status_code == 400, resp.text
    assert "is the mount's admin account" in resp.text, resp.text
    assert password not in resp.text
    assert mysql_hosts(mysql_dsn, user) == {"127.0.0.1"}
    assert _logs_in(mysql_dsn, user, password)
    client = hvac.Client(url=broker.url, token=broker.root_token)
    lease = client.secrets.database.generate_credentials("ro", mount_point="my")
    client.sys.revoke_lease(lease["lease_id"])  # the mount still works


def _hold_a_long_query(dsn: str, user: str, password: str) -> tuple[Any, Any]:
    """A connection of ``user`` running ``SELECT SLEEP(60)`` (in a thread): (thread, errors)."""
    errors: list[BaseException] = []
    conn = mysql_connect(dsn, user, password, connect_timeout=5)

    def sleep() -> None:
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT SLEEP(60)")
        except BaseException as exc:  # what the test expects: the session killed
            errors.append(exc)
        finally:
            conn.close()

    worker = threading.Thread(target=sleep, daemon=True)
    worker.start()
    return worker, errors


def test_expiry_drops_the_user_and_kills_its_query_in_flight(
        broker: BrokerThread, mysql_dsn: str) -> None:
    """A 2 s lease: the sweeper (MySQL has no server-side expiry) ends a SLEEP(60) in flight."""
    client = hvac.Client(url=broker.url, token=broker.root_token)
    resp = client.secrets.database.generate_credentials("short", mount_point="my")
    user, password = resp["data"]["username"], resp["data"]["password"]
    worker, errors = _hold_a_long_query(mysql_dsn, user, password)
    worker.join(15)
    assert not worker.is_alive(), "the query of an expired lease still runs after 15 s"
    assert errors and isinstance(errors[0], pymysql.err.OperationalError), errors
    assert _sessions(mysql_dsn, user) == [] and mysql_hosts(mysql_dsn, user) == set()


def test_a_revocation_while_the_server_is_down_is_kept_and_done_later(
        tmp_path: Path, mysql_dsn: str, tag: str, test_admin: tuple[str, str]) -> None:
    """The server unreachable: the revoke is queued (not lost, not marked revoked), the
    account still there; once the server is back, the retry drops it."""
    user, password = test_admin
    p = mysql_parts(mysql_dsn)
    proxy = TcpProxy(p["port"])
    (tmp_path / "my.pw").write_text(password)
    body = f"""
[leases]
revoke_backoff_base = "1s"
revoke_backoff_max = "2s"

[mounts.my]
plugin = "mysql"
connection_url = "mysql://{user}@127.0.0.1:{proxy.port}/test"
password_file = "my.pw"

[mounts.my.roles.ro]
username_template = "{tag}-{{{{random 8}}}}"
default_ttl = "1h"
"""
    server = start_broker(write_config(tmp_path, body))
    api = root_api(server)
    try:
        issued = api("GET", "my/creds/ro")
        assert issued.status_code == 200, issued.text
        lease_id, name = issued.json()["lease_id"], issued.json()["data"]["username"]
        proxy.down()
        resp = api("PUT", "sys/leases/revoke", json={"lease_id": lease_id})
        assert resp.status_code == 202, resp.text  # queued: tried again later
        looked = api("PUT", "sys/leases/lookup", json={"lease_id": lease_id})
        assert looked.status_code == 200 and looked.json()["data"]["state"] == "revoking", \
            looked.text
        assert mysql_hosts(mysql_dsn, name) == {"%"}
        proxy.up()
        for _ in range(100):
            if not mysql_hosts(mysql_dsn, name):
                break
            time.sleep(0.2)
        assert mysql_hosts(mysql_dsn, name) == set(), "the queued revocation never ran"
    finally:
        proxy.up()
        api("PUT", "sys/leases/revoke-prefix/my/", json={"sync": True})
        server.stop()
        proxy.close()
