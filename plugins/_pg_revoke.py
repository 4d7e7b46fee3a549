"""How the PostgreSQL backend revokes a role so that the credential is really dead.

``PostgresBackend.delete_user`` runs ``_revoke``; the sweeper's batches
(``delete_users``) run ``_revoke_many`` for the roles with the default
statements. The protocol, on one pooled admin connection:

1. ``ALTER ROLE ... NOLOGIN`` is committed first, so no new session can start;
2. every session of the role is signalled at once (``pg_terminate_backend``),
   then the broker waits until all have exited;
3. in one transaction: sessions are swept once more by role oid (a login that
   passed authentication just before step 1 committed), then an admin
   without the role's privileges (no superuser) makes itself a member of it,
   its functions lose ``SECURITY DEFINER`` (``_STRIP_DEFINER``), its objects
   are handed to the mount's ``reassign_owned_to`` role (by default the
   admin) and its privileges dropped (``REASSIGN OWNED``/``DROP OWNED``), then
   the role is dropped.

``REASSIGN OWNED`` and ``DROP OWNED`` see the current database only. A role
that owns objects or holds privileges in other databases of the cluster (step
2 reports it) first gets the same two statements there, one transaction per
database on a short-lived connection of its own (``_clean_elsewhere``).

Before step 1, two roles are refused, so that nothing is changed on them
(no ``NOLOGIN``, no session ended): the mount's admin role itself
(``PostgresBackend.delete_user`` raises), and, in a rollback, a role that
is not this lease's (``_not_ours``). Every issue tags its role, in its
creation transaction, with a ``COMMENT`` naming a hash of its lease id
(``_owner_tag``); a rollback (an issue that never completed: a crash, a
timeout, a failed COMMIT) revokes the role of its name only if it carries
its own lease's tag. A role that existed before the issue (made by hand, the
admin's, another lease's under a template without ``{{random}}``) carries
none or another, and is left as it was.

Custom ``revocation_statements`` replace the statements of step 3 only; if
the role then still cannot be dropped because of other databases, those are
cleaned up the same way and the statements run once more. The whole
revocation runs in three round trips (plus, for a role with dependencies in
other databases only, one query and a connection per such database, and for
a rollback, the one query that reads the role's tag).
``_revoke_many`` goes through the same three steps for all roles of a batch
together, still three round trips for the whole batch.

A module of its own so that ``plugins.postgres`` keeps to the plugin class
and the issue path. The functions here take the
``PostgresBackend`` they revoke for and use its transaction runner
(``_transaction``: one round trip, transient conflicts retried, errors
classified by ``plugins._pg_errors``), its DDL lock rule (``_needs_lock``,
``_serialize_ddl``) and, for the other databases, its connection settings.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from broker.backend import BackendError, DeleteUserRequest
from plugins._pg_errors import _Dependents, _Missing, _wrap
from plugins._sql import escape_identifier, escape_literal, quote_identifier

if TYPE_CHECKING:
    from plugins.postgres import PostgresBackend

# The plugin's logger, not this module's: logging set up for "plugins.postgres"
# sees revocation's records too.
log = logging.getLogger("plugins.postgres")

# Objects the role created are kept (owned by the admin, or the mount's
# reassign_owned_to role: _default_statements renders them with it); its grants
# go with DROP OWNED.
DEFAULT_REVOCATION_STATEMENTS = (
    'REASSIGN OWNED BY "{{name}}" TO CURRENT_USER',
    'DROP OWNED BY "{{name}}"',
    'DROP ROLE IF EXISTS "{{name}}"',
)
#: How long a revocation waits for admin sessions cut off mid-COMMIT to end
#: (PostgresBackend._settle), and for a CREATE ROLE under way (_created_meanwhile).
_SETTLE_SECONDS = 10.0
#: The SQLSTATE _created_meanwhile raises to undo its probing CREATE ROLEs (and catches).
_UNDO = "BRK01"
#: How long the last sweep of step 3 waits for each session it ends (PostgreSQL 14+), in ms.
_TERMINATE_WAIT_MS = 5000
# REASSIGN OWNED needs the privileges of the role: a superuser has them, a
# CREATEROLE admin (least privilege) does not, not even for roles it created
# (PostgreSQL 15 and older make it no member; 16+ give it ADMIN OPTION only).
# Such an admin first makes itself a member (what CREATEROLE, or that ADMIN
# OPTION, allows) in the dropping transaction, before the default statements.
# Only when it lacks them ("usable" below): a superuser's revocation is
# unchanged, e.g. for a role that was made a member of the admin's role.
_JOIN_ROLE = 'GRANT "{name}" TO CURRENT_USER'
# Before REASSIGN OWNED, the default revocation makes every SECURITY DEFINER
# function or procedure the roles own in the current database SECURITY INVOKER.
# Whoever receives it (the admin by default) would otherwise lend its rights to
# whoever may call it: a leased role could leave one behind for another
# credential to escalate with. The functions are kept (the contract keeps what
# the role created), they just run with the caller's rights. The roles' owned
# functions are found in pg_shdepend (an index probe by role), so this costs
# no round trip: one more statement in transactions the revocation runs anyway.
# {roles}: a list of role oids, or a subquery giving them.
_STRIP_DEFINER = """DO $broker$ DECLARE f regprocedure; BEGIN
FOR f IN SELECT p.oid::regprocedure FROM pg_shdepend d JOIN pg_proc p ON p.oid = d.objid
          WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid IN ({roles})
            AND d.classid = 'pg_proc'::regclass AND d.deptype = 'o' AND p.prosecdef
            AND d.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
LOOP EXECUTE format('ALTER ROUTINE %s SECURITY INVOKER', f); END LOOP; END $broker$"""


#: The start of the COMMENT an issue gives its role (_owner_tag).
_TAG_PREFIX = "broker lease sha256:"
# The tag a rollback checks: the role's comment (pg_shdescription). A comment
# is the one mark a CREATEROLE admin can put on a role it created without
# more rights, that the role itself cannot change (COMMENT ON ROLE needs
# CREATEROLE), and that DROP ROLE takes along.
_TAG_OF = ("SELECT shobj_description(oid, 'pg_authid') AS tag"
           " FROM pg_roles WHERE rolname = $1")


def _owner_tag(lease_id: str) -> str | None:
    """The COMMENT that marks a role as made by the issue of lease ``lease_id``.

    A hash, not the id itself: every role may read the comments of all roles.
    None for a caller that names no lease (the conformance kit): nothing to tag
    or check.
    """
    if not lease_id:
        return None
    return _TAG_PREFIX + hashlib.sha256(lease_id.encode()).hexdigest()[:32]


async def _not_ours(conn: asyncpg.Connection, name: str, owner: str) -> bool:
    """Whether role ``name`` exists and is not tagged ``owner`` (a rollback must leave it).

    A role that does not exist is not refused here: step 1 then finds it
    missing, or waits for a CREATE under way (``_created_meanwhile``) and
    runs ``_revoke`` again, which looks once more.
    """
    row = await conn.fetchrow(_TAG_OF, name)
    if row is None or row["tag"] == owner:
        return False
    tag = row["tag"]
    why = ("it is tagged for another lease" if isinstance(tag, str)
           and tag.startswith(_TAG_PREFIX) else
           "it carries no tag of this lease: it existed before the issue (or its "
           "creation_statements set a COMMENT of their own, or a broker before this "
           "version made it)")
    log.warning("delete_user: rollback leaves role %s alone: %s; drop it by hand if it is "
                "a leftover of the failed issue", name, why)
    return True


def _target(backend: PostgresBackend) -> str:
    """Who REASSIGN OWNED hands objects to: the quoted ``reassign_owned_to`` role, or the admin."""
    target = backend._reassign_owned_to
    return "CURRENT_USER" if target is None else f'"{escape_identifier(target)}"'


def _default_statements(backend: PostgresBackend, roles: str, oids: str) -> list[str]:
    """The default revocation statements of step 3 for ``roles`` (quoted, comma-separated)."""
    return [
        _STRIP_DEFINER.format(roles=oids),
        f"REASSIGN OWNED BY {roles} TO {_target(backend)}",
        f"DROP OWNED BY {roles}",
        f"DROP ROLE IF EXISTS {roles}",
    ]

# REASSIGN OWNED and DROP OWNED act on the current database only: a role that
# owns objects, holds privileges or is named in policies in another database
# of the cluster cannot be dropped ("some objects depend on it") until the
# same is done there (_clean_elsewhere). pg_shdepend, a shared catalog, lists
# those dependencies for every database. dbid 0 are shared objects (databases,
# tablespaces), which REASSIGN/DROP OWNED handle from any database. The check
# below is one more index probe in the query of step 2, so the common case (no
# such dependency) costs no round trip; only a role that has some gets the
# query that names the databases (_ELSEWHERE) and a connection to each.
_ELSEWHERE_EXISTS = """EXISTS (SELECT 1 FROM pg_shdepend d
                WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid = r.oid
                  AND d.dbid NOT IN (0, (SELECT oid FROM pg_database
                                          WHERE datname = current_database())))"""
# Step 2 of revocation. pg_terminate_backend stays in a target list, so it only
# ever runs for rows the WHERE clause kept. Every session is signalled at once
# (the non-waiting form) and the caller then polls until all are gone
# (_wait_sessions_gone). Not the waiting pg_terminate_backend(pid, timeout) of
# PostgreSQL 14+: it sleeps 100 ms before its first look at each pid, so a
# role's sessions ended one after another cost 100 ms each (4 s for 40; 300
# would fill the 30 s backend timeout), and while one was waited for, the
# others ran on: a write queued behind a lock of the session just ended got
# the lock and committed in the middle of the revocation. Sessions waiting on
# a lock are signalled first: by the time the holder dies and its locks go,
# each of them already has its termination pending and dies instead of going on.
# (Waiting is read from pg_locks, which every role may read; pg_stat_activity
# hides wait_event_type of other roles' sessions from an admin that is no
# superuser.)
# Also reports whether the role holds privileges on objects (ACL dependencies):
# DROP OWNED then rewrites those objects' ACLs, which is what needs the DDL
# lock; whether the admin has the role's privileges (_JOIN_ROLE); and whether
# it has dependencies in other databases (_ELSEWHERE_EXISTS).
_END_SESSIONS = f"""
SELECT r.oid,
       (SELECT count(*)
          FROM (SELECT pg_terminate_backend(a.pid)
                  FROM (SELECT pid FROM pg_stat_activity
                         WHERE usesysid = r.oid AND pid <> pg_backend_pid()
                         ORDER BY pid IN (SELECT l.pid FROM pg_locks l
                                        WHERE NOT l.granted AND l.pid IS NOT NULL) DESC) a) t
       ) AS left_,
       EXISTS (SELECT 1 FROM pg_shdepend d
                WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid = r.oid
                  AND d.deptype = 'a') AS granted,
       pg_has_role(current_user, r.oid, 'USAGE') AS usable,
       {_ELSEWHERE_EXISTS} AS elsewhere
  FROM pg_roles r WHERE r.rolname = $1
"""
_COUNT_SESSIONS = (
    "SELECT count(*) FROM pg_stat_activity WHERE usesysid = $1 AND pid <> pg_backend_pid()"
)
# The batch form of step 2: the same per role, for the roles named in $1 that
# exist. The sessions are read (and signalled) in one pass, once: a CTE calling
# a volatile function is evaluated once, whatever refers to it.
_END_SESSIONS_MANY = f"""
WITH r AS (SELECT oid, rolname FROM pg_roles WHERE rolname = ANY($1::text[])),
     t AS (SELECT a.usesysid, pg_terminate_backend(a.pid) AS signalled
             FROM (SELECT usesysid, pid FROM pg_stat_activity
                    WHERE usesysid IN (SELECT oid FROM r) AND pid <> pg_backend_pid()
                    ORDER BY pid IN (SELECT l.pid FROM pg_locks l
                                   WHERE NOT l.granted AND l.pid IS NOT NULL) DESC) a)
SELECT r.rolname, r.oid,
       (SELECT count(*) FROM t WHERE t.usesysid = r.oid) AS left_,
       EXISTS (SELECT 1 FROM pg_shdepend d
                WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid = r.oid
                  AND d.deptype = 'a') AS granted,
       pg_has_role(current_user, r.oid, 'USAGE') AS usable,
       {_ELSEWHERE_EXISTS} AS elsewhere
  FROM r
"""
_COUNT_SESSIONS_MANY = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE usesysid = ANY($1::oid[]) AND pid <> pg_backend_pid()"
)
#: Pauses between looks while the signalled sessions exit (~10 s in all): a
#: session rolling back a large transaction takes a while to go.
_SESSION_WAIT_PAUSES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8, *(1.0,) * 8)
_EXISTING_OIDS = "SELECT oid FROM pg_roles WHERE oid = ANY($1::oid[])"
# The other databases where the roles $1 have dependencies, and which of the
# roles have them there. ``open``: whether the database accepts connections
# (not template0, nor one left invalid by an interrupted DROP DATABASE).
_ELSEWHERE = """
SELECT db.datname, db.datallowconn AND db.datconnlimit <> -2 AS open,
       array_agg(DISTINCT d.refobjid) AS roles
  FROM pg_shdepend d JOIN pg_database db ON db.oid = d.dbid
 WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid = ANY($1::oid[])
   AND db.datname <> current_database()
 GROUP BY db.datname, open
 ORDER BY db.datname
"""


def _revocation_templates(req: DeleteUserRequest) -> Sequence[str]:
    """The role's revocation (or rollback) statements; DEFAULT_REVOCATION_STATEMENTS itself
    when it has none, so ``is`` tells whether the defaults apply."""
    role = req.role
    if role is not None and req.reason == "rollback" and role.rollback_statements:
        return role.rollback_statements
    if role is not None and role.revocation_statements:
        return role.revocation_statements
    return DEFAULT_REVOCATION_STATEMENTS


async def _revoke(
    backend: PostgresBackend,
    conn: asyncpg.Connection,
    name: str,
    templates: Sequence[str],
    statements: Sequence[str],
    *,
    custom: bool,
    owner: str | None = None,
) -> bool:
    """The revocation protocol on one connection; False if the role did not exist.

    ``owner`` (a rollback): the tag (``_owner_tag``) the role must carry to be
    revoked; a role without it is left untouched and False returned.
    """
    quoted = escape_identifier(name)
    # 0. Before anything changes: a rollback touches only its own issue's role.
    if owner is not None and await _not_ours(conn, name, owner):
        return False
    # 1. Committed on its own: a login racing step 2 must already see it.
    try:
        await backend._transaction(
            conn, "delete_user", [f'ALTER ROLE "{quoted}" NOLOGIN'], [],
            lock=backend._serialize_ddl is True,
        )
    except _Missing:
        if not await _created_meanwhile(conn, name):
            return False
        # Its COMMIT landed while we looked: revoke the role it made (if ours).
        return await _revoke(backend, conn, name, templates, statements, custom=custom,
                             owner=owner)
    # 2. Signal every session at once, then wait until all have exited (and
    #    so released their locks) before DROP OWNED.
    new_server = conn.get_server_version().major >= 14
    row = await conn.fetchrow(_END_SESSIONS, name)
    if row is None:  # dropped by a concurrent revocation since step 1
        return False
    oid = int(row["oid"])
    if row["left_"]:
        await _wait_sessions_gone(conn, oid)
    # 3. The last sweep runs first in the dropping transaction: a session
    #    that authenticated just before step 1 committed may only now show
    #    in pg_stat_activity (its snapshot is taken per transaction, so
    #    this must be the transaction's first look at it).
    wait = f", {_TERMINATE_WAIT_MS}" if new_server else ""
    sweep = (
        f"SELECT pg_terminate_backend(pid{wait}) FROM pg_stat_activity "
        f"WHERE usesysid = {oid} AND pid <> pg_backend_pid()"
    )
    lock = backend._needs_lock(templates) or (backend._serialize_ddl is None and row["granted"])
    unusable = () if row["usable"] else (oid,)
    if not custom:  # DEFAULT_REVOCATION_STATEMENTS, to the mount's target (_default_statements)
        statements = _default_statements(backend, f'"{quoted}"', str(oid))
    if not custom and unusable:
        statements = [_JOIN_ROLE.format(name=quoted), *statements]
    if not custom and row["elsewhere"]:
        # Its objects and privileges in other databases first (_ELSEWHERE_EXISTS).
        await _clean_elsewhere(backend, conn, {oid: name}, unusable)
    script = [sweep, *statements]
    try:
        existed = await backend._transaction(conn, "delete_user", script, [], lock=lock,
                                             custom=custom, role_oid=oid)
        await _check_dropped(conn, name, oid, custom)
        return existed
    except _Dependents as exc:
        error: BackendError = exc
    # Still depended on. From other databases too if custom statements ran
    # (which see only this one), or if something there appeared since
    # step 2: cleaned up there, the transaction runs once more.
    found = await _clean_elsewhere(backend, conn, {oid: name}, unusable)
    if found.cleaned:
        try:
            existed = await backend._transaction(conn, "delete_user", script, [], lock=lock,
                                                 custom=custom, role_oid=oid)
            await _check_dropped(conn, name, oid, custom)
            return existed
        except _Dependents as exc:
            error = exc
    raise _undroppable(error, found.closed)


async def _check_dropped(conn: asyncpg.Connection, name: str, oid: int, custom: bool
                         ) -> None:
    """After custom ``revocation_statements``: the role must be gone (docs/plugins.md:
    "yours must drop the role"). Statements that only lock it (``NOLOGIN``) or forgot
    the DROP would otherwise end the lease while the role, and its password, live
    on: that is a failure the operator must see (the lease goes irrevocable)."""
    if custom and await conn.fetchval("SELECT 1 FROM pg_roles WHERE oid = $1", oid):
        raise BackendError(f"revocation_statements ran but role {name!r} still exists: they "
                           f"must drop it (DROP ROLE \"{{{{name}}}}\")", retryable=False)


async def _revoke_many(backend: PostgresBackend, conn: asyncpg.Connection,
                       names: Sequence[str]) -> None:
    """The revocation protocol for many roles (default statements), in three round trips.

    The same steps as ``_revoke``, each for all roles at once; roles that
    do not exist (any more) are skipped, which is success. The caller
    (``PostgresBackend.delete_users``) leaves out the admin's own role and the
    rollbacks, which go one by one (``_revoke`` checks their tag).
    """
    # 1. NOLOGIN for every role that exists, committed on its own. A DO block
    #    so that a role already gone does not fail the others; the names
    #    are checked (a-z0-9_-) and quoted literals.
    listed = ", ".join(f"'{escape_literal(n)}'" for n in names)
    nologin = (
        "DO $broker$ DECLARE r name; BEGIN "
        f"FOR r IN SELECT rolname FROM pg_roles WHERE rolname IN ({listed}) LOOP "
        "EXECUTE format('ALTER ROLE %I NOLOGIN', r); END LOOP; END $broker$"
    )
    await backend._transaction(conn, "delete_user", [nologin], [],
                               lock=backend._serialize_ddl is True)
    # 2. Signal every session of all of them at once, one pass; then wait.
    new_server = conn.get_server_version().major >= 14
    rows = await conn.fetch(_END_SESSIONS_MANY, list(names))
    found = {row["rolname"] for row in rows}
    missing = [name for name in names if name not in found]
    if missing and await _created_meanwhile(conn, *missing):
        # One came into being since step 1: each role alone, that one included.
        raise BackendError("postgres delete_user: a role of the batch was committed "
                           "during the revocation", retryable=True)
    if not rows:
        return  # all gone already
    oids = [int(row["oid"]) for row in rows]
    if any(row["left_"] for row in rows):
        await _wait_sessions_gone_many(conn, [int(r["oid"]) for r in rows
                                                   if r["left_"]])
    unusable = {int(row["oid"]) for row in rows if not row["usable"]}
    elsewhere = {int(row["oid"]): str(row["rolname"]) for row in rows if row["elsewhere"]}
    if elsewhere:  # their objects and privileges in other databases first
        await _clean_elsewhere(backend, conn, elsewhere, unusable)
    # 3. Last sweep, then REASSIGN/DROP OWNED and DROP ROLE for all, in one
    #    transaction (see _revoke). Locked if any role holds grants.
    lock = (backend._needs_lock(DEFAULT_REVOCATION_STATEMENTS)
            or (backend._serialize_ddl is None and any(row["granted"] for row in rows)))
    wait = f", {_TERMINATE_WAIT_MS}" if new_server else ""
    quoted = {int(row["oid"]): f'"{escape_identifier(row["rolname"])}"' for row in rows}
    while oids:
        listed_oids = ", ".join(str(oid) for oid in oids)
        roles = ", ".join(quoted[oid] for oid in oids)
        join = ", ".join(quoted[oid] for oid in oids if oid in unusable)
        statements = [
            f"SELECT pg_terminate_backend(pid{wait}) FROM pg_stat_activity "
            f"WHERE usesysid IN ({listed_oids}) AND pid <> pg_backend_pid()",
            *([f"GRANT {join} TO CURRENT_USER"] if join else []),  # see _JOIN_ROLE
            *_default_statements(backend, roles, listed_oids),
        ]
        try:
            await backend._transaction(conn, "delete_user", statements, [], lock=lock)
            return
        except _Missing as exc:
            error: BackendError = exc
        # A concurrent revocation dropped one of them meanwhile: go on without it.
        left = {int(row["oid"]) for row in await conn.fetch(_EXISTING_OIDS, oids)}
        if len(left) >= len(oids):
            raise BackendError(str(error), retryable=False)
        oids = [oid for oid in oids if oid in left]


async def _clean_elsewhere(backend: PostgresBackend, conn: asyncpg.Connection,
                           roles: Mapping[int, str], unusable: Collection[int]) -> _Elsewhere:
    """REASSIGN/DROP OWNED of ``roles`` (oid -> name) in the other databases they appear in.

    The statements the default revocation runs in this database, and by
    the same rule: _JOIN_ROLE first for the roles in ``unusable`` (revoked
    again at the end, as the membership is cluster-wide and this is not
    the dropping transaction). One transaction per database, on a
    connection of its own made like the pool's (connection_url with the
    database swapped, same TLS, timeouts and settings) and closed at once.
    Every database is tried; if any could not be cleaned up, a
    BackendError names them (what succeeded stays done, and a retry only
    finds what is left). Databases that accept no connections are skipped
    and returned, for the error of the DROP ROLE that then fails.
    """
    rows = await conn.fetch(_ELSEWHERE, list(roles))
    cleaned: list[str] = []
    closed: list[str] = []
    failed: list[tuple[str, BackendError]] = []
    for row in rows:
        database = str(row["datname"])
        if not row["open"]:
            closed.append(database)
            continue
        there = [int(oid) for oid in row["roles"]]
        names = [roles[oid] for oid in there]
        log.info("delete_user: %s also in database %s; reassigning and dropping there",
                 ", ".join(names), quote_identifier(database))
        try:
            await _clean_database(backend, database, names,
                                  [roles[oid] for oid in there if oid in unusable])
        except BackendError as exc:
            failed.append((database, exc))
            continue
        cleaned.append(database)
    if failed:
        reasons = "; ".join(
            f"database {quote_identifier(database)}: "
            f"{str(exc).removeprefix('postgres delete_user failed: ')}"
            for database, exc in failed)
        raise BackendError(
            f"postgres delete_user: cannot clean up role(s) {', '.join(roles.values())} in "
            f"another database of the cluster ({reasons}); the role is dropped once that "
            "succeeds", retryable=all(exc.retryable for _, exc in failed))
    return _Elsewhere(cleaned=cleaned, closed=closed)


async def _clean_database(backend: PostgresBackend, database: str, names: Sequence[str],
                          unusable: Sequence[str]) -> None:
    """``_clean_elsewhere`` in one database: REASSIGN OWNED and DROP OWNED of ``names``.

    The same as the default step 3 there: ``_STRIP_DEFINER`` first, objects to ``_target``.
    """
    roles = ", ".join(f'"{escape_identifier(name)}"' for name in names)
    join = ", ".join(f'"{escape_identifier(name)}"' for name in unusable)
    listed = ", ".join(f"'{escape_literal(name)}'" for name in names)
    statements = [
        *([f"GRANT {join} TO CURRENT_USER"] if join else []),  # see _JOIN_ROLE
        _STRIP_DEFINER.format(roles=f"SELECT oid FROM pg_roles WHERE rolname IN ({listed})"),
        f"REASSIGN OWNED BY {roles} TO {_target(backend)}",
        f"DROP OWNED BY {roles}",
        *([f"REVOKE {join} FROM CURRENT_USER"] if join else []),
    ]
    error: BackendError | None = None
    try:
        # The name goes as a connection parameter, never into a DSN string;
        # explicit arguments win over connection_url's.
        side = await asyncpg.connect(backend._dsn, database=database, **backend._connect_kwargs())
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        if getattr(exc, "sqlstate", None) == "3D000":
            return  # dropped since: its dependencies went with it
        error = _wrap("delete_user", exc, [backend._secret])
    if error is not None:
        raise error
    try:
        await backend._transaction(side, "delete_user", statements, [],
                                   lock=backend._serialize_ddl is not False)
    except _Missing:
        pass  # dropped by a concurrent revocation; a batch goes on role by role
    except (asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        error = _wrap("delete_user", exc, [backend._secret])
    except BaseException:
        side.terminate()
        raise
    if error is not None:
        side.terminate()
        raise error
    try:
        await side.close(timeout=backend._connect_timeout)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        side.terminate()
    except BaseException:
        side.terminate()
        raise


async def _created_meanwhile(conn: asyncpg.Connection, *names: str) -> bool:
    """Whether a role of ``names``, not found, exists once a CREATE of it under way ends.

    An issue makes its lease active beside the role's COMMIT, so a
    revocation can meet the lease while the CREATE ROLE is still
    uncommitted in the issuing session, where no other session sees it.
    Calling that "no role" would let the COMMIT leave a role nobody
    tracks. Creating the same names here waits on the other transactions'
    entries in the roles' unique index until they end: one committed,
    ours fails (that role exists); all rolled back, ours go through and
    are rolled back at once (there is no role). One round trip for all
    the names. Works across replicas, which cannot see each other's
    staged roles.

    The wait is bounded by ``lock_timeout`` and, when ``backend_timeout`` is
    shorter, by the call's cancellation (the server then cancels the
    statement). Either way the connection must go back to the pool idle, so
    the creates are undone by an error raised and caught in their own block
    (``_UNDO``), in one implicit transaction: an explicit ``BEGIN`` left an
    aborted transaction block behind a cancellation, which the pool reset
    with an ERROR log line, and a ``ROLLBACK`` in an implicit transaction
    logs a WARNING on the server at every check.
    """
    creates = "".join(f'CREATE ROLE "{escape_identifier(name)}" NOLOGIN; ' for name in names)
    # The block's body is dollar-quoted: the tag must not occur in it (a name
    # holding "$broker$" would end the quote early and run the rest as SQL).
    tag = "$broker$"
    while tag in creates:
        tag = tag[:-1] + "_$"
    script = (f"SET LOCAL lock_timeout = {int(_SETTLE_SECONDS * 1000)}\n;\n"
              f"DO {tag} BEGIN {creates}RAISE SQLSTATE '{_UNDO}'; "
              f"EXCEPTION WHEN SQLSTATE '{_UNDO}' THEN NULL; END {tag}")
    try:
        await conn.execute(script)
        return False
    except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
        return True
    except asyncpg.LockNotAvailableError:
        raise BackendError(f"postgres delete_user: role(s) {', '.join(names)} still being "
                           "created by another session; revoking later",
                           retryable=True) from None
    except asyncpg.PostgresError as exc:  # e.g. an admin without CREATEROLE
        log.warning("delete_user: cannot tell whether %s is being created (%s: %s); "
                    "taking it as absent", ", ".join(names), type(exc).__name__,
                    exc.sqlstate)
        return False


async def _wait_sessions_gone_many(conn: asyncpg.Connection, oids: list[int]) -> None:
    """``_wait_sessions_gone`` for several roles."""
    left = 0
    for pause in _SESSION_WAIT_PAUSES:
        await asyncio.sleep(pause)
        left = int(await conn.fetchval(_COUNT_SESSIONS_MANY, oids))
        if not left:
            return
    raise BackendError(
        f"postgres delete_user: {left} session(s) of the roles did not end; will retry",
        retryable=True,
    )


async def _wait_sessions_gone(conn: asyncpg.Connection, oid: int) -> None:
    """Poll (with growing pauses, ~10 s in all) until role ``oid`` has no session."""
    left = 0
    for pause in _SESSION_WAIT_PAUSES:
        await asyncio.sleep(pause)
        left = int(await conn.fetchval(_COUNT_SESSIONS, oid))
        if not left:
            return
    raise BackendError(
        f"postgres delete_user: {left} session(s) of the role did not end; will retry",
        retryable=True,
    )


def _undroppable(error: BackendError, closed: Sequence[str]) -> BackendError:
    """``error`` (DROP ROLE refused), saying which databases could not be cleaned up."""
    if not closed:
        return error
    databases = ", ".join(quote_identifier(database) for database in closed)
    return BackendError(f"{error}; not cleaned up: database(s) {databases} accept no connections"
                        " (datallowconn): allow connections, or run REASSIGN OWNED and DROP OWNED"
                        " there by hand", retryable=False)


@dataclass(frozen=True)
class _Elsewhere:
    """What ``_clean_elsewhere`` found in the other databases of the cluster."""

    #: databases where the roles' dependencies were cleaned up.
    cleaned: Sequence[str]
    #: databases with dependencies that accept no connections (e.g. template0).
    closed: Sequence[str]

