"""The PostgreSQL backend: one login role per lease, dropped on revocation.

Credentials are roles created from the role's ``creation_statements`` (by
default ``CREATE ROLE ... LOGIN PASSWORD ... VALID UNTIL ...`` and nothing
more). ``VALID UNTIL`` always carries the lease expiry, so PostgreSQL itself
refuses the password if the broker is down when the lease ends.

``{{password}}`` in creation statements is a SCRAM-SHA-256 verifier the broker
computed (``password_hashing = "scram-sha-256"``, the default), so the
plaintext never reaches the server or its logs; ``"server"`` sends the
plaintext for the server to hash, as Vault does.

Revocation is built so that a revoked credential is really dead:

1. ``ALTER ROLE ... NOLOGIN`` is committed first, so no new session can start;
2. every session of the role is signalled at once (``pg_terminate_backend``),
   then the broker waits until all have exited;
3. in one transaction: sessions are swept once more by role oid (a login that
   passed authentication just before step 1 committed), then an admin
   without the role's privileges (no superuser) makes itself a member of it,
   the role's objects are handed to the admin and its privileges dropped
   (``REASSIGN OWNED``/``DROP OWNED``), then the role is dropped.

``REASSIGN OWNED`` and ``DROP OWNED`` see the current database only. A role
that owns objects or holds privileges in other databases of the cluster (step
2 reports it) first gets the same two statements there, one transaction per
database on a short-lived connection of its own (``_clean_elsewhere``).

Custom ``revocation_statements`` replace the statements of step 3 only; if
the role then still cannot be dropped because of other databases, those are
cleaned up the same way and the statements run once more. The whole
revocation runs on one pooled connection in three round trips (plus, for a
role with dependencies in other databases only, one query and a connection
per such database).

The sweeper revokes leases in batches (``delete_users``): roles revoked with
the default statements go through the same three steps together, still three
round trips for the whole batch (``_revoke_many``); roles with custom
statements are revoked one by one. If the batch fails, each of its roles is
revoked on its own, so one bad role does not fail the others.

Every transaction is ONE simple-protocol query: the statements joined by
``;``, which PostgreSQL runs as one implicit transaction (all or nothing; a
failing statement rolls it back and leaves the connection idle). DDL cannot
take bind parameters anyway; values are checked and quoted literals. The one
exception is how the broker issues: ``stage_user`` sends ``BEGIN`` and the
creation statements as one query and the ``COMMIT`` as a second, once the
engine says the lease's intent is durable (``broker.backend.StagingBackend``);
a revocation first settles any session cut off during such a COMMIT
(``_settle``).

Concurrent statements that rewrite the same catalog row (``GRANT ... ON``
a table, schema or database, ``ALTER DEFAULT PRIVILEGES``, and ``DROP OWNED``
of roles holding such grants) fail with "tuple concurrently updated". With
``serialize_ddl = "auto"`` (the default) only those transactions take a
per-database advisory lock (see ``_needs_lock``); ``true`` locks every
transaction, ``false`` none. That error, serialization failures and deadlocks
are retried with jittered backoff in every mode (writers outside the broker
do not take the lock).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import asyncpg

from broker.backend import (
    BackendError,
    Capabilities,
    DeleteUserRequest,
    DeleteUserResponse,
    MountSpec,
    NewUserRequest,
    NewUserResponse,
    PluginConfigError,
    RenewUserRequest,
    RenewUserResponse,
    RoleSpec,
    RotateRootRequest,
    RotateRootResponse,
    StagedUser,
)
from broker.durations import parse_duration
from broker.templating import generate_password, render, template_names
from plugins._scram import DEFAULT_ITERATIONS, scram_verifier
from plugins._sql import (
    backoff_delay,
    check_expiration,
    check_password,
    check_username,
    escape_identifier,
    escape_literal,
    quote_identifier,
    redact,
)

__all__ = [
    "DEFAULT_CREATION_STATEMENTS",
    "DEFAULT_RENEW_STATEMENTS",
    "DEFAULT_REVOCATION_STATEMENTS",
    "PostgresBackend",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_CREATION_STATEMENTS = (
    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'",
)
DEFAULT_RENEW_STATEMENTS = ("ALTER ROLE \"{{name}}\" VALID UNTIL '{{expiration}}'",)
# Objects the role created are kept (owned by the admin); its grants go with DROP OWNED.
DEFAULT_REVOCATION_STATEMENTS = (
    'REASSIGN OWNED BY "{{name}}" TO CURRENT_USER',
    'DROP OWNED BY "{{name}}"',
    'DROP ROLE IF EXISTS "{{name}}"',
)
# Appended to custom creation/renew statements: server_side_expiry is a promise.
_VALID_UNTIL = DEFAULT_RENEW_STATEMENTS[0]

_MOUNT_KEYS = {"connection_url", "max_open_connections", "connect_timeout", "serialize_ddl",
               "password_hashing"}
# "scram-sha-256": the broker sends a SCRAM verifier, never the plaintext (plugins/_scram.py);
# "server": the plaintext goes in the statement and the server hashes it (Vault's way).
_SCRAM = "scram-sha-256"
_HASHING_MODES = (_SCRAM, "server")
_MAX_USERNAME = 63  # NAMEDATALEN - 1
_ATTEMPTS = 8
#: How long a revocation waits for admin sessions cut off mid-COMMIT to end (_settle).
_SETTLE_SECONDS = 10.0
# One key for all broker DDL in a database (advisory locks are per database).
_DDL_LOCK_KEY = int.from_bytes(hashlib.sha256(b"broker:ddl").digest()[:8], "big", signed=True)
# SQLSTATEs that are worth retrying as a whole transaction.
_RETRY_STATES = {"40001", "40P01"}
# Classes that mean "the server or the connection", not "the statement".
_CONNECTION_CLASSES = ("08", "53", "57", "28", "3D")
_TERMINATE_WAIT_MS = 5000
_SERIALIZE_MODES = {True: True, False: False, "auto": None}
# A creation template that ends or opens transactions itself may have committed
# part of its work before a later statement failed. Such a failure is not
# "nothing was created" (a word match: false alarms only cost a rollback).
_TRANSACTION_CONTROL = re.compile(
    r"\b(COMMIT|END|ROLLBACK|ABORT|BEGIN|START\s+TRANSACTION|SAVEPOINT|RELEASE|PREPARE"
    r"\s+TRANSACTION|CALL|DO)\b", re.IGNORECASE)
# Statements that rewrite a catalog row other transactions may rewrite too: a
# GRANT/REVOKE of privileges ON an object (not role membership, which inserts
# its own pg_auth_members row), ALTER DEFAULT PRIVILEGES, and code we cannot
# see into (DO blocks, dollar-quoted bodies). Matched on the unrendered
# template, so a username cannot change the decision.
_SHARED_ROW_DDL = re.compile(
    r"\b(?:GRANT|REVOKE)\b[^;]*?\bON\b|\bDEFAULT\s+PRIVILEGES\b|\bDO\b|\$\w*\$",
    re.IGNORECASE | re.DOTALL,
)
# REASSIGN OWNED needs the privileges of the role: a superuser has them, a
# CREATEROLE admin (least privilege) does not, not even for roles it created
# (PostgreSQL 15 and older make it no member; 16+ give it ADMIN OPTION only).
# Such an admin first makes itself a member (what CREATEROLE, or that ADMIN
# OPTION, allows) in the dropping transaction, before the default statements.
# Only when it lacks them ("usable" below): a superuser's revocation is
# unchanged, e.g. for a role that was made a member of the admin's role.
_JOIN_ROLE = 'GRANT "{name}" TO CURRENT_USER'
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
#: SQLSTATE of "role ... cannot be dropped because some objects depend on it".
_DEPENDENT_OBJECTS = "2BP01"


class _AdminConnection(asyncpg.Connection):  # type: ignore[misc]  # untyped
    """A pooled admin connection that skips the pool's reset unless it may need one.

    On release the pool sends ``RESET ALL``, ``UNLISTEN *``, ``CLOSE ALL`` and
    ``pg_advisory_unlock_all()``: a round trip per call. The plugin's own
    statements leave no session state behind (the advisory lock is
    transaction-level, a failed batch rolls back), so the reset runs only after
    a custom template, which could ``SET`` something for the session.
    """

    _broker_dirty = False

    def mark_dirty(self) -> None:
        """Reset this connection on its next release."""
        self._broker_dirty = True

    def get_reset_query(self) -> str:
        if not self._broker_dirty:
            return ""
        self._broker_dirty = False
        query: str = super().get_reset_query()
        return query


class PostgresBackend:
    """A ``broker.plugins`` backend for PostgreSQL 12+ (asyncpg pool of admin connections)."""

    capabilities = Capabilities(
        can_renew=True,
        can_revoke=True,
        server_side_expiry=True,
        max_username_length=_MAX_USERNAME,
        env_names={"username": "PGUSER", "password": "PGPASSWORD"},
    )

    def __init__(
        self,
        *,
        mount: str,
        dsn: str,
        secret: str | None,
        database: str,
        max_open_connections: int = 4,
        connect_timeout: float = 10.0,
        serialize_ddl: bool | None = None,
        password_hashing: str = _SCRAM,
    ) -> None:
        self._mount = mount
        self._dsn = dsn
        self._secret = secret
        self._database = database
        self._max_open = max_open_connections
        self._connect_timeout = connect_timeout
        # True: lock every transaction; False: never; None ("auto"): see _needs_lock.
        self._serialize_ddl = serialize_ddl
        self._hash_passwords = password_hashing == _SCRAM
        #: the server's scram_iterations (read at initialize on PostgreSQL 16+).
        self._scram_iterations = DEFAULT_ITERATIONS
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        #: server pids of admin sessions cut off in the middle of a COMMIT (see _settle).
        self._unsettled: set[int] = set()

    # -- configuration (no I/O) ------------------------------------------------

    @classmethod
    def from_config(cls, mount: MountSpec) -> PostgresBackend:
        """Check the mount's options and build the backend; connects only in initialize()."""
        opts = mount.options
        for key in opts:
            if key not in _MOUNT_KEYS:
                raise PluginConfigError(
                    key, f"unknown option; expected one of {', '.join(sorted(_MOUNT_KEYS))}"
                )
        url = opts.get("connection_url")
        if not isinstance(url, str) or not url:
            raise PluginConfigError(
                "connection_url", "missing (e.g. \"postgresql://admin@db:5432/app\")"
            )
        parts = urlsplit(url)
        if parts.scheme not in {"postgresql", "postgres"}:
            raise PluginConfigError(
                "connection_url", f"expected postgresql://USER@HOST:PORT/DB, got {parts.scheme}://"
            )
        # asyncpg also takes the password from ?password= (and reads ?passfile=):
        # a secret in the URL either way, which goes to logs and config dumps.
        if parts.password or any(key.lower() in {"password", "passfile"}
                                 for key, _ in parse_qsl(parts.query, keep_blank_values=True)):
            raise PluginConfigError(
                "connection_url", "must not contain a password; use password_file or password_env"
            )
        if not parts.username:
            raise PluginConfigError("connection_url", "missing the admin user (postgresql://USER@...)")
        try:
            parts.port  # noqa: B018 - property raises on a malformed port
        except ValueError:
            raise PluginConfigError("connection_url", "malformed port") from None
        database = unquote(parts.path.lstrip("/")) or unquote(parts.username)
        if any(c in database for c in "\"'\\\x00"):
            # {{database}} goes into quoted identifiers and literals alike.
            raise PluginConfigError("connection_url", "database name must not contain quotes")
        max_open = opts.get("max_open_connections", 4)
        if not isinstance(max_open, int) or isinstance(max_open, bool) or max_open < 1:
            raise PluginConfigError("max_open_connections", "expected an integer of at least 1")
        try:
            timeout = parse_duration(opts.get("connect_timeout", "10s"))
        except ValueError as exc:
            raise PluginConfigError("connect_timeout", str(exc)) from None
        if timeout < 1:
            raise PluginConfigError("connect_timeout", "must be at least 1s")
        serialize = opts.get("serialize_ddl", "auto")
        if not isinstance(serialize, (bool, str)) or serialize not in _SERIALIZE_MODES:
            raise PluginConfigError("serialize_ddl", 'expected "auto", true or false')
        hashing = opts.get("password_hashing", _SCRAM)
        if hashing not in _HASHING_MODES:
            raise PluginConfigError("password_hashing", 'expected "scram-sha-256" or "server"')
        return cls(
            mount=mount.name,
            dsn=url,
            secret=mount.secret,
            database=database,
            max_open_connections=max_open,
            connect_timeout=float(timeout),
            serialize_ddl=_SERIALIZE_MODES[serialize],
            password_hashing=hashing,
        )

    @classmethod
    def validate_role(cls, role: RoleSpec) -> None:
        """Reject role keys this plugin does not know and creation statements without a name."""
        if role.options:
            raise PluginConfigError(next(iter(role.options)), "unknown key for a postgres role")
        if role.creation_statements and not any(
            template_names(s) & {"name", "username"} for s in role.creation_statements
        ):
            raise PluginConfigError("creation_statements", "must create the role named {{name}}")
        for key in ("renew_statements", "revocation_statements", "rollback_statements"):
            if any("password" in template_names(s) for s in getattr(role, key)):
                raise PluginConfigError(key, "{{password}} is only known to creation_statements")

    # -- lifecycle ------------------------------------------------------------

    async def initialize(self) -> None:
        """Open the admin pool (one connection at once, so a wrong URL shows up now)."""
        await self._ensure_pool()
        if self._hash_passwords:

            async def iterations(conn: asyncpg.Connection) -> int:
                # Hash as the server would: PostgreSQL 16+ makes the cost a setting.
                if conn.get_server_version().major < 16:
                    return DEFAULT_ITERATIONS
                return int(await conn.fetchval("SHOW scram_iterations"))

            self._scram_iterations = await self._run("initialize", iterations)

    async def verify(self) -> None:
        """``SELECT 1`` through the pool."""

        async def body(conn: asyncpg.Connection) -> None:
            await conn.fetchval("SELECT 1")

        await self._run("verify", body)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()

    # -- credentials ----------------------------------------------------------

    async def prepare_password(self, password: str) -> Mapping[str, str]:
        """The SCRAM verifier of ``password``, hashed in a thread ahead of new_user."""
        if not self._hash_passwords:
            return {}
        return {"password": await self._verifier(password)}

    async def _verifier(self, password: str) -> str:
        return await asyncio.to_thread(scram_verifier, check_password(password),
                                       self._scram_iterations)

    async def new_user(self, req: NewUserRequest) -> NewUserResponse:
        creation = await self._creation(req)
        await self._run(
            "new_user",
            lambda conn: self._transaction(
                conn, "new_user", creation.statements, creation.secrets, lock=creation.lock,
                custom=creation.custom, atomic=creation.atomic,
            ),
            creation.secrets,
        )
        return creation.response

    async def stage_user(self, req: NewUserRequest) -> StagedUser:
        """``new_user`` with the COMMIT held back (``broker.backend.StagingBackend``).

        The statements run inside ``BEGIN`` on a pooled connection that stays
        out of the pool until the engine commits or aborts. An uncommitted
        CREATE ROLE is invisible to every other session, and a broker that
        dies here takes the transaction with its connection.
        """
        creation = await self._creation(req)
        pool = await self._ensure_pool()
        # Nothing commits before the engine's COMMIT: every failure here made no
        # role (unless a custom template commits on its own).
        error: BackendError | None = None
        try:
            conn = await pool.acquire()
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            error = _wrap("new_user", exc, [*creation.secrets, self._secret], created_nothing=True)
        if error is not None:
            raise error
        try:
            await self._transaction(conn, "new_user", creation.statements, creation.secrets,
                                    lock=creation.lock, custom=creation.custom, hold=True,
                                    atomic=creation.atomic)
        except BackendError as exc:
            await pool.release(conn)  # the failed attempt was rolled back: the connection is idle
            exc.created_nothing = creation.atomic
            raise
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            error = _wrap("new_user", exc, [*creation.secrets, self._secret],
                          created_nothing=creation.atomic)
        except BaseException:
            conn.terminate()  # cancelled mid-statement: its state is unknown
            await pool.release(conn)
            raise
        if error is not None:
            conn.terminate()
            await pool.release(conn)
            raise error
        return _StagedRole(pool, conn, creation.response, [*creation.secrets, self._secret],
                           self._unsettled.add, atomic=creation.atomic)

    async def _creation(self, req: NewUserRequest) -> _Creation:
        """The checked, rendered creation transaction for ``req``."""
        name = check_username(req.username, _MAX_USERNAME)
        password = check_password(req.password)
        # What {{password}} becomes: the SCRAM verifier, unless the server hashes.
        sent = password
        if self._hash_passwords:
            sent = req.prepared.get("password") or await self._verifier(password)
        secrets_ = [password, sent]
        values = self._values(name, password=sent, expiration=check_expiration(req.expiration))
        templates: Sequence[str] = req.role.creation_statements or DEFAULT_CREATION_STATEMENTS
        if req.role.creation_statements:
            templates = (*templates, _VALID_UNTIL)
        return _Creation(
            statements=self._render(templates, values, secrets_),
            secrets=secrets_,
            lock=self._needs_lock(templates),
            custom=bool(req.role.creation_statements),
            atomic=not any(_TRANSACTION_CONTROL.search(t) for t in templates),
            response=NewUserResponse(data={"username": name, "password": password}),
        )

    async def renew_user(self, req: RenewUserRequest) -> RenewUserResponse:
        name = check_username(req.username, _MAX_USERNAME)
        values = self._values(name, expiration=check_expiration(req.expiration))
        templates: Sequence[str] = req.role.renew_statements or DEFAULT_RENEW_STATEMENTS
        if req.role.renew_statements:
            templates = (*templates, _VALID_UNTIL)
        statements = self._render(templates, values, [])
        await self._run(
            "renew_user",
            lambda conn: self._transaction(
                conn, "renew_user", statements, [], lock=self._needs_lock(templates),
                custom=bool(req.role.renew_statements),
            ),
        )
        return RenewUserResponse(expiration=req.expiration)

    async def delete_user(self, req: DeleteUserRequest) -> DeleteUserResponse:
        name = check_username(req.username, _MAX_USERNAME)
        templates = _revocation_templates(req)
        statements = self._render(templates, self._values(name), [])

        custom = templates is not DEFAULT_REVOCATION_STATEMENTS

        async def body(conn: asyncpg.Connection) -> bool:
            await self._settle(conn)
            return await self._revoke(conn, name, templates, statements, custom=custom)

        if await self._run("delete_user", body):
            log.debug("delete_user: revoked role %s (%s)", name, req.reason)
        else:
            log.debug("delete_user: role %s does not exist; nothing to revoke", name)
        return DeleteUserResponse()

    async def delete_users(self, reqs: Sequence[DeleteUserRequest]
                           ) -> list[BackendError | None]:
        """Revoke several roles: the default-statement ones as one batch, the rest alone.

        One result per request (None: revoked, or already gone). If the batch
        fails as a whole, each of its roles is revoked alone instead, so the
        error lands on the role that caused it.
        """
        results: list[BackendError | None] = [None] * len(reqs)
        batch: dict[str, list[int]] = {}  # name -> request indexes (a name may repeat)
        alone: list[int] = []
        for i, req in enumerate(reqs):
            try:
                name = check_username(req.username, _MAX_USERNAME)
            except BackendError as exc:
                results[i] = exc
                continue
            if _revocation_templates(req) is DEFAULT_REVOCATION_STATEMENTS:
                batch.setdefault(name, []).append(i)
            else:
                alone.append(i)
        if len(batch) == 1:
            alone += next(iter(batch.values()))
        elif batch:
            names = list(batch)

            async def body(conn: asyncpg.Connection) -> None:
                await self._settle(conn)
                await self._revoke_many(conn, names)

            try:
                await self._run("delete_user", body)
                log.debug("delete_users: revoked %d roles in one batch", len(names))
            except BackendError as exc:
                log.info("delete_users: batch of %d roles failed (%s); revoking them one by one",
                         len(names), exc)
                alone += [i for indexes in batch.values() for i in indexes]

        async def one(i: int) -> None:
            try:
                await self.delete_user(reqs[i])
            except BackendError as exc:
                results[i] = exc

        # Concurrent, bounded by the pool (max_open_connections).
        await asyncio.gather(*(one(i) for i in alone))
        return results

    async def rotate_root(self, req: RotateRootRequest) -> RotateRootResponse:
        """Give the admin role a new password, then use it for new pool connections."""
        new = check_password(req.new_password or generate_password(32))
        sent = await self._verifier(new) if self._hash_passwords else new
        secrets_ = [new, sent, self._secret]
        statement = f"ALTER ROLE CURRENT_USER PASSWORD '{escape_literal(sent)}'"
        await self._run(
            "rotate_root",
            lambda conn: self._transaction(
                conn, "rotate_root", [statement], secrets_, lock=self._serialize_ddl is True
            ),
            secrets_,
        )
        self._secret = new
        if self._pool is not None:
            self._pool.set_connect_args(self._dsn, **self._connect_kwargs())
        log.info("rotate_root: admin password of mount %s rotated", self._mount)
        return RotateRootResponse(new_password=new)

    # -- internals ------------------------------------------------------------

    def _values(
        self, name: str, *, password: str | None = None, expiration: str | None = None
    ) -> dict[str, str]:
        # Escaping is a no-op for the checked alphabets; it is the second belt.
        values = {
            "name": escape_identifier(name),
            "username": escape_identifier(name),
            "database": escape_identifier(self._database),
        }
        if password is not None:
            values["password"] = escape_literal(password)
        if expiration is not None:
            values["expiration"] = escape_literal(expiration)
        return values

    @staticmethod
    def _render(
        templates: Iterable[str], values: Mapping[str, str], secret_values: list[str]
    ) -> list[str]:
        try:
            return [render(t, values) for t in templates]
        except ValueError as exc:
            raise BackendError(
                f"postgres: bad statement template: {redact(str(exc), secret_values)}",
                retryable=False,
            ) from None

    def _connect_kwargs(self) -> dict[str, Any]:
        return {
            "password": self._secret,
            "timeout": self._connect_timeout,
            "server_settings": {"application_name": f"broker:{self._mount}"},
        }

    async def _ensure_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                error: BackendError | None = None
                try:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=1,
                        max_size=self._max_open,
                        connection_class=_AdminConnection,
                        **self._connect_kwargs(),
                    )
                except Exception as exc:  # classified into a BackendError below
                    error = _wrap("connect", exc, [self._secret])
                if error is not None:
                    raise error
            assert self._pool is not None
            return self._pool

    async def _run(
        self,
        op: str,
        body: Callable[[asyncpg.Connection], Awaitable[_T]],
        secret_values: Sequence[str | None] = (),
    ) -> _T:
        """Run ``body`` on a pooled admin connection; driver errors leave as BackendError."""
        pool = await self._ensure_pool()
        error: BackendError | None = None
        try:
            async with pool.acquire() as conn:
                return await body(conn)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            error = _wrap(op, exc, [*secret_values, self._secret])
        # Raised outside the except block so the driver error (which may quote
        # the statement) is neither the cause nor the context of what we raise.
        raise error

    async def _settle(self, conn: asyncpg.Connection) -> None:
        """Wait until the admin sessions cut off mid-COMMIT are gone: their outcome is then known.

        A COMMIT the broker stopped waiting for (cancelled, timed out, the
        connection lost) may still be running on the server, e.g. waiting for
        a synchronous standby or the disk; until it ends, other sessions do not
        see its role. A revocation run meanwhile finds no role, calls it done,
        and the role appears afterwards with nobody tracking it. So every
        revocation first terminates those sessions (a commit past its WAL
        record still finishes) and waits for them to go.
        """
        if not self._unsettled:
            return
        pids = sorted(self._unsettled)
        query = ("FROM pg_stat_activity WHERE pid = ANY($1::int[])"
                 " AND application_name = $2")  # a reused pid is not ours
        app = f"broker:{self._mount}"
        await conn.execute(f"SELECT pg_terminate_backend(pid) {query}", pids, app)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _SETTLE_SECONDS
        while await conn.fetchval(f"SELECT count(*) {query}", pids, app):
            if loop.time() > deadline:
                raise BackendError("an earlier admin session is still ending its COMMIT;"
                                   " revoking later", retryable=True)
            await asyncio.sleep(0.05)
        self._unsettled.difference_update(pids)

    def _needs_lock(self, templates: Iterable[str]) -> bool:
        """Whether a transaction of ``templates`` takes the DDL advisory lock.

        "auto" locks only templates that may rewrite a catalog row shared with
        other credentials' transactions (``_SHARED_ROW_DDL``): the default
        CREATE ROLE / ALTER ROLE statements touch only their own role's row.
        """
        if self._serialize_ddl is not None:
            return self._serialize_ddl
        return any(_SHARED_ROW_DDL.search(t) for t in templates)

    async def _transaction(
        self,
        conn: asyncpg.Connection,
        op: str,
        statements: Sequence[str],
        secret_values: Sequence[str | None],
        *,
        lock: bool,
        custom: bool = False,
        role_oid: int | None = None,
        hold: bool = False,
        atomic: bool = False,
    ) -> bool:
        """Run ``statements`` as one transaction in one round trip, retrying transient conflicts.

        The statements go as one simple-protocol query (no bind parameters; one
        template may itself hold several statements separated by ";"), which
        the server runs as one implicit transaction: a failing statement rolls
        back all of them and the connection is idle again, ready for a retry
        or the next user of the pool.

        ``custom``: the statements come from the role's templates, so the
        connection gets the pool's full reset on release.

        With ``role_oid`` (revocation), "role does not exist" is success when
        the role is really gone: a concurrent revocation got there first.
        Returns False in that case, True when the statements ran.

        ``hold``: the script starts with ``BEGIN`` and the transaction stays
        open for the caller to COMMIT or ROLLBACK (``stage_user``); a failed
        attempt is rolled back here.

        ``atomic``: the statements hold no transaction control of their own, so
        an error the server answers means none of them took effect; the error
        then says the call created nothing (``BackendError.created_nothing``).
        """
        parts = [*(["BEGIN"] if hold else []),
                 *([f"SELECT pg_advisory_xact_lock({_DDL_LOCK_KEY})"] if lock else []),
                 *statements]
        # A newline before each ";" ends a trailing "--" comment of a template.
        script = "\n;\n".join(parts)
        secrets_ = [*secret_values, self._secret]
        if custom:
            conn.mark_dirty()
        for attempt in range(_ATTEMPTS):
            error: BackendError
            try:
                await conn.execute(script)
                return True
            except asyncpg.PostgresError as exc:
                # Held open (hold): nothing commits before the caller's COMMIT.
                error = _wrap(op, exc, secrets_,
                              created_nothing=atomic and (hold or _refused(exc)))
            # Handled outside the except block: the driver error (which may quote
            # the statement) must be neither the cause nor the context of ours.
            if hold and conn.is_in_transaction():
                await conn.execute("ROLLBACK")  # an explicit BEGIN is not undone by the error
            if isinstance(error, _Missing) and role_oid is not None:
                if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE oid = $1", role_oid):
                    return False
                error = BackendError(str(error), retryable=False)
            if not isinstance(error, _Transient) or attempt == _ATTEMPTS - 1:
                raise error.error if isinstance(error, _Transient) else error
            delay = backoff_delay(attempt)
            log.debug("%s: transient conflict (%s), retry in %.3fs", op, error, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _revoke(
        self,
        conn: asyncpg.Connection,
        name: str,
        templates: Sequence[str],
        statements: Sequence[str],
        *,
        custom: bool,
    ) -> bool:
        """The revocation protocol on one connection; False if the role did not exist."""
        quoted = escape_identifier(name)
        # 1. Committed on its own: a login racing step 2 must already see it.
        try:
            await self._transaction(
                conn, "delete_user", [f'ALTER ROLE "{quoted}" NOLOGIN'], [],
                lock=self._serialize_ddl is True,
            )
        except _Missing:
            if not await self._created_meanwhile(conn, name):
                return False
            # Its COMMIT landed while we looked: revoke the role it made.
            return await self._revoke(conn, name, templates, statements, custom=custom)
        # 2. Signal every session at once, then wait until all have exited (and
        #    so released their locks) before DROP OWNED.
        new_server = conn.get_server_version().major >= 14
        row = await conn.fetchrow(_END_SESSIONS, name)
        if row is None:  # dropped by a concurrent revocation since step 1
            return False
        oid = int(row["oid"])
        if row["left_"]:
            await self._wait_sessions_gone(conn, oid)
        # 3. The last sweep runs first in the dropping transaction: a session
        #    that authenticated just before step 1 committed may only now show
        #    in pg_stat_activity (its snapshot is taken per transaction, so
        #    this must be the transaction's first look at it).
        wait = f", {_TERMINATE_WAIT_MS}" if new_server else ""
        sweep = (
            f"SELECT pg_terminate_backend(pid{wait}) FROM pg_stat_activity "
            f"WHERE usesysid = {oid} AND pid <> pg_backend_pid()"
        )
        lock = self._needs_lock(templates) or (self._serialize_ddl is None and row["granted"])
        unusable = () if row["usable"] else (oid,)
        if not custom and unusable:
            statements = [_JOIN_ROLE.format(name=quoted), *statements]
        if not custom and row["elsewhere"]:
            # Its objects and privileges in other databases first (_ELSEWHERE_EXISTS).
            await self._clean_elsewhere(conn, {oid: name}, unusable)
        script = [sweep, *statements]
        try:
            return await self._transaction(conn, "delete_user", script, [], lock=lock,
                                           custom=custom, role_oid=oid)
        except _Dependents as exc:
            error: BackendError = exc
        # Still depended on. From other databases too if custom statements ran
        # (which see only this one), or if something there appeared since
        # step 2: cleaned up there, the transaction runs once more.
        found = await self._clean_elsewhere(conn, {oid: name}, unusable)
        if found.cleaned:
            try:
                return await self._transaction(conn, "delete_user", script, [], lock=lock,
                                               custom=custom, role_oid=oid)
            except _Dependents as exc:
                error = exc
        raise _undroppable(error, found.closed)

    async def _revoke_many(self, conn: asyncpg.Connection, names: Sequence[str]) -> None:
        """The revocation protocol for many roles (default statements), in three round trips.

        The same steps as ``_revoke``, each for all roles at once; roles that
        do not exist (any more) are skipped, which is success.
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
        await self._transaction(conn, "delete_user", [nologin], [],
                                lock=self._serialize_ddl is True)
        # 2. Signal every session of all of them at once, one pass; then wait.
        new_server = conn.get_server_version().major >= 14
        rows = await conn.fetch(_END_SESSIONS_MANY, list(names))
        found = {row["rolname"] for row in rows}
        missing = [name for name in names if name not in found]
        if missing and await self._created_meanwhile(conn, *missing):
            # One came into being since step 1: each role alone, that one included.
            raise BackendError("postgres delete_user: a role of the batch was committed "
                               "during the revocation", retryable=True)
        if not rows:
            return  # all gone already
        oids = [int(row["oid"]) for row in rows]
        if any(row["left_"] for row in rows):
            await self._wait_sessions_gone_many(conn, [int(r["oid"]) for r in rows
                                                       if r["left_"]])
        unusable = {int(row["oid"]) for row in rows if not row["usable"]}
        elsewhere = {int(row["oid"]): str(row["rolname"]) for row in rows if row["elsewhere"]}
        if elsewhere:  # their objects and privileges in other databases first
            await self._clean_elsewhere(conn, elsewhere, unusable)
        # 3. Last sweep, then REASSIGN/DROP OWNED and DROP ROLE for all, in one
        #    transaction (see _revoke). Locked if any role holds grants.
        lock = (self._needs_lock(DEFAULT_REVOCATION_STATEMENTS)
                or (self._serialize_ddl is None and any(row["granted"] for row in rows)))
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
                f"REASSIGN OWNED BY {roles} TO CURRENT_USER",
                f"DROP OWNED BY {roles}",
                f"DROP ROLE IF EXISTS {roles}",
            ]
            try:
                await self._transaction(conn, "delete_user", statements, [], lock=lock)
                return
            except _Missing as exc:
                error: BackendError = exc
            # A concurrent revocation dropped one of them meanwhile: go on without it.
            left = {int(row["oid"]) for row in await conn.fetch(_EXISTING_OIDS, oids)}
            if len(left) >= len(oids):
                raise BackendError(str(error), retryable=False)
            oids = [oid for oid in oids if oid in left]

    async def _clean_elsewhere(self, conn: asyncpg.Connection, roles: Mapping[int, str],
                               unusable: Collection[int]) -> _Elsewhere:
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
                await self._clean_database(database, names,
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

    async def _clean_database(self, database: str, names: Sequence[str],
                              unusable: Sequence[str]) -> None:
        """``_clean_elsewhere`` in one database: REASSIGN OWNED and DROP OWNED of ``names``."""
        roles = ", ".join(f'"{escape_identifier(name)}"' for name in names)
        join = ", ".join(f'"{escape_identifier(name)}"' for name in unusable)
        statements = [
            *([f"GRANT {join} TO CURRENT_USER"] if join else []),  # see _JOIN_ROLE
            f"REASSIGN OWNED BY {roles} TO CURRENT_USER",
            f"DROP OWNED BY {roles}",
            *([f"REVOKE {join} FROM CURRENT_USER"] if join else []),
        ]
        error: BackendError | None = None
        try:
            # The name goes as a connection parameter, never into a DSN string;
            # explicit arguments win over connection_url's.
            side = await asyncpg.connect(self._dsn, database=database, **self._connect_kwargs())
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            if getattr(exc, "sqlstate", None) == "3D000":
                return  # dropped since: its dependencies went with it
            error = _wrap("delete_user", exc, [self._secret])
        if error is not None:
            raise error
        try:
            await self._transaction(side, "delete_user", statements, [],
                                    lock=self._serialize_ddl is not False)
        except _Missing:
            pass  # dropped by a concurrent revocation; a batch goes on role by role
        except (asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            error = _wrap("delete_user", exc, [self._secret])
        except BaseException:
            side.terminate()
            raise
        if error is not None:
            side.terminate()
            raise error
        try:
            await side.close(timeout=self._connect_timeout)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            side.terminate()
        except BaseException:
            side.terminate()
            raise

    async def _created_meanwhile(self, conn: asyncpg.Connection, *names: str) -> bool:
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
        """
        script = "\n;\n".join([
            "BEGIN",
            f"SET LOCAL lock_timeout = {int(_SETTLE_SECONDS * 1000)}",
            *(f'CREATE ROLE "{escape_identifier(name)}" NOLOGIN' for name in names),
            "ROLLBACK",
        ])
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
        finally:
            if conn.is_in_transaction():  # the error left the explicit BEGIN open
                await conn.execute("ROLLBACK")

    async def _wait_sessions_gone_many(self, conn: asyncpg.Connection, oids: list[int]
                                       ) -> None:
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

    async def _wait_sessions_gone(self, conn: asyncpg.Connection, oid: int) -> None:
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


def _revocation_templates(req: DeleteUserRequest) -> Sequence[str]:
    """The role's revocation (or rollback) statements; DEFAULT_REVOCATION_STATEMENTS itself
    when it has none, so ``is`` tells whether the defaults apply."""
    role = req.role
    if role is not None and req.reason == "rollback" and role.rollback_statements:
        return role.rollback_statements
    if role is not None and role.revocation_statements:
        return role.revocation_statements
    return DEFAULT_REVOCATION_STATEMENTS


def _undroppable(error: BackendError, closed: Sequence[str]) -> BackendError:
    """``error`` (DROP ROLE refused), saying which databases could not be cleaned up."""
    if not closed:
        return error
    databases = ", ".join(quote_identifier(database) for database in closed)
    return BackendError(f"{error}; not cleaned up: database(s) {databases} accept no connections"
                        " (datallowconn): allow connections, or run REASSIGN OWNED and DROP OWNED"
                        " there by hand", retryable=False)


class _Transient(BackendError):
    """A conflict worth retrying the whole transaction for."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(str(error), retryable=True)
        self.error = error


class _Missing(BackendError):
    """The role vanished under us (a concurrent revocation): success for delete."""


class _Dependents(BackendError):
    """DROP ROLE (or DROP OWNED) refused: objects still depend on the role (SQLSTATE 2BP01)."""


@dataclass(frozen=True)
class _Elsewhere:
    """What ``_clean_elsewhere`` found in the other databases of the cluster."""

    #: databases where the roles' dependencies were cleaned up.
    cleaned: Sequence[str]
    #: databases with dependencies that accept no connections (e.g. template0).
    closed: Sequence[str]


def _refused(exc: asyncpg.PostgresError) -> bool:
    """Whether the server refused the statement, so that it certainly took no effect.

    Not so for the classes asyncpg also raises when the connection broke (08,
    "connection was closed in the middle of operation"), nor for an operator's
    or the system's intervention (57, 58, XX): a COMMIT may have landed.
    """
    state = str(getattr(exc, "sqlstate", "") or "")
    return bool(state) and not state.startswith((*_CONNECTION_CLASSES, "58", "XX"))


def _wrap(op: str, exc: BaseException, secret_values: Sequence[str | None], *,
          created_nothing: bool = False) -> BackendError:
    """Classify a driver error into a redacted BackendError (transient ones as _Transient).

    ``created_nothing``: the caller knows this failure left no role behind.
    """
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        message = redact(str(exc), secret_values)
        text = f"postgres {op} failed: {message} (SQLSTATE {state})"
        if state in _RETRY_STATES or (state == "XX000" and "concurrently" in str(exc)):
            return _Transient(BackendError(text, retryable=True, created_nothing=created_nothing))
        if state == "42704" and op == "delete_user":
            return _Missing(text, retryable=False)
        if state == _DEPENDENT_OBJECTS and op == "delete_user":
            return _Dependents(text, retryable=False)
        return BackendError(text, retryable=state.startswith(_CONNECTION_CLASSES),
                            created_nothing=created_nothing)
    if isinstance(exc, TimeoutError):
        return BackendError(f"postgres {op} failed: timed out reaching the server", retryable=True,
                            created_nothing=created_nothing)
    # OSError (refused, unreachable), asyncpg.InterfaceError (connection closed), ...
    message = redact(str(exc), secret_values) or type(exc).__name__
    return BackendError(f"postgres {op} failed: cannot reach the server: {message}", retryable=True,
                        created_nothing=created_nothing)


@dataclass(frozen=True)
class _Creation:
    """A creation transaction, rendered: what ``new_user`` and ``stage_user`` send."""

    statements: Sequence[str]
    #: every secret value in the statements, for redaction.
    secrets: Sequence[str]
    lock: bool
    custom: bool
    #: the statements commit as one transaction: a refused one made nothing.
    atomic: bool
    response: NewUserResponse


class _StagedRole:
    """A role created in an open transaction; its connection is held until commit or abort."""

    def __init__(self, pool: asyncpg.Pool, conn: asyncpg.Connection, response: NewUserResponse,
                 secret_values: Sequence[str | None], unsettled: Callable[[int], None], *,
                 atomic: bool) -> None:
        self.response = response
        self._atomic = atomic
        self._pool = pool
        self._conn: asyncpg.Connection | None = conn
        self._secrets = secret_values
        self._unsettled = unsettled

    async def commit(self) -> None:
        conn = self._take()
        error: BackendError | None = None
        try:
            await conn.execute("COMMIT")
        except asyncpg.PostgresError as exc:  # the server answered: not committed
            error = _wrap("new_user", exc, self._secrets,
                          created_nothing=self._atomic and _refused(exc))
        except (asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            error = _wrap("new_user", exc, self._secrets)
            self._cut_off(conn)
        except BaseException:
            self._cut_off(conn)  # cancelled (the call's timeout, shutdown)
            await self._pool.release(conn)
            raise
        await self._pool.release(conn)
        if error is not None:
            raise error

    def _cut_off(self, conn: asyncpg.Connection) -> None:
        """Drop a connection whose COMMIT has no known outcome; revocations settle it first."""
        self._unsettled(conn.get_server_pid())
        conn.terminate()

    async def abort(self) -> None:
        conn = self._take()
        try:
            await conn.execute("ROLLBACK")
        except Exception:
            conn.terminate()  # broken: a closed connection rolls its transaction back
        except BaseException:
            conn.terminate()  # cancelled: likewise, and the cancellation goes on
            await self._pool.release(conn)
            raise
        await self._pool.release(conn)

    def _take(self) -> asyncpg.Connection:
        """The held connection, once: commit and abort each end the stage."""
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("this staged role was already committed or aborted")
        return conn
