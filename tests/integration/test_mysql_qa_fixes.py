"""QA fixes of the MySQL/MariaDB plugin, against a real server.

A broker killed mid-CREATE leaves no user behind; a multi-account CREATE USER
that fails leaves none of the accounts it made, and never drops one that was
there before; error messages keep names but never passwords.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pymysql
import pytest
import requests

from broker.backend import (
    BackendError,
    DeleteUserRequest,
    MountSpec,
    NewUserRequest,
    RoleSpec,
)
from broker.templating import generate_password
from plugins._sql import REDACTED, redact
from plugins.mysql import MySQLBackend
from tests.integration.broker_harness import spawn_broker, wait_healthy, write_config

pytestmark = pytest.mark.integration

#: Every account these tests make starts with this (the shared server's rule).
PREFIX = "qa-fix-"
#: How long the slow creation statement sleeps: longer than a broker's restart.
SLOW = 5


def _parts(dsn: str) -> dict[str, Any]:
    url = urlsplit(dsn)
    return {"host": url.hostname or "127.0.0.1", "port": url.port or 3306,
            "user": url.username or "root", "password": url.password or ""}


def _url(dsn: str) -> str:
    p = _parts(dsn)
    return f"mysql://{p['user']}@{p['host']}:{p['port']}/"


def _sql(dsn: str, sql: str, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
    """Run ``sql`` as the admin on a connection of its own (blocking: fine in a test)."""
    p = _parts(dsn)
    conn = pymysql.connect(host=p["host"], port=p["port"], user=p["user"],
                           password=p["password"], autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())
    finally:
        conn.close()


def _hosts(dsn: str, name: str) -> set[str]:
    return {str(r[0]) for r in _sql(dsn, "SELECT Host FROM mysql.user WHERE User = %s", (name,))}


def _accounts(dsn: str, like: str) -> set[tuple[str, str]]:
    rows = _sql(dsn, "SELECT User, Host FROM mysql.user WHERE User LIKE %s", (like,))
    return {(str(u), str(h)) for u, h in rows}


def _drop_prefixed(dsn: str, prefix: str) -> None:
    for user, host in _accounts(dsn, prefix.replace("_", "\\_") + "%"):
        _sql(dsn, "DROP USER IF EXISTS %s@%s", (user, host))


@pytest.fixture
def tag(mysql_dsn: str) -> Iterator[str]:
    """A fresh ``qa-fix-XXXXXX-`` name prefix; its accounts are dropped afterwards."""
    prefix = f"{PREFIX}{secrets.token_hex(3)}-"
    try:
        yield prefix
    finally:
        _drop_prefixed(mysql_dsn, prefix)


@pytest.fixture
async def make_backend(mysql_dsn: str) -> AsyncIterator[Callable[..., Awaitable[MySQLBackend]]]:
    """Initialized MySQLBackends on the test server, closed afterwards."""
    made: list[MySQLBackend] = []

    async def make(roles: dict[str, RoleSpec]) -> MySQLBackend:
        backend = MySQLBackend.from_config(MountSpec(
            name="my", plugin="mysql", roles=roles, options={"connection_url": _url(mysql_dsn)},
            secret=_parts(mysql_dsn)["password"] or None))
        await backend.initialize()
        made.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in made:
            await backend.close()


def _role(*creation: str) -> RoleSpec:
    return RoleSpec(name="qa", default_ttl=60, max_ttl=600, options={"database": "test"},
                    creation_statements=creation)


async def _issue(backend: MySQLBackend, role: RoleSpec, name: str, password: str) -> None:
    await backend.new_user(NewUserRequest(
        role=role, username=name, password=password,
        expiration=datetime.now(UTC) + timedelta(minutes=5), lease_id="my/creds/qa/x"))


# -- 1. kill -9 while a CREATE USER is still running on the server ------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ))


def _running_creation(dsn: str, prefix: str) -> list[int]:
    """Ids of sessions running the slow creation statement for a ``prefix`` user."""
    rows = _sql(dsn, "SELECT ID FROM information_schema.PROCESSLIST"
                     " WHERE INFO LIKE 'EXECUTE IMMEDIATE%%' AND INFO LIKE %s",
                (f"%{prefix}%",))
    return [int(r[0]) for r in rows]


def test_kill_9_mid_create_user_leaves_no_user(tmp_path: Path, mysql_dsn: str, tag: str
                                                ) -> None:
    """A broker killed while its CREATE USER still runs: after the restart's rollback,
    that statement must not create the user once it would have finished."""
    # The sleep runs inside the CREATE's own statement: the server finishes it
    # after the client is gone, like a CREATE USER queued behind a lock.
    slow = ("EXECUTE IMMEDIATE CONCAT('CREATE USER ''{{name}}''@''%'' IDENTIFIED BY "
            f"''{{{{password}}}}''', IF(SLEEP({SLOW})=0,'',''))")
    body = f"""
[leases]
backend_timeout = "30s"
pending_timeout = "60s"

[mounts.my]
plugin = "mysql"
connection_url = "{_url(mysql_dsn)}test"

[mounts.my.roles.slow]
username_template = "{tag}{{{{random 8}}}}"
creation_statements = [{json.dumps(slow)}]
"""
    config = write_config(tmp_path, body)
    init = _cli("operator", "init", "--config", str(config))
    assert init.returncode == 0, init.stderr
    token = init.stdout.strip().splitlines()[-1]
    url = next("http://" + line.split("=", 1)[1].strip().strip('"')
               for line in config.read_text().splitlines() if line.startswith("listen"))
    proc = spawn_broker(config)
    try:
        wait_healthy(url)
        answer: list[Any] = []

        def issue() -> None:
            try:
                answer.append(requests.get(f"{url}/v1/my/creds/slow", timeout=60,
                                           headers={"X-Vault-Token": token}))
            except requests.RequestException as exc:  # the broker dies under it
                answer.append(exc)

        client = threading.Thread(target=issue, daemon=True)
        client.start()
        deadline = time.monotonic() + 10
        while not _running_creation(mysql_dsn, tag):
            assert time.monotonic() < deadline, "the creation statement never started"
            time.sleep(0.05)
        started = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        client.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert _running_creation(mysql_dsn, tag), "the statement must outlive the broker"

    proc = spawn_broker(config)
    try:
        wait_healthy(url)  # start-up rolled back the pending issue
        assert time.monotonic() - started < SLOW, "restart too slow to prove anything"
        while time.monotonic() < started + SLOW + 2:
            time.sleep(0.2)
        assert not _running_creation(mysql_dsn, tag)
        assert _accounts(mysql_dsn, tag + "%") == set(), "an untracked user was created"
        leases = requests.request("LIST", f"{url}/v1/sys/leases/lookup/my/creds/slow/",
                                  headers={"X-Vault-Token": token}, timeout=30)
        assert leases.status_code == 404 or not leases.json()["data"].get("keys"), leases.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


async def test_rollback_ends_a_creation_statement_it_has_no_record_of(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
) -> None:
    """delete_user(reason="rollback") kills another admin session creating the user and
    waits for it, so the user is not made afterwards; the error never shows the statement."""
    name = f"{tag}orphan"
    password = generate_password()
    p = _parts(mysql_dsn)
    # A session of the admin account the backend knows nothing about (another process).
    other = pymysql.connect(host=p["host"], port=p["port"], user=p["user"],
                            password=p["password"], autocommit=True)
    stmt = (f"EXECUTE IMMEDIATE CONCAT('CREATE USER ''{name}''@''%'' IDENTIFIED BY "
            f"''{password}''', IF(SLEEP({SLOW})=0,'',''))")
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            with other.cursor() as cur:
                cur.execute(stmt)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not _running_creation(mysql_dsn, name):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        role = _role("CREATE USER '{{name}}'@'%'")
        backend = await make_backend({"qa": role})
        started = time.monotonic()
        await backend.delete_user(DeleteUserRequest(
            role=role, username=name, revocation={}, reason="rollback"))
        assert time.monotonic() - started < SLOW, "it waited for the statement to end"
        worker.join(SLOW + 5)
        assert outcome and outcome[0] is not None, "the creation statement was not stopped"
        assert _hosts(mysql_dsn, name) == set()
    finally:
        worker.join(SLOW + 5)
        other.close()


# -- 2. a multi-account CREATE USER is not all-or-nothing -------------------------------------


async def test_failed_two_account_create_drops_what_it_made_and_keeps_the_old_account(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
) -> None:
    """'n'@'%' existed (error 1396): the 'n'@'127.0.0.1' the same CREATE made goes, the
    old account stays, and the error still says nothing of ours is left (no rollback)."""
    name = f"{tag}twohost"
    _sql(mysql_dsn, "CREATE USER %s@'%%' IDENTIFIED BY 'qaHandMade123'", (name,))
    role = _role(
        "CREATE USER '{{name}}'@'127.0.0.1' IDENTIFIED BY '{{password}}', "
        "'{{name}}'@'%' IDENTIFIED BY '{{password}}'",
        "GRANT SELECT ON test.* TO '{{name}}'@'127.0.0.1', '{{name}}'@'%'",
    )
    backend = await make_backend({"qa": role})
    password = generate_password()
    with pytest.raises(BackendError) as err:
        await _issue(backend, role, name, password)
    assert "1396" in str(err.value)
    assert err.value.created_nothing is True
    assert _hosts(mysql_dsn, name) == {"%"}
    assert password not in "".join(traceback.format_exception(err.value))


async def test_failed_two_account_create_with_unknown_plugin_leaves_nothing(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
) -> None:
    """One account of a CREATE USER names an unknown auth plugin (error 1524): the other
    account, which the server made anyway, is dropped too."""
    name = f"{tag}multi"
    role = _role("CREATE USER '{{name}}'@'127.0.0.1' IDENTIFIED BY '{{password}}', "
                 "'{{name}}'@'%' IDENTIFIED VIA qa_no_such_plugin")
    backend = await make_backend({"qa": role})
    with pytest.raises(BackendError) as err:
        await _issue(backend, role, name, generate_password())
    assert "1524" in str(err.value)
    assert _hosts(mysql_dsn, name) == set()


async def test_refused_single_account_create_keeps_the_old_account(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
) -> None:
    """The default CREATE USER of a name that exists is refused: nothing dropped, nothing
    made, created_nothing (the name lookup before any CREATE USER finds it)."""
    name = f"{tag}fixed"
    _sql(mysql_dsn, "CREATE USER %s@'%%' IDENTIFIED BY 'qaHandMade123'", (name,))
    role = RoleSpec(name="qa", default_ttl=60, max_ttl=600, options={"database": "test"})
    backend = await make_backend({"qa": role})
    with pytest.raises(BackendError) as err:
        await _issue(backend, role, name, generate_password())
    assert err.value.created_nothing is True
    assert _hosts(mysql_dsn, name) == {"%"}


# -- 3. error messages: names visible, passwords never -----------------------------------------


async def test_error_keeps_table_and_account_names(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
) -> None:
    """A GRANT on a missing table and a CREATE of an existing user name both in the message."""
    name = f"{tag}names"
    password = generate_password()
    role = _role("CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'",
                 "GRANT SELECT ON test.qa_fix_no_such_table TO '{{name}}'@'%'")
    backend = await make_backend({"qa": role})
    with pytest.raises(BackendError) as err:
        await _issue(backend, role, name, password)
    text = "".join(traceback.format_exception(err.value))
    assert "'test.qa_fix_no_such_table'" in str(err.value), str(err.value)
    assert password not in text and password[:8] not in text
    assert _hosts(mysql_dsn, name) == set()

    _sql(mysql_dsn, "CREATE USER %s@'%%' IDENTIFIED BY 'qaHandMade123'", (name,))
    with pytest.raises(BackendError) as err:
        await _issue(backend, role, name, password)
    assert f"'{name}'@'%'" in str(err.value), str(err.value)
    assert password not in "".join(traceback.format_exception(err.value))


async def test_echoed_statement_never_shows_a_password(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
) -> None:
    """A syntax error echoing the statement: neither the call's password nor a literal
    password written into the template comes through."""
    name = f"{tag}echo"
    password = generate_password()
    role = _role("CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}' oops",
                 "CREATE USER 'qa-fix-other'@'%' IDENTIFIED BY 'HardCoded4Template' oops")
    backend = await make_backend({"qa": role})
    with pytest.raises(BackendError) as err:
        await _issue(backend, role, name, password)
    assert "1064" in str(err.value)
    assert password not in "".join(traceback.format_exception(err.value))
    role2 = _role("CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'",
                  "CREATE USER 'qa-fix-other'@'%' IDENTIFIED BY 'HardCoded4Template' oops")
    backend = await make_backend({"qa": role2})
    with pytest.raises(BackendError) as err:
        await _issue(backend, role2, name, password)
    text = "".join(traceback.format_exception(err.value))
    assert "1064" in text and "HardCoded4Template" not in text, text
    assert _accounts(mysql_dsn, "qa-fix-other") == set()
    assert _hosts(mysql_dsn, name) == set()


@pytest.mark.parametrize("message", [
    "CREATE USER 'u'@'%' IDENTIFIED BY 'S3cretValue9'",
    "near 'IDENTIFIED BY 'S3cretValue9' oops' at line 1",
    "IDENTIFIED WITH mysql_native_password AS 'S3cretValue9'",
    "IDENTIFIED VIA ed25519 USING PASSWORD('S3cretValue9')",
    "SET PASSWORD FOR 'u'@'%' = PASSWORD('S3cretValue9')",
    "ALTER USER 'u'@'%' IDENTIFIED BY \"S3cretValue9\"",
    "IDENTIFIED BY 'S3cretValue9",  # cut off by the server
    "ALTER ROLE x PASSWORD $p$S3cretValue9$p$",
])
def test_unknown_password_after_a_keyword_is_redacted(message: str) -> None:
    """A literal after IDENTIFIED BY/AS/USING or PASSWORD goes even when no caller knew it,
    in both redaction modes."""
    for all_literals in (True, False):
        out = redact(message, [], all_literals=all_literals)
        assert "S3cretValue9" not in out and REDACTED in out, out


def test_names_stay_and_known_secrets_go_without_all_literals() -> None:
    """MySQL mode keeps table/user/host names, removes known secrets and their fragments."""
    secret = "Ab3dEfGhIjKlMnOpQrStUvWx"
    text = (f"(1146) Table 'app.items' doesn't exist; (1396) Operation CREATE USER failed for "
            f"'qa-fix-x'@'%'; near 'SELECT {secret[:12]}' at line 1; {secret.lower()}")
    out = redact(text, [secret], all_literals=False)
    assert "'app.items'" in out and "'qa-fix-x'@'%'" in out, out
    assert secret[:12] not in out and secret.lower() not in out
    # The default (PostgreSQL's) still takes every single-quoted literal.
    assert "app.items" not in redact(text, [secret])
