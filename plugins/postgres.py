"""The PostgreSQL backend: one login role per lease, dropped on revocation.

Credentials are roles created from the role's ``creation_statements`` (by
default ``CREATE ROLE ... LOGIN PASSWORD ... VALID UNTIL ...`` and nothing
more). ``VALID UNTIL`` always carries the lease expiry, so PostgreSQL itself
refuses the password if the broker is down when the lease ends.

``{{password}}`` in creation statements is a SCRAM-SHA-256 verifier the broker
computed (``password_hashing = "scram-sha-256"``, the default), so the
plaintext never reaches the server or its logs; ``"server"`` sends the
plaintext for the server to hash, as Vault does.

Revocation is built so that a revoked credential is really dead: the role
gets ``NOLOGIN``, every session of it is ended, then its objects are handed
to the admin and its privileges dropped (in the other databases of the
cluster too, where it has any) and the role is dropped: three round trips on
one pooled connection. The protocol, step by step, lives in
``plugins._pg_revoke`` (``_revoke``); custom ``revocation_statements``
replace only its last step.

A revocation never touches the mount's admin role: ``delete_user`` of that
name (the admin's ``current_user`` or ``session_user``) fails before any
statement runs, and an issue refuses the name. And a rollback (an issue that
never completed) revokes only a role its own issue made: every issue tags
its role, in the creation transaction, with a ``COMMENT`` holding a hash of
its lease id (``_owner_tag``), and a role of that name without the tag
existed before the issue (by hand, or another lease's under a template
without ``{{random}}``), so the rollback leaves it as it is.

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

Driver errors are classified (and redacted) in ``plugins._pg_errors``; the
mount's options are checked in ``plugins._pg_options``; a staged issue's held
transaction (``_StagedRole``) lives in ``plugins._pg_staged``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

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
from broker.templating import generate_password, render, template_names
from plugins._pg_errors import _Missing, _refused, _Transient, _wrap
from plugins._pg_options import _MAX_USERNAME, _SCRAM, _mount_options
from plugins._pg_revoke import _END_SESSIONS as _END_SESSIONS  # for broker/bench
from plugins._pg_revoke import (
    _SETTLE_SECONDS,
    DEFAULT_REVOCATION_STATEMENTS,
    _owner_tag,
    _revocation_templates,
    _revoke,
    _revoke_many,
)
from plugins._pg_revoke import _TERMINATE_WAIT_MS as _TERMINATE_WAIT_MS  # for broker/bench
from plugins._pg_staged import _Creation, _drop, _is_lost, _StagedRole
from plugins._rotation import confirm_rotation, no_answer
from plugins._scram import DEFAULT_ITERATIONS, scram_verifier
from plugins._sql import (
    backoff_delay,
    check_expiration,
    check_password,
    check_username,
    escape_identifier,
    escape_literal,
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
# Appended to custom creation/renew statements: server_side_expiry is a promise.
_VALID_UNTIL = DEFAULT_RENEW_STATEMENTS[0]

_ATTEMPTS = 8
# One key for all broker DDL in a database (advisory locks are per database).
_DDL_LOCK_KEY = int.from_bytes(hashlib.sha256(b"broker:ddl").digest()[:8], "big", signed=True)
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

# The tag an issue gives its role (_owner_tag), last in its creation transaction
# (after _VALID_UNTIL for custom statements, which needs the same right: CREATEROLE,
# plus ADMIN OPTION on the role on PostgreSQL 16+, which its creator has).
_TAG = "COMMENT ON ROLE \"{name}\" IS '{tag}'"
# Creation statements that set a COMMENT of their own keep it: that role goes
# untagged (a rollback then leaves it alone). Matched on the unrendered templates.
_OWN_COMMENT = re.compile(r"\bCOMMENT\s+ON\b", re.IGNORECASE)
#: The roles an admin connection acts as: a revocation must never touch them.
_ADMIN_ROLES = "SELECT current_user AS current, session_user AS session"

# reassign_owned_to: whether the role exists, the admin has its privileges (REASSIGN OWNED
# needs them) and it is powerless (objects it receives run with its rights).
_TARGET_CHECK = """
SELECT pg_has_role(current_user, r.oid, 'USAGE') AS usable,
       r.rolcanlogin OR r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolbypassrls
       OR EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid) AS powerful
  FROM pg_roles r WHERE r.rolname = $1
"""


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
        reassign_owned_to: str | None = None,
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
        #: the role the default revocation hands the role's objects to; None: the admin.
        self._reassign_owned_to = reassign_owned_to
        self._checked_target = False
        #: the server's scram_iterations (read at initialize on PostgreSQL 16+).
        self._scram_iterations = DEFAULT_ITERATIONS
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        #: server pids of admin sessions cut off in the middle of a COMMIT (see _settle).
        self._unsettled: set[int] = set()
        #: tasks ending the server sessions of issues cut off mid-statement (_end_session).
        self._ending: set[asyncio.Task[None]] = set()
        #: the admin connections' current_user and session_user (_admin_names).
        self._admin_roles: frozenset[str] | None = None

    # -- configuration (no I/O) ------------------------------------------------

    @classmethod
    def from_config(cls, mount: MountSpec) -> PostgresBackend:
        """Check the mount's options (``plugins._pg_options``) and build the backend;
        connects only in initialize()."""
        options = _mount_options(mount)
        return cls(
            mount=mount.name,
            dsn=options.dsn,
            secret=mount.secret,
            database=options.database,
            max_open_connections=options.max_open_connections,
            connect_timeout=options.connect_timeout,
            serialize_ddl=options.serialize_ddl,
            password_hashing=options.password_hashing,
            reassign_owned_to=options.reassign_owned_to,
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
        self._admin_roles = None  # read again: the URL's user may act as another role now
        await self._run("initialize", self._admin_names)
        if self._hash_passwords:

            async def iterations(conn: asyncpg.Connection) -> int:
                # Hash as the server would: PostgreSQL 16+ makes the cost a setting.
                if conn.get_server_version().major < 16:
                    return DEFAULT_ITERATIONS
                return int(await conn.fetchval("SHOW scram_iterations"))

            self._scram_iterations = await self._run("initialize", iterations)
        if not self._checked_target:  # once per mount, not on every re-initialize
            self._checked_target = True
            await self._check_target()

    async def _check_target(self) -> None:
        """Log a warning if the default revocation hands objects to a role that can escalate."""
        if self._reassign_owned_to is None:
            log.warning("mount %s: revocation reassigns the objects of revoked roles to the admin;"
                        " a SECURITY DEFINER function has it stripped, but a view or an"
                        " expression index a role leaves behind runs as the admin: set"
                        " reassign_owned_to to a NOLOGIN role without privileges"
                        " (docs/plugins.md, postgres)", self._mount)
            return
        target = self._reassign_owned_to

        async def look(conn: asyncpg.Connection) -> asyncpg.Record | None:
            row: asyncpg.Record | None = await conn.fetchrow(_TARGET_CHECK, target)
            return row

        row = await self._run("initialize", look)
        if row is None:
            log.warning("mount %s: reassign_owned_to role %s does not exist; revocations fail"
                        " until it is created (CREATE ROLE ... NOLOGIN)", self._mount, target)
        elif not row["usable"]:
            log.warning("mount %s: the admin lacks the privileges of reassign_owned_to role %s;"
                        " revocations fail until it is granted (GRANT ... TO the admin)",
                        self._mount, target)
        elif row["powerful"]:
            log.warning("mount %s: reassign_owned_to role %s can log in or holds SUPERUSER,"
                        " CREATEROLE, BYPASSRLS or other roles; what revoked roles leave behind"
                        " runs with its rights", self._mount, target)

    async def verify(self) -> None:
        """``SELECT 1`` through the pool."""

        async def body(conn: asyncpg.Connection) -> None:
            await conn.fetchval("SELECT 1")

        await self._run("verify", body)

    async def close(self) -> None:
        if self._ending:
            # They need the pool: let them finish (each is bounded), then stop the rest.
            _done, pending = await asyncio.wait(self._ending, timeout=self._connect_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
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
        # Read now: a lost connection's proxy answers nothing more (see _StagedRole).
        pid = conn.get_server_pid()
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
            # Cancelled mid-statement (backend_timeout, shutdown): its state is unknown.
            _drop(conn)
            self._end_session(pid)
            await pool.release(conn)
            raise
        if error is not None:
            _drop(conn)
            self._end_session(pid)
            await pool.release(conn)
            raise error
        return _StagedRole(pool, conn, creation.response, [*creation.secrets, self._secret],
                           self._unsettled.add, atomic=creation.atomic)

    def _end_session(self, pid: int) -> None:
        """End, in the background, the server session of an issue cut off mid-statement.

        Dropping the connection closes only its socket: asyncpg throws away the
        cancel request it had pending, and the server goes on running the
        statement (a lock wait, a ``pg_sleep``) inside the staged transaction,
        holding its locks, the mount's DDL advisory lock among them, and its
        entry in the roles' unique index, on which the issue's rollback
        (``_created_meanwhile``) then waits. Nothing in that transaction ever
        committed (no COMMIT was sent: ``hold``), so ending it only rolls it
        back. Not awaited: the cancellation goes on at once.
        """
        task = asyncio.get_running_loop().create_task(self._terminate_session(pid))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _terminate_session(self, pid: int) -> None:
        """``pg_terminate_backend`` the mount's session ``pid`` from another pooled connection.

        If that fails, the pid goes to ``_unsettled``: the next revocation's
        ``_settle`` ends the session and waits for it to go.
        """
        pool = self._pool
        try:
            if pool is None:  # closed meanwhile
                raise asyncpg.InterfaceError("the pool is closed")
            async with pool.acquire(timeout=self._connect_timeout) as conn:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE pid = $1 AND application_name = $2",  # a reused pid is not ours
                    pid, f"broker:{self._mount}")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            log.warning("new_user: could not end the session of a cut-off issue (pid %d; %s);"
                        " the next revocation ends it", pid, type(exc).__name__)
            self._unsettled.add(pid)
        except BaseException:  # cancelled (close): a later revocation, if any, ends it
            self._unsettled.add(pid)
            raise

    async def _creation(self, req: NewUserRequest) -> _Creation:
        """The checked, rendered creation transaction for ``req``."""
        name = check_username(req.username, _MAX_USERNAME)
        if self._admin_roles is not None and name in self._admin_roles:
            # CREATE ROLE would fail ("already exists"), but a custom template that
            # commits on its own would leave its failure to a rollback, which then
            # refuses the name (delete_user) and is retried for ever.
            raise BackendError(
                f"postgres new_user failed: role {name!r} is the mount's admin role; not this "
                "lease's to create or drop (use a username_template with {{random}})",
                retryable=False, created_nothing=True)
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
        statements = self._render(templates, values, secrets_)
        tag = _owner_tag(req.lease_id)
        if tag is not None and not any(_OWN_COMMENT.search(t) for t in templates):
            # So that a rollback knows the role is this (plugins._pg_revoke).
            statements.append(_TAG.format(name=escape_identifier(name), tag=tag))
        return _Creation(
            statements=statements,
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
        # A rollback revokes only the role its own issue tagged (plugins._pg_revoke).
        owner = _owner_tag(req.lease_id) if req.reason == "rollback" else None

        async def body(conn: asyncpg.Connection) -> bool:
            # First of all: not even _settle's session ends before this check.
            self._refuse_admin(name, await self._admin_names(conn))
            await self._settle(conn)
            return await _revoke(self, conn, name, templates, statements, custom=custom,
                                 owner=owner)

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
        admin = self._admin_roles
        if admin is None:
            admin = await self._run("delete_user", self._admin_names)
        for i, req in enumerate(reqs):
            try:
                name = check_username(req.username, _MAX_USERNAME)
                self._refuse_admin(name, admin)
            except BackendError as exc:
                results[i] = exc
                continue
            if req.reason == "rollback" and req.lease_id:
                alone.append(i)  # its tag is checked first (delete_user)
            elif _revocation_templates(req) is DEFAULT_REVOCATION_STATEMENTS:
                batch.setdefault(name, []).append(i)
            else:
                alone.append(i)
        if len(batch) == 1:
            alone += next(iter(batch.values()))
        elif batch:
            names = list(batch)

            async def body(conn: asyncpg.Connection) -> None:
                await self._settle(conn)
                await _revoke_many(self, conn, names)

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
        """Give the admin role a new password, then use it for new pool connections.

        A connection lost while the ``ALTER ROLE`` was out leaves its outcome
        unknown: the server is asked which password it now takes
        (``plugins._rotation``) before the call succeeds or fails.
        """
        new = check_password(req.new_password or generate_password(32))
        sent = await self._verifier(new) if self._hash_passwords else new
        secrets_ = [new, sent, self._secret]
        statement = f"ALTER ROLE CURRENT_USER PASSWORD '{escape_literal(sent)}'"
        pool = await self._ensure_pool()
        error: BackendError | None = None
        try:
            conn = await pool.acquire()
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            error = _wrap("rotate_root", exc, secrets_)  # nothing was sent
        if error is not None:
            raise error
        pid = conn.get_server_pid()
        timed_out = False
        try:
            async with asyncio.timeout(req.timeout):
                await self._transaction(conn, "rotate_root", [statement], secrets_,
                                        lock=self._serialize_ddl is True)
        except TimeoutError:
            # No answer in time (a lock, a synchronous standby, a stalled
            # network): the ALTER may have committed. Asked like a lost one.
            timed_out = True
            error = no_answer("rotate_root", req.timeout)
        except (BackendError, asyncpg.InterfaceError, OSError) as exc:
            error = _wrap("rotate_root", exc, secrets_)
        except BaseException:  # cancelled: the outcome is unknown (not probed)
            _drop(conn)
            await pool.release(conn)
            raise
        lost = error is not None and (timed_out or _is_lost(conn))
        if lost:
            _drop(conn)
        await pool.release(conn)
        if error is not None and not lost:
            raise error  # the server answered: it refused the statement
        if error is not None:
            await self._confirm_rotation(new, pid, error)
        self._secret = new
        if self._pool is not None:
            self._pool.set_connect_args(self._dsn, **self._connect_kwargs())
        log.info("rotate_root: admin password of mount %s rotated", self._mount)
        return RotateRootResponse(new_password=new)

    async def _confirm_rotation(self, new: str, pid: int, lost: BackendError) -> None:
        """Return if the server took ``new`` although the connection was lost; else raise."""

        async def login(password: str | None) -> asyncpg.Connection:
            return await asyncpg.connect(self._dsn, **{**self._connect_kwargs(),
                                                       "password": password})

        async def logout(conn: asyncpg.Connection) -> None:
            await conn.close()

        self._unsettled.add(pid)  # _settle ends that session and waits until it is gone
        await confirm_rotation(
            lost, who=f"postgres mount {self._mount}", statement="ALTER ROLE",
            login=login, settle=self._settle, logout=logout,
            wrong_password=lambda exc: isinstance(exc, asyncpg.InvalidPasswordError),
            old=self._secret, new=new, seconds=self._connect_timeout)

    # -- internals ------------------------------------------------------------

    async def _admin_names(self, conn: asyncpg.Connection) -> frozenset[str]:
        """The roles the admin connections act as (``current_user``, ``session_user``).

        Read once (initialize) and kept: every admin connection logs in with the
        same ``connection_url``.
        """
        if self._admin_roles is None:
            row = await conn.fetchrow(_ADMIN_ROLES)
            self._admin_roles = frozenset({str(row["current"]), str(row["session"])})
        return self._admin_roles

    def _refuse_admin(self, name: str, admin: frozenset[str]) -> None:
        """Raise (not retryable) if ``name`` is a role the admin connections act as.

        Revoking it would commit ``NOLOGIN`` on the admin and end its other
        sessions before ``DROP ROLE`` fails ("current user cannot be dropped"):
        the mount locked out of its own server. No lease made it (an issue
        refuses the name; ``CREATE ROLE`` would fail too).
        """
        if name in admin:
            raise BackendError(
                f"postgres mount {self._mount!r}: refusing to revoke role {name!r}: it is the "
                "mount's admin role (the role its connection_url logs in or acts as); no lease "
                "made it: end the lease with sys/leases/revoke-force", retryable=False)

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
