"""How the MySQL backend ends sessions on the server, and waits until they are gone.

Neither closing a connection nor ``KILL`` ends a session at once: the server
finishes the statement a closed connection was running, and a killed session
stays in the process list (``COMMAND`` ``Killed``) while it rolls back. So
the plugin kills and then polls ``information_schema.PROCESSLIST`` until the
sessions are gone (``_kill_and_wait``, up to ``_SETTLE_SECONDS``, else a
retryable error), for three kinds of session:

- the admin's own sessions this process dropped mid-statement (``_settle``):
  a ``CREATE USER`` among them could still create its user after a
  revocation found nothing to drop; every revocation ends them first, and
  rotate-root before it asks the server which password it took;
- the sessions of a user being revoked (``_kill_sessions``): a dropped
  account's open connections otherwise keep all their privileges;
- for a rollback, admin sessions (of any broker, one killed with kill -9
  among them) still running a statement that could create the user
  (``_end_creating_sessions``).

A module of its own so that ``plugins.mysql`` keeps to the plugin class and
the issue path; the revocation (``plugins._mysql_revoke``) and rotate-root
(``plugins._mysql_rotate``) use these. The functions take the
``MySQLBackend`` they work for and use its statement runner (``_run``), its
error wrapper (``_wrap``) and its record of dropped sessions (``_unsettled``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pymysql

from broker.backend import BackendError
from plugins._mysql_driver import _ER_NO_SUCH_THREAD, _error_code

if TYPE_CHECKING:
    from plugins.mysql import MySQLBackend

# The plugin's logger, not this module's: logging set up for "plugins.mysql"
# sees these records too.
log = logging.getLogger("plugins.mysql")

#: How long a revocation waits for admin sessions dropped mid-statement to end (_settle).
_SETTLE_SECONDS = 10.0


async def _settle(backend: MySQLBackend, cur: Any) -> None:
    """End the admin sessions dropped mid-statement, and wait until they are gone.

    Closing a connection does not stop the statement it was running: the
    server finishes it. A ``CREATE USER`` cut off that way (the backend
    timeout, shutdown) could still create its user after the rollback's
    ``DROP USER IF EXISTS`` found nothing, and MySQL users never expire
    by themselves. So every revocation first kills those sessions and
    waits for them to go (thread ids are not reused while the server runs).
    """
    if not backend._unsettled:
        return
    # Thread ids start again from 1 when the server restarts: a session
    # dropped before the restart died with it, and its id may now name
    # another connection (the broker's own among them). Forget those.
    await backend._run(cur, "reading the server's uptime", "SHOW GLOBAL STATUS LIKE 'Uptime'")
    row = await cur.fetchone()
    now = asyncio.get_running_loop().time()
    booted = now - int(row[1]) - 1.0  # Uptime is in whole seconds
    for thread_id, dropped in list(backend._unsettled.items()):
        if dropped < booted:
            del backend._unsettled[thread_id]
    ids = sorted(backend._unsettled)
    if not ids:
        return
    # Only sessions of the admin account: a drop recorded within a second
    # of a restart is kept above, and its id may name somebody else's.
    query = ("SELECT ID FROM information_schema.PROCESSLIST"
             f" WHERE ID IN ({', '.join(['%s'] * len(ids))})"
             " AND USER = SUBSTRING_INDEX(CURRENT_USER(), '@', 1)")
    await backend._run(cur, "finding dropped admin sessions", query, params=tuple(ids))
    alive = [int(row[0]) for row in await cur.fetchall()]
    await _kill_and_wait(backend, cur, alive, "a dropped admin session",
                         "an admin session dropped mid-statement is still ending;"
                         " revoking later")
    for thread_id in ids:
        backend._unsettled.pop(thread_id, None)


async def _kill_and_wait(backend: MySQLBackend, cur: Any, ids: Sequence[int], what: str,
                         still_there: str) -> None:
    """KILL the sessions ``ids`` and wait (``_SETTLE_SECONDS``) until they are gone;
    a retryable BackendError(``still_there``) if they are not."""
    if not ids:
        return
    for thread_id in ids:
        try:
            await cur.execute(f"KILL CONNECTION {thread_id:d}")
        except pymysql.err.MySQLError as exc:
            if _error_code(exc) != _ER_NO_SUCH_THREAD:  # gone already: fine
                raise backend._wrap(f"ending {what}", exc) from None
    gone = ("SELECT ID FROM information_schema.PROCESSLIST"
            f" WHERE ID IN ({', '.join(['%s'] * len(ids))})")
    deadline = asyncio.get_running_loop().time() + _SETTLE_SECONDS
    while True:
        await backend._run(cur, f"waiting for {what} to end", gone, params=tuple(ids))
        if not await cur.fetchall():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise BackendError(f"mysql: {still_there}", retryable=True)
        await asyncio.sleep(0.05)


async def _kill_sessions(backend: MySQLBackend, cur: Any, name: str, *,
                         final: bool = False) -> None:
    """KILL every live session of ``name``; with ``final``, wait until none is left.

    A killed session stays in the process list (``COMMAND`` ``Killed``)
    until it has ended: a statement in the middle of a large write rolls
    back first, holding its locks, which may take seconds. ``final`` waits
    for those too (up to ``_SETTLE_SECONDS``, else a retryable error), so
    a revocation never returns while a session of the user is still there.
    """
    if final:
        for _ in range(5):
            # Killed ones included: the wait below is for them to be gone.
            await backend._run(cur, "listing sessions",
                               "SELECT ID, USER FROM information_schema.PROCESSLIST "
                               "WHERE USER = %s", params=(name,))
            ids = _sessions_of(await cur.fetchall(), name)
            if not ids:
                return
            await _kill_and_wait(
                backend, cur, ids, "the user's sessions",
                f"sessions of {name!r} are still ending after KILL (a long rollback?);"
                " will retry")
        raise BackendError(
            f"mysql: sessions of {name!r} are still alive after KILL; will retry",
            retryable=True,
        )
    await backend._run(
        cur,
        "listing sessions",
        "SELECT ID, USER FROM information_schema.PROCESSLIST "
        "WHERE USER = %s AND COMMAND <> 'Killed'",
        params=(name,),
    )
    ids = _sessions_of(await cur.fetchall(), name)
    for thread_id in ids:
        try:
            await cur.execute(f"KILL CONNECTION {thread_id:d}")
        except pymysql.err.MySQLError as exc:
            if _error_code(exc) != _ER_NO_SUCH_THREAD:  # ended meanwhile: fine
                raise backend._wrap("killing sessions", exc) from None


async def _end_creating_sessions(backend: MySQLBackend, cur: Any, name: str) -> None:
    """KILL the admin account's sessions still running a statement naming ``name``.

    ``_settle`` does this for the sessions this process dropped; a broker
    that was killed (kill -9) left no such record, and its creation
    statement may still be running on the server (waiting on a lock): it
    would create the user after the rollback's DROP USER found nothing.
    Matched on the statement text (the name between non-name characters),
    which is only compared in SQL: it may hold a password, so it is never
    read, logged or returned.
    """
    pattern = f"(^|[^a-z0-9_-]){name}([^a-z0-9_-]|$)"  # name is [a-z0-9_-] only
    # Not the broker's own reads and drops of the name (another rollback's
    # scan like this one, a revocation's DROP USER or KILL): only what could
    # still create it (CREATE USER, GRANT, EXECUTE IMMEDIATE, CALL ...).
    query = ("SELECT ID FROM information_schema.PROCESSLIST"
             " WHERE USER = SUBSTRING_INDEX(CURRENT_USER(), '@', 1)"
             " AND ID <> CONNECTION_ID() AND INFO IS NOT NULL"
             " AND LOWER(INFO) REGEXP %s"
             " AND LOWER(INFO) NOT REGEXP '^[[:space:]]*(select|show|kill|drop|revoke|alter)'")
    await backend._run(cur, "finding unfinished creation statements", query, params=(pattern,))
    ids = [int(row[0]) for row in await cur.fetchall()]
    if ids:
        log.warning("mysql: ending %d admin session(s) still running a statement for %s",
                    len(ids), name)
    await _kill_and_wait(backend, cur, ids, "an unfinished creation statement",
                         "an admin session creating this user is still ending;"
                         " rolling back later")


def _sessions_of(rows: Any, name: str) -> list[int]:
    """The thread ids of ``rows`` (ID, USER) that are ``name``'s, to the letter.

    PROCESSLIST.USER compares without case (``utf8mb3_general_ci``) while account
    names are case-sensitive: ``USER = 'alice'`` also finds the sessions of an
    account ``Alice`` (or of an admin ``Alice``), which a revocation must not kill.
    """
    return [int(row[0]) for row in rows if str(row[1]) == name]

