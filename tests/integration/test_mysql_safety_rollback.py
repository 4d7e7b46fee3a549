"""MySQL/MariaDB: a rollback drops only the accounts its own issue made, also after a crash.

A broker that dies between writing a lease's ``pending`` row and activating it
leaves the row to the stale-pending rollback of the next start. The issue's
check that the name was free (an existing name is refused) died with it, and
the rollback used to drop every account of the name: with a
``username_template`` without ``{{random}}``, an account made by hand (or
another lease's) went, its sessions killed. Now every issue tags its accounts
with a hash of its lease id (two per-hour resource limits no client reaches),
and a rollback drops a name only if every account of it carries its own tag,
unless the issue was made by this very process (which knows it found the name
free). Normal revocations are unchanged: they drop untagged accounts too.

Every account these tests make is named ``sfr-...`` and is dropped afterwards.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pymysql
import pytest

from broker.backend import DeleteUserRequest, NewUserRequest, RoleSpec
from broker.lease import Lease, LeaseFilter, new_lease_id
from broker.templating import generate_password
from plugins._mysql_grants import TAG_FLOOR, owner_tag
from plugins.mysql import MySQLBackend
from tests.integration.broker_harness import BrokerThread, start_broker, write_config
from tests.integration.db_fixtures import (
    mysql_accounts_dropped,
    mysql_connect,
    mysql_hosts,
    mysql_mount,
    mysql_query,
    mysql_role,
    mysql_url,
    started_backends,
)

pytestmark = pytest.mark.integration

MakeBackend = Callable[..., Awaitable[MySQLBackend]]

#: Vault's documented shape: the tag is appended to it, as to the default statement.
VAULT_CREATE = "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'"
#: Not that plain shape (REQUIRE NONE after it): tagged by an ALTER USER right after it.
OTHER_CREATE = "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}' REQUIRE NONE"
#: Sets one of the tag's limits itself: its accounts stay untagged (the limit is kept).
OWN_LIMITS_CREATE = ("CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'"
                     " WITH MAX_CONNECTIONS_PER_HOUR 100000")
GRANT = "GRANT SELECT ON `test`.* TO '{{name}}'@'%'"


@pytest.fixture
def tag(mysql_dsn: str) -> Iterator[str]:
    """A fresh ``sfr-XXXXXX-`` name prefix; its accounts are dropped afterwards."""
    with mysql_accounts_dropped(mysql_dsn, f"sfr-{secrets.token_hex(3)}-") as prefix:
        yield prefix


@pytest.fixture
async def make_backend(mysql_dsn: str) -> AsyncIterator[MakeBackend]:
    """``make(roles)``: an initialized backend of the ``my`` mount as the DSN's admin, closed
    afterwards. Two of them stand for two broker processes (one that died, its successor)."""
    mount = partial(mysql_mount, mysql_dsn, connection_url=mysql_url(mysql_dsn, "test"))
    async with started_backends(MySQLBackend, mount) as make:
        yield make


def _role(*creation: str) -> RoleSpec:
    return mysql_role("fixed", options={"database": "test"}, creation_statements=creation)


async def _issue(backend: MySQLBackend, role: RoleSpec, name: str, lease_id: str) -> str:
    """``new_user`` of ``name`` for lease ``lease_id``; the password."""
    password = generate_password()
    await backend.new_user(NewUserRequest(
        role=role, username=name, password=password,
        expiration=datetime.now(UTC) + timedelta(minutes=5), lease_id=lease_id))
    return password


def _rollback(role: RoleSpec, name: str, lease_id: str) -> DeleteUserRequest:
    return DeleteUserRequest(role=role, username=name, revocation={"host": "%"},
                             reason="rollback", lease_id=lease_id)


def _logs_in(dsn: str, user: str, password: str) -> bool:
    try:
        mysql_query(dsn, "SELECT 1", user=user, password=password)
    except pymysql.err.OperationalError:
        return False
    return True


def _alive(conn: pymysql.connections.Connection) -> bool:
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    except pymysql.err.MySQLError:
        return False
    return True


def _limits(dsn: str, name: str) -> set[tuple[int, int]]:
    rows = mysql_query(dsn, "SELECT max_updates, max_connections FROM mysql.user"
                            " WHERE User = %s", (name,))
    return {(int(u), int(c)) for u, c in rows}


# -- through the broker: the stale-pending rollback after a crash ------------------------------


def _broker_config(dsn: str, name: str) -> str:
    """A mysql mount whose role ``fixed`` always names the account ``name``."""
    return f"""
[mounts.my]
plugin = "mysql"
connection_url = "{mysql_url(dsn, 'test')}"

[mounts.my.roles.fixed]
username_template = "{name}"
database = "test"
default_ttl = "1h"
max_ttl = "1h"
"""


def _crashed_issue(broker: BrokerThread, name: str, lease_id: str | None = None) -> str:
    """Write the ``pending`` row a broker leaves when it dies before activating its issue
    (written before the backend is asked: only the username), and run the stale-pending
    rollback of the next start on it. The lease id."""
    assert broker.state is not None
    now = time.time()
    lease = Lease(id=lease_id or new_lease_id("my", "fixed"), mount="my", role="fixed",
                  owner="test-root", issue_time=now - 600, expire_time=now + 3600,
                  max_expire_time=now + 3600, revocation={"username": name})
    broker.call(broker.state.store.insert_pending(lease))
    assert broker.call(broker.state.engine.rollback_stale_pending(older_than=0)) == 1
    left = broker.call(broker.state.store.list_ids(LeaseFilter(prefix="my/creds/fixed/")))
    assert left == [], "the rollback must be done, not left to retry"
    return lease.id


def test_a_crashed_issue_rollback_leaves_a_preexisting_account_alone(
        tmp_path: Path, mysql_dsn: str, tag: str) -> None:
    """An account made by hand whose name the role's template gives, then a pending lease
    of that name left by a crash: the stale-pending rollback leaves the account, its
    session and its login as they were (before: it was locked, killed and dropped)."""
    pre, password = f"{tag}pre", generate_password()
    mysql_query(mysql_dsn, "CREATE USER %s@'%%' IDENTIFIED BY %s", (pre, password))
    session = mysql_connect(mysql_dsn, pre, password)
    broker = start_broker(write_config(tmp_path, _broker_config(mysql_dsn, pre)))
    try:
        _crashed_issue(broker, pre)
        assert mysql_hosts(mysql_dsn, pre) == {"%"}, "the pre-existing account was dropped"
        assert _alive(session), "a session of the pre-existing account was killed"
        assert _logs_in(mysql_dsn, pre, password), "the pre-existing account cannot log in"
    finally:
        broker.stop()
        session.close()


@pytest.mark.parametrize("creation", [(), (VAULT_CREATE, GRANT), (OTHER_CREATE, GRANT)],
                         ids=["default", "vault-shape", "altered"])
async def test_a_crashed_issue_rollback_drops_the_account_the_issue_made(
        tmp_path: Path, mysql_dsn: str, tag: str, make_backend: MakeBackend,
        creation: tuple[str, ...]) -> None:
    """The dead broker's issue did create its account (tagged, whichever way the role's
    statements allow): the successor's stale-pending rollback drops it, session and all."""
    name = f"{tag}mine"
    role = _role(*creation)
    lease_id = new_lease_id("my", "fixed")
    dead = await make_backend({"fixed": role})  # the broker that crashed after its CREATE
    password = await _issue(dead, role, name, lease_id)
    await dead.close()
    [(updates, conns)] = _limits(mysql_dsn, name)
    assert updates >= TAG_FLOOR and conns >= TAG_FLOOR, "the account is not tagged"
    session = mysql_connect(mysql_dsn, name, password)
    config = _broker_config(mysql_dsn, name)
    if creation:
        config += "creation_statements = [" + ", ".join(
            '"' + s.replace('"', '\\"') + '"' for s in creation) + "]\n"
    broker = start_broker(write_config(tmp_path, config))
    try:
        _crashed_issue(broker, name, lease_id)
        assert mysql_hosts(mysql_dsn, name) == set(), "the issue's own account was left"
        assert not _alive(session), "its session outlived the rollback"
    finally:
        broker.stop()
        session.close()


# -- the plugin alone ----------------------------------------------------------------------


async def test_a_rollback_leaves_another_leases_account_alone(
        mysql_dsn: str, tag: str, make_backend: MakeBackend) -> None:
    """Lease A holds the name (a template without {{random}}); lease B's issue of the same
    name was left pending by a crash: B's rollback leaves A's account working."""
    name = f"{tag}shared"
    role = _role()
    first = await make_backend({"fixed": role})
    password = await _issue(first, role, name, "my/creds/fixed/lease-a")
    successor = await make_backend({"fixed": role})
    await successor.delete_user(_rollback(role, name, "my/creds/fixed/lease-b"))
    assert mysql_hosts(mysql_dsn, name) == {"%"}
    assert _logs_in(mysql_dsn, name, password)


async def test_own_limits_stay_untagged_and_only_this_process_rolls_them_back(
        mysql_dsn: str, tag: str, make_backend: MakeBackend,
        caplog: pytest.LogCaptureFixture) -> None:
    """A role setting MAX_CONNECTIONS_PER_HOUR itself keeps its limit (no tag): a successor's
    rollback cannot tell the account is its issue's and leaves it with a warning; the
    process that issued it (an activation that failed) still rolls it back."""
    name = f"{tag}limits"
    role = _role(OWN_LIMITS_CREATE, GRANT)
    lease_id = "my/creds/fixed/limits"
    issuer = await make_backend({"fixed": role})
    await _issue(issuer, role, name, lease_id)
    assert {c for _, c in _limits(mysql_dsn, name)} == {100000}, "the role's own limit changed"
    successor = await make_backend({"fixed": role})
    with caplog.at_level(logging.WARNING, logger="plugins.mysql"):
        await successor.delete_user(_rollback(role, name, lease_id))
    assert mysql_hosts(mysql_dsn, name) == {"%"}
    assert "rollback leaves user" in caplog.text and "carries no tag" in caplog.text
    await issuer.delete_user(_rollback(role, name, lease_id))
    assert mysql_hosts(mysql_dsn, name) == set()


@pytest.mark.parametrize("reason", ["revoke", "expire"])
async def test_revocation_still_drops_an_untagged_account(
        mysql_dsn: str, tag: str, make_backend: MakeBackend, reason: str) -> None:
    """A lease issued before accounts were tagged (no limits) is still revoked and expired."""
    name = f"{tag}old"
    mysql_query(mysql_dsn, "CREATE USER %s@'%%' IDENTIFIED BY 'sfrOldIssue123'", (name,))
    backend = await make_backend({"fixed": _role()})
    await backend.delete_user(DeleteUserRequest(
        role=_role(), username=name, revocation={"host": "%"}, reason=reason,
        lease_id="my/creds/fixed/old"))
    assert mysql_hosts(mysql_dsn, name) == set()


def test_the_tag_is_a_hash_of_the_lease_id() -> None:
    """Each half has its top bit set (an hourly limit no client reaches) and fits the
    server's 32-bit limit; different leases get different tags; no lease, no tag."""
    a, b = owner_tag("my/creds/fixed/a"), owner_tag("my/creds/fixed/b")
    assert a is not None and b is not None and a != b
    assert all(TAG_FLOOR <= v < 2 * TAG_FLOOR for v in (*a, *b))
    assert owner_tag("") is None
