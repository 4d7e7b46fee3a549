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
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.backend import DeleteUserRequest, RoleSpec
from broker.templating import generate_password
from plugins._sql import REDACTED, redact
from plugins.mysql import MySQLBackend
from tests.integration.broker_harness import spawn_broker, wait_healthy, write_config
from tests.integration.db_fixtures import (
    mysql_accounts,
    mysql_accounts_dropped,
    mysql_connect,
    mysql_hosts,
    mysql_mount,
    mysql_parts,
    mysql_query,
    mysql_role,
    mysql_url,
    refused_issue,
    started_backends,
)

pytestmark = pytest.mark.integration

#: Every account these tests make starts with this (the shared server's rule).
PREFIX = "qa-fix-"
#: How long a slow creation statement sleeps that a rollback must end sooner.
SLOW = 5
#: How long the kill -9 test's creation statement sleeps: the restarted broker's
#: rollback must come before it ends by itself, also on a CI machine that stalls
#: for seconds. A passing run does not wait for it (the rollback ends it).
KILL9_SLOW = 30


@pytest.fixture
def tag(mysql_dsn: str) -> Iterator[str]:
    """A fresh ``qa-fix-XXXXXX-`` name prefix; its accounts are dropped afterwards."""
    with mysql_accounts_dropped(mysql_dsn, f"{PREFIX}{secrets.token_hex(3)}-") as prefix:
        yield prefix


@pytest.fixture
async def make_backend(mysql_dsn: str) -> AsyncIterator[Callable[..., Awaitable[MySQLBackend]]]:
    """``make(roles)``: an initialized backend of the ``my`` mount, closed afterwards."""
    async with started_backends(MySQLBackend, partial(mysql_mount, mysql_dsn)) as make:
        yield make


def _role(*creation: str) -> RoleSpec:
    """The ``qa`` role on the ``test`` database, made by the ``creation`` statements."""
    return mysql_role("qa", options={"database": "test"}, creation_statements=creation)


# -- 1. kill -9 while a CREATE USER is still running on the server ------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ))


def _running_creation(dsn: str, prefix: str) -> list[int]:
    """Ids of sessions running the slow creation statement for a ``prefix`` user."""
    rows = mysql_query(dsn, "SELECT ID FROM information_schema.PROCESSLIST"
                            " WHERE INFO LIKE 'EXECUTE IMMEDIATE%%' AND INFO LIKE %s",
                       (f"%{prefix}%",))
    return [int(r[0]) for r in rows]


def _in_a_statement(dsn: str, ids: list[int]) -> list[int]:
    """Those of the sessions ``ids`` still in a statement (``Query``, or ``Killed`` and
    not yet ended); an idle or ended one has nothing left to create."""
    rows = mysql_query(dsn, "SELECT ID FROM information_schema.PROCESSLIST WHERE COMMAND <>"
                            f" 'Sleep' AND ID IN ({', '.join(['%s'] * len(ids))})", tuple(ids))
    return [int(r[0]) for r in rows]


def _seconds_run(dsn: str, ids: list[int]) -> float:
    """How long the longest-running of the sessions ``ids`` has been in its statement."""
    rows = mysql_query(dsn, "SELECT MAX(TIME_MS) FROM information_schema.PROCESSLIST"
                            f" WHERE ID IN ({', '.join(['%s'] * len(ids))})", tuple(ids))
    return float(rows[0][0] or 0) / 1000


class _HoldServerSide:
    """A loopback relay to the MySQL server that keeps the server's side of each
    connection open after the client is gone, until :meth:`close`.

    The server learns of a dead client from its socket only: SLEEP() looks every
    5 s and ends early, so a statement of a killed broker would end (and create
    its user) about 5 s after it began, whatever it sleeps; the restart would
    have those 5 s. Held open, the statement runs its whole sleep, like a CREATE
    USER queued behind a lock.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.sockets.append(client)
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()  # the broker sees a refused connection, as from the server
                continue
            server.settimeout(None)
            self.sockets.append(server)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass  # the other side is gone; what is left open stays so until close()

    def close(self) -> None:
        for sock in [self.listener, *self.sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv/accept
            except OSError:
                pass
            sock.close()


@pytest.fixture
def relay(mysql_dsn: str, tag: str) -> Iterator[_HoldServerSide]:
    """A :class:`_HoldServerSide` to the test server, closed afterwards.

    Before that, a ``tag`` creation statement still running (only after a failure)
    is ended: else it would create its user after the tag fixture's cleanup.
    """
    p = mysql_parts(mysql_dsn)
    held = _HoldServerSide(p["host"], p["port"])
    try:
        yield held
    finally:
        for thread_id in _running_creation(mysql_dsn, tag):
            mysql_query(mysql_dsn, f"KILL CONNECTION {thread_id:d}")
        held.close()


def test_kill_9_mid_create_user_leaves_no_user(tmp_path: Path, mysql_dsn: str, tag: str,
                                                relay: _HoldServerSide) -> None:
    """A broker killed while its CREATE USER still runs: after the restart's rollback,
    that statement must not create the user once it would have finished."""
    # The sleep runs inside the CREATE's own statement: the server finishes it
    # after the client is gone, like a CREATE USER queued behind a lock.
    slow = ("EXECUTE IMMEDIATE CONCAT('CREATE USER ''{{name}}''@''%'' IDENTIFIED BY "
            f"''{{{{password}}}}''', IF(SLEEP({KILL9_SLOW})=0,'',''))")
    body = f"""
[leases]
backend_timeout = "30s"
pending_timeout = "60s"

[mounts.my]
plugin = "mysql"
connection_url = "{mysql_url(mysql_dsn, 'test', host='127.0.0.1', port=relay.port)}"

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
        deadline = time.monotonic() + 30
        while not (creating := _running_creation(mysql_dsn, tag)):
            assert time.monotonic() < deadline, "the creation statement never started"
            time.sleep(0.05)
        # When the statement would end by itself and create the user: from the
        # server's count of its run, not from when this loop happened to see it.
        ends = time.monotonic() + KILL9_SLOW - _seconds_run(mysql_dsn, creating)
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
        # A rollback after the statement's own end finds the user made and drops
        # it: the test would pass without the fix.
        assert time.monotonic() < ends, "restart too slow to prove anything"
        # What the rollback must bring about: the killed broker's statement ends
        # before it creates the user. Without the fix it ends too, but only at
        # the end of its sleep, after creating the user; either way, once it has
        # ended the accounts are final.
        deadline = ends + 30
        while busy := _in_a_statement(mysql_dsn, creating):
            assert time.monotonic() < deadline, (
                f"the killed broker's session(s) {busy} never ended their creation"
                f" statement, not even 30 s after its {KILL9_SLOW} s sleep")
            time.sleep(0.2)
        assert mysql_accounts(mysql_dsn, tag + "%") == set(), "an untracked user was created"
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
    # A session of the admin account the backend knows nothing about (another process).
    other = mysql_connect(mysql_dsn)
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
        assert mysql_hosts(mysql_dsn, name) == set()
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
    mysql_query(mysql_dsn, "CREATE USER %s@'%%' IDENTIFIED BY 'qaHandMade123'", (name,))
    role = _role(
        "CREATE USER '{{name}}'@'127.0.0.1' IDENTIFIED BY '{{password}}', "
        "'{{name}}'@'%' IDENTIFIED BY '{{password}}'",
        "GRANT SELECT ON test.* TO '{{name}}'@'127.0.0.1', '{{name}}'@'%'",
    )
    backend = await make_backend({"qa": role})
    password = generate_password()
    err = await refused_issue(backend, role, name, password)
    assert "1396" in str(err)
    assert err.created_nothing is True
    assert mysql_hosts(mysql_dsn, name) == {"%"}
    assert password not in "".join(traceback.format_exception(err))


async def test_failed_two_account_create_with_unknown_plugin_leaves_nothing(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
) -> None:
    """One account of a CREATE USER names an unknown auth plugin (error 1524): the other
    account, which the server made anyway, is dropped too."""
    name = f"{tag}multi"
    role = _role("CREATE USER '{{name}}'@'127.0.0.1' IDENTIFIED BY '{{password}}', "
                 "'{{name}}'@'%' IDENTIFIED VIA qa_no_such_plugin")
    backend = await make_backend({"qa": role})
    err = await refused_issue(backend, role, name, generate_password())
    assert "1524" in str(err)
    assert mysql_hosts(mysql_dsn, name) == set()


async def test_refused_single_account_create_keeps_the_old_account(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
) -> None:
    """The default CREATE USER of a name that exists is refused: nothing dropped, nothing
    made, created_nothing (the name lookup before any CREATE USER finds it)."""
    name = f"{tag}fixed"
    mysql_query(mysql_dsn, "CREATE USER %s@'%%' IDENTIFIED BY 'qaHandMade123'", (name,))
    role = _role()  # the default statements
    backend = await make_backend({"qa": role})
    err = await refused_issue(backend, role, name, generate_password())
    assert err.created_nothing is True
    assert mysql_hosts(mysql_dsn, name) == {"%"}


# -- 3. error messages: names visible, passwords never -----------------------------------------


async def test_error_keeps_table_and_account_names(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
) -> None:
    """A GRANT on a missing table and a CREATE of an existing user name both in the message."""
    name, password = f"{tag}names", generate_password()
    role = _role("CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'",
                 "GRANT SELECT ON test.qa_fix_no_such_table TO '{{name}}'@'%'")
    backend = await make_backend({"qa": role})
    err = await refused_issue(backend, role, name, password)
    text = "".join(traceback.format_exception(err))
    assert "'test.qa_fix_no_such_table'" in str(err), str(err)
    assert password not in text and password[:8] not in text
    assert mysql_hosts(mysql_dsn, name) == set()

    mysql_query(mysql_dsn, "CREATE USER %s@'%%' IDENTIFIED BY 'qaHandMade123'", (name,))
    err = await refused_issue(backend, role, name, password)
    assert f"'{name}'@'%'" in str(err), str(err)
    assert password not in "".join(traceback.format_exception(err))


async def test_echoed_statement_never_shows_a_password(
    make_backend: Callable[..., Awaitable[MySQLBackend]], mysql_dsn: str, tag: str,
) -> None:
    """A syntax error echoing the statement: neither the call's password nor a literal
    password written into the template comes through."""
    name, password = f"{tag}echo", generate_password()
    role = _role("CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}' oops",
                 "CREATE USER 'qa-fix-other'@'%' IDENTIFIED BY 'HardCoded4Template' oops")
    backend = await make_backend({"qa": role})
    err = await refused_issue(backend, role, name, password)
    assert "1064" in str(err)
    assert password not in "".join(traceback.format_exception(err))
    role2 = _role("CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'",
                  "CREATE USER 'qa-fix-other'@'%' IDENTIFIED BY 'HardCoded4Template' oops")
    backend = await make_backend({"qa": role2})
    err = await refused_issue(backend, role2, name, password)
    text = "".join(traceback.format_exception(err))
    assert "1064" in text and "HardCoded4Template" not in text, text
    assert mysql_accounts(mysql_dsn, "qa-fix-other") == set()
    assert mysql_hosts(mysql_dsn, name) == set()


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
