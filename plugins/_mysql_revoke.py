"""How the MySQL backend revokes a user so that the credential is really dead.

``MySQLBackend.delete_user`` checks the name, renders the role's custom
statements and then runs ``_revoke`` on one pooled admin connection. First
it ends any admin session of the broker's own that was dropped mid-statement
(``_settle``), and for a rollback any admin session still running a statement
that names the user (``_end_creating_sessions``, both in
``plugins._mysql_sessions``); then, in an order that leaves no window for a
live session:

1. ``ALTER USER ... ACCOUNT LOCK`` for every host of the user: no new logins;
2. ``KILL CONNECTION`` for every ``information_schema.PROCESSLIST`` row of the
   user (a session that ended meanwhile is fine) - a dropped account's open
   connections otherwise keep all their privileges;
3. the role's ``revocation_statements`` (``rollback_statements`` for a
   rollback), if any, unless ``mysql.user`` shows the user on no host (gone
   already: Vault-style ``REVOKE ... FROM`` would fail on every retry); one
   the server refuses ends them, step 4 still runs, and then its error fails
   the revocation (whose retry finds the user gone);
4. ``DROP USER IF EXISTS`` for every host, then a last ``KILL`` of what slipped
   in and a wait until no session of the user is left, killed ones still
   ending (rolling back) included: the revocation returns only once they are
   gone (a retryable error after ``_SETTLE_SECONDS``).

A rollback of an issue this process did not make itself goes through these
steps only if every account of the name carries its own lease's owner tag
(``_all_ours``; the tag is ``plugins._mysql_grants``'s): else it leaves them
all alone, with a warning, since the steps cannot spare one host of a name.

A module of its own so that ``plugins.mysql`` keeps to the plugin class and
the issue path. The functions take the ``MySQLBackend`` they revoke for and
use its statement runner (``_run``), its error wrapper (``_wrap``) and its
reading of a user's hosts (``_user_hosts``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pymysql

from broker.backend import BackendError
from plugins._mysql_driver import (
    _ACCESS_DENIED,
    _ER_CANNOT_USER,
    _ER_PARSE_ERROR,
    _account,
    _error_code,
)
from plugins._mysql_grants import TAG_FLOOR
from plugins._mysql_sessions import _end_creating_sessions, _kill_sessions, _settle
from plugins._sql import quote_literal

if TYPE_CHECKING:
    from plugins.mysql import MySQLBackend

# The plugin's logger, not this module's: logging set up for "plugins.mysql"
# sees revocation's records too.
log = logging.getLogger("plugins.mysql")


async def _revoke(backend: MySQLBackend, cur: Any, name: str, hosts: set[str],
                  custom: Sequence[str], key: str, *, rollback: bool,
                  owner: tuple[int, int] | None) -> BackendError | None:
    """Revoke user ``name`` (steps above) on ``hosts`` and every host it has.

    ``custom``: the role's rendered ``key`` statements (step 3). ``owner``: the
    tag every account of the name must carry, else it is left alone (None: no
    check). Returns the error of a custom statement the server refused, which
    fails the revocation once the user is gone (None: revoked, or left alone).
    """
    await _settle(backend, cur)
    if rollback:
        # Only a rollback undoes an issue whose creation statement may
        # still run (this broker, or one killed before it, gave up on
        # it). Any other revocation follows a new_user that returned:
        # no statement creating this user is left, and the scan would
        # only cost a query and risk ending another revoker's session.
        await _end_creating_sessions(backend, cur, name)
    if owner is not None and not await _all_ours(backend, cur, name, owner):
        return None
    found = await backend._user_hosts(cur, name)
    hosts |= found or set()
    for host in sorted(hosts):
        await _lock_account(backend, cur, name, host)
    await _kill_sessions(backend, cur, name)
    if found == set():
        # Gone already (dropped by hand, a rollback of a user that was
        # never made or that new_user dropped): custom statements such
        # as Vault's "REVOKE ALL PRIVILEGES ... FROM '{{name}}'" would
        # fail on every retry and leave the lease irrevocable.
        custom = ()
    failed: BackendError | None = None
    for i, stmt in enumerate(custom):
        try:
            await backend._run(cur, f"revoking user ({key} statement {i + 1})", stmt)
        except BackendError as exc:
            if exc.retryable:
                raise  # the server is in trouble: the whole revocation later
            # The server refused it (bad SQL, a missing object): the
            # account still goes ("DROP USER always"), so no locked
            # account outlives a lease that ends irrevocable or forced;
            # the error still fails this revocation for the operator.
            failed = exc
            break
    for host in sorted(hosts):
        stmt = f"DROP USER IF EXISTS {quote_literal(name)}@{quote_literal(host)}"
        await backend._run(cur, "revoking user", stmt)
    # A session that slipped in before the lock took hold dies here.
    await _kill_sessions(backend, cur, name, final=True)
    return failed


async def _all_ours(backend: MySQLBackend, cur: Any, name: str, owner: tuple[int, int]) -> bool:
    """Whether every account of ``name`` carries the tag ``owner`` (or none exists).

    Else a rollback leaves the name alone, every host of it: its steps (lock,
    kill every session of the name, drop) cannot spare one account of a name.
    An account without the tag existed before the issue (made by hand, by a
    broker before this version, or another lease's under a template without
    ``{{random}}``), or the issue's custom creation statements made it and
    the broker died before tagging it, or they set those limits themselves.
    """
    try:
        await cur.execute("SELECT Host, max_updates, max_connections FROM mysql.user"
                          " WHERE User = %s", (name,))
    except pymysql.err.MySQLError as exc:
        if _error_code(exc) not in _ACCESS_DENIED:
            raise backend._wrap("revoking user", exc) from None
        log.warning("mysql: rollback leaves user %s alone: cannot read mysql.user to tell "
                    "whether its issue made it; drop it by hand if it is a leftover of the "
                    "failed issue (and grant the admin SELECT on mysql.user)", name)
        return False
    others = sorted((str(host), int(updates), int(conns))
                    for host, updates, conns in await cur.fetchall()
                    if (int(updates), int(conns)) != owner)
    if not others:
        return True
    tagged = all(u >= TAG_FLOOR and c >= TAG_FLOOR for _, u, c in others)
    why = ("it is tagged for another lease" if tagged else
           "it carries no tag of this lease: it existed before the issue (or the role's "
           "creation_statements set MAX_UPDATES_PER_HOUR/MAX_CONNECTIONS_PER_HOUR "
           "themselves, or made it without the tag before the broker stopped, or a "
           "broker before this version made it)")
    log.warning("mysql: rollback leaves user %s alone (%s): %s; drop it by hand if it is "
                "a leftover of the failed issue", name,
                ", ".join(_account(name, h) for h, _, _ in others), why)
    return False


async def _lock_account(backend: MySQLBackend, cur: Any, name: str, host: str) -> None:
    stmt = f"ALTER USER IF EXISTS {quote_literal(name)}@{quote_literal(host)} ACCOUNT LOCK"
    try:
        await cur.execute(stmt)
    except pymysql.err.MySQLError as exc:
        # Servers before MySQL 5.7.6 / MariaDB 10.4 have no ACCOUNT LOCK: the
        # kill-then-drop of _revoke still revokes, only the window is wider.
        if _error_code(exc) not in {_ER_PARSE_ERROR, _ER_CANNOT_USER}:
            raise backend._wrap("revoking user", exc) from None

