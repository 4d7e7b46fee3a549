"""How the MySQL backend rotates its own admin password (rotate-root).

``MySQLBackend.rotate_root`` runs ``_rotate_root``: an ``ALTER USER`` of the
admin account, then a new pool that must log in with the new password before
the broker relies on it. A failure after the server took the new password
must not leave the broker knowing neither password, so each way it can end
has its own answer:

- the connection was lost (or no answer came in time) with the ``ALTER`` out:
  the server is asked which password it holds (``_confirm_rotation``, through
  ``plugins._rotation``);
- the new password does not log in: the old one is set again, but only while
  the account still holds this rotation's password (``_restore_old``,
  ``_holds``), since another broker may have rotated it since.

A module of its own so that ``plugins.mysql`` keeps to the plugin class and
the issue path. The functions take the ``MySQLBackend`` they rotate for and
use its cursors and statement runner, its pool factory (``_new_pool``) and
``_adopt_root``, which switches it to a new pool and password.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from typing import TYPE_CHECKING, Any

import aiomysql
import pymysql

from broker.backend import BackendError, RotateRootRequest, RotateRootResponse
from broker.templating import generate_password
from plugins._mysql_driver import _ER_ACCESS_DENIED, CONNECT_TIMEOUT, _error_code, _QuietCursor
from plugins._mysql_sessions import _settle
from plugins._rotation import confirm_rotation, no_answer

if TYPE_CHECKING:
    from plugins.mysql import MySQLBackend

# The plugin's logger, not this module's: logging set up for "plugins.mysql"
# sees rotate-root's records too.
log = logging.getLogger("plugins.mysql")

# mysql_native_password hashes in SHOW CREATE USER ('*' and 40 hex digits, quoted).
_NATIVE_HASHES = re.compile(r"(?<=')\*[0-9A-F]{40}(?=')")


async def _rotate_root(backend: MySQLBackend, req: RotateRootRequest) -> RotateRootResponse:
    """ALTER the admin account's own password, then reopen the pool with it.

    The account is named explicitly: MariaDB 10.11 accepts ``ALTER USER
    CURRENT_USER() IDENTIFIED BY ...`` and silently changes nothing.

    Once the server took the new password, the old one no longer logs in:
    a failure after that point must not leave the broker knowing neither.
    If the new password cannot log in (too many connections, say), the old
    one is set again through the old pool's logged-in connections and the
    call fails; if even that fails, the new password is kept and returned.
    But only while the account still holds this rotation's password
    (``_restore_old``): another broker (a host with its own copy of the
    password file) may have rotated it since, and setting the old one again
    would undo that rotation and lock the other broker out.
    """
    what = "rotating the admin password"
    new = req.new_password or generate_password()
    lost: BackendError | None = None
    ours: str | None = None  # the account as SHOW CREATE USER showed it after our ALTER
    async with backend._cursor(what, new) as cur:
        await backend._run(cur, what, "SELECT CURRENT_USER()")
        row = await cur.fetchone()
        user, _, host = str(row[0]).rpartition("@")
        thread_id = cur.connection.thread_id()
        try:
            async with asyncio.timeout(req.timeout):
                # Parameters: pymysql escapes them for the session's sql_mode.
                await backend._run(cur, what, "ALTER USER %s@%s IDENTIFIED BY %s", new,
                                   params=(user, host, new))
        except TimeoutError:
            # No answer in time (a lock, a stalled network): the ALTER may
            # have been applied. Asked like a lost one; the session goes.
            cur.connection.close()
            lost = no_answer(what, req.timeout)
        except BackendError as exc:
            if exc.created_nothing or not cur.connection.closed:
                raise  # the server answered: it refused the statement
            lost = exc  # the connection broke with the ALTER out: unknown outcome
        else:
            ours = await _show_account(cur, user, host)
    if lost is not None:
        await _confirm_rotation(backend, new, thread_id, lost)
        await backend._adopt_root(await backend._new_pool(new), new)
        return RotateRootResponse(new_password=new)
    # Prove the new password logs in before anything relies on it.
    pool = await backend._new_pool(new)
    try:
        async with backend._cursor_on(pool, what, new) as cur:
            await backend._run(cur, what, "SELECT 1", new)
    except BackendError as exc:
        pool.close()
        await pool.wait_closed()
        failed = exc
    else:
        await backend._adopt_root(pool, new)
        return RotateRootResponse(new_password=new)
    return await _restore_old(backend, user, host, new, ours, failed)


async def _restore_old(backend: MySQLBackend, user: str, host: str, new: str, ours: str | None,
                       failed: BackendError) -> RotateRootResponse:
    """Set the old admin password again after ``new`` failed to log in (``failed``),
    if the account still holds ``new``; ``ours``: the account right after our ALTER.

    Still ours: the old password is set again and the rotation fails. Changed
    since (another broker's rotation): left as it is, and the rotation fails
    saying so. Not to be told (no SHOW CREATE USER), or the old password
    cannot be set: ``new`` is kept and returned, the last password we know
    the server took. Check and ALTER are two statements: a rotation elsewhere
    between the two is not seen (MySQL has no conditional ALTER USER).
    """
    what = "restoring the old admin password"
    still: bool | None = None
    try:
        async with backend._cursor(what, new) as cur:
            still = _holds(await _show_account(cur, user, host), ours, new)
            if still:
                await backend._run(cur, what, "ALTER USER %s@%s IDENTIFIED BY %s", new,
                                   params=(user, host, backend._password or ""))
    except BackendError as exc:
        # The server holds the new password and we cannot take it back:
        # it is the only one that works now, so the caller must get it.
        log.warning("mysql: the new admin password of mount %s could not log in (%s) "
                    "nor be undone (%s); keeping it", backend.mount, failed, exc)
        await backend._adopt_root(await backend._new_pool(new), new)
        return RotateRootResponse(new_password=new)
    if still is False:
        raise BackendError(
            f"{failed}; another rotation changed the admin password after this one set "
            "it (a broker on another host?), so this one did not set the old password "
            "again and left it as it is: the password this broker holds may no longer "
            "log in; put the admin's current password into this mount's password_file",
            retryable=False)
    if still is None:
        log.warning("mysql: the new admin password of mount %s could not log in (%s), "
                    "and whether the account still holds it cannot be told; keeping it",
                    backend.mount, failed)
        await backend._adopt_root(await backend._new_pool(new), new)
        return RotateRootResponse(new_password=new)
    raise BackendError(f"{failed}; the old admin password was set again",
                       retryable=failed.retryable)


async def _show_account(cur: Any, user: str, host: str) -> str | None:
    """``SHOW CREATE USER`` of the admin's own account (it holds the password's hash:
    never logged or returned); None if the server does not tell."""
    try:
        await cur.execute("SHOW CREATE USER %s@%s", (user, host))
        row = await cur.fetchone()
    except pymysql.err.MySQLError:
        return None
    return None if row is None else str(row[0])


async def _confirm_rotation(backend: MySQLBackend, new: str, thread_id: int,
                            lost: BackendError) -> None:
    """Return if the server took ``new`` although the connection was lost; else raise.

    See plugins/_rotation.py: the cut-off session is ended first (``_settle``),
    then a fresh login with each password tells which one the server has.
    """
    backend._unsettled[thread_id] = asyncio.get_running_loop().time()

    async def login(password: str | None) -> Any:
        return await aiomysql.connect(
            host=backend._host, port=backend._port, user=backend._user,
            password=password or "", db=backend._database, autocommit=True,
            connect_timeout=CONNECT_TIMEOUT, cursorclass=_QuietCursor)

    async def settle(conn: Any) -> None:
        async with conn.cursor() as cur:
            await _settle(backend, cur)

    async def logout(conn: Any) -> None:
        conn.close()

    await confirm_rotation(
        lost, who=f"mysql mount {backend.mount}", statement="ALTER USER",
        login=login, settle=settle, logout=logout,
        wrong_password=lambda exc: _error_code(exc) == _ER_ACCESS_DENIED,
        old=backend._password, new=new, seconds=CONNECT_TIMEOUT)


def _native_hash(password: str) -> str:
    """The ``mysql_native_password`` hash of ``password``, as the server stores it."""
    inner = hashlib.sha1(password.encode()).digest()  # noqa: S324 - the server's format
    return "*" + hashlib.sha1(inner).hexdigest().upper()  # noqa: S324


def _holds(current: str | None, ours: str | None, new: str) -> bool | None:
    """Whether the admin account (``current``: its SHOW CREATE USER now) still holds the
    password ``new`` this rotation set (``ours``: the account right after it); None: unknown.

    A ``mysql_native_password`` hash is unsalted, so it is compared with ``new``'s
    own (closing the moment between our ALTER and ``ours``). Salted ones (MySQL 8's
    ``caching_sha2_password``) change with every ALTER, even to the same password,
    so the account is compared with ``ours``.
    """
    if current is None:
        return None
    hashes = _NATIVE_HASHES.findall(current)
    if hashes:
        want = _native_hash(new)
        return all(hmac.compare_digest(h, want) for h in hashes)
    if ours is None:
        return None
    return hmac.compare_digest(current, ours)

