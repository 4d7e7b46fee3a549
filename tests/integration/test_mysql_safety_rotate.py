"""MySQL/MariaDB rotate-root: setting the old password again must not undo another rotation.

After its ``ALTER USER``, rotate-root logs in with the new password; if that
fails, it sets the old password again. Brokers on several hosts (each with its
own copy of the password file) rotate independently: when another host's
rotation came in between, that "restore" overwrote it, leaving the other
host's password file wrong. Now the old password is set again only while the
account still holds this rotation's password; otherwise the rotation fails
saying another rotation changed it, and the account is left as it is.

Every account these tests make is named ``sfrot-...`` and is dropped afterwards.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from broker.backend import BackendError, RotateRootRequest
from broker.templating import generate_password
from plugins._mysql_rotate import _holds, _native_hash
from plugins.mysql import MySQLBackend
from tests.integration.db_fixtures import (
    mysql_accounts_dropped,
    mysql_mount,
    mysql_query,
    started_backend,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def admin_account(mysql_dsn: str) -> Iterator[tuple[str, str]]:
    """A mount admin of the test's own (user, password): CREATE USER only, as little as
    rotate-root needs (MariaDB wants it for ALTER USER); dropped afterwards."""
    with mysql_accounts_dropped(mysql_dsn, f"sfrot-{secrets.token_hex(3)}") as user:
        password = generate_password()
        mysql_query(mysql_dsn, "CREATE USER %s@'%%' IDENTIFIED BY %s WITH MAX_USER_CONNECTIONS 1",
                    (user, password))
        mysql_query(mysql_dsn, f"GRANT CREATE USER ON *.* TO '{user}'@'%'")
        yield user, password


def _logs_in(dsn: str, user: str, password: str) -> bool:
    try:
        mysql_query(dsn, "SELECT 1", user=user, password=password)
    except pymysql.err.OperationalError as exc:
        assert exc.args[0] == 1045, exc  # refused for its password, nothing else
        return False
    return True


async def _until_no_sessions(dsn: str, user: str) -> None:
    """The account allows one connection: wait until the server let go of the broker's."""
    for _ in range(200):
        rows = await asyncio.to_thread(
            mysql_query, dsn, "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s",
            (user,))
        if not rows:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{user} still has sessions after 10s")


async def test_another_hosts_rotation_in_between_is_left_alone(
        mysql_dsn: str, admin_account: tuple[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another broker rotates the admin right after this one's ALTER USER, so this one's
    login with its new password fails: it must not set the old password over the other's
    (before: it did, and the other broker's password file no longer logged in)."""
    user, old = admin_account
    other = generate_password()  # what the broker on the other host set and wrote down
    mount = mysql_mount(mysql_dsn, user=user, secret=old, max_open_connections=1)
    async with started_backend(MySQLBackend, mount) as backend:
        await backend.verify()
        real_new_pool = backend._new_pool
        rotated: list[str] = []

        async def other_host_rotates_first(password: str | None) -> Any:
            # The pool for the check login of this rotation's new password: the
            # other host's ALTER USER lands just before it logs in.
            if not rotated:
                rotated.append(other)
                await asyncio.to_thread(mysql_query, mysql_dsn,
                                        "ALTER USER %s@'%%' IDENTIFIED BY %s", (user, other))
            return await real_new_pool(password)

        monkeypatch.setattr(backend, "_new_pool", other_host_rotates_first)
        with pytest.raises(BackendError) as failed:
            await backend.rotate_root(RotateRootRequest())
        assert rotated, "the check login never came"
        message = str(failed.value)
        assert "another rotation changed the admin password" in message
        assert failed.value.retryable is False
        assert other not in message and old not in message
    await _until_no_sessions(mysql_dsn, user)
    assert _logs_in(mysql_dsn, user, other), "the other host's rotation was undone"
    assert not _logs_in(mysql_dsn, user, old)


async def test_the_old_password_is_still_set_again_when_the_account_is_ours(
        mysql_dsn: str, admin_account: tuple[str, str]) -> None:
    """Nobody else rotated: the new password's login fails (the account's one connection is
    the pool's), so the old password is set again and the rotation fails saying so."""
    user, old = admin_account
    mount = mysql_mount(mysql_dsn, user=user, secret=old, max_open_connections=1)
    async with started_backend(MySQLBackend, mount) as backend:
        await backend.verify()  # the pool now holds the account's one connection
        with pytest.raises(BackendError) as failed:
            await backend.rotate_root(RotateRootRequest())
        assert "the old admin password was set again" in str(failed.value)
    await _until_no_sessions(mysql_dsn, user)
    assert _logs_in(mysql_dsn, user, old)


def test_holds_compares_native_hashes_with_the_new_password_and_salted_ones_with_ours(
) -> None:
    """Unsalted hashes are checked against the new password itself; salted ones against
    the account as it was right after the ALTER; nothing to compare: unknown."""
    new = generate_password()
    mine = f"CREATE USER `a`@`%` IDENTIFIED BY PASSWORD '{_native_hash(new)}'"
    theirs = f"CREATE USER `a`@`%` IDENTIFIED BY PASSWORD '{_native_hash('other1234')}'"
    assert _holds(mine, None, new) is True
    assert _holds(theirs, mine, new) is False
    salted = "CREATE USER `a`@`%` IDENTIFIED WITH 'caching_sha2_password' AS '$A$005$x'"
    assert _holds(salted, salted, new) is True
    assert _holds(salted, salted.replace("x'", "y'"), new) is False
    assert _holds(salted, None, new) is None
    assert _holds(None, mine, new) is None
