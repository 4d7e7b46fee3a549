"""The PostgreSQL backend: one login role per lease, dropped on revocation.

Credentials are roles created from the role's ``creation_statements`` (by
default ``CREATE ROLE ... LOGIN PASSWORD ... VALID UNTIL ...`` and nothing
more). ``VALID UNTIL`` always carries the lease expiry, so PostgreSQL itself
refuses the password if the broker is down when the lease ends.

Revocation is built so that a revoked credential is really dead:

1. ``ALTER ROLE ... NOLOGIN`` is committed first, so no new session can start;
2. every session of the role is terminated (and waited for);
3. the role's objects are handed to the admin and its privileges dropped
   (``REASSIGN OWNED``/``DROP OWNED``), then the role is dropped;
4. sessions are swept once more by role oid, for a login that passed
   authentication just before step 1 committed.

Custom ``revocation_statements`` replace step 3 only. DDL from the broker is
serialized per database with a transaction-level advisory lock (concurrent
``GRANT ... ON ALL TABLES`` otherwise fails with "tuple concurrently updated"),
and that error, serialization failures and deadlocks are retried with jittered
backoff for writers outside the broker.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

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
)
from broker.durations import parse_duration
from broker.templating import generate_password, render, template_names
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
# Objects the role created are kept (owned by the admin); its grants go with DROP OWNED.
DEFAULT_REVOCATION_STATEMENTS = (
    'REASSIGN OWNED BY "{{name}}" TO CURRENT_USER',
    'DROP OWNED BY "{{name}}"',
    'DROP ROLE IF EXISTS "{{name}}"',
)
# Appended to custom creation/renew statements: server_side_expiry is a promise.
_VALID_UNTIL = DEFAULT_RENEW_STATEMENTS[0]

_MOUNT_KEYS = {"connection_url", "max_open_connections", "connect_timeout", "serialize_ddl"}
_MAX_USERNAME = 63  # NAMEDATALEN - 1
_ATTEMPTS = 8
# One key for all broker DDL in a database (advisory locks are per database).
_DDL_LOCK_KEY = int.from_bytes(hashlib.sha256(b"broker:ddl").digest()[:8], "big", signed=True)
# SQLSTATEs that are worth retrying as a whole transaction.
_RETRY_STATES = {"40001", "40P01"}
# Classes that mean "the server or the connection", not "the statement".
_CONNECTION_CLASSES = ("08", "53", "57", "28", "3D")
_TERMINATE_WAIT_MS = 5000


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
        serialize_ddl: bool = True,
    ) -> None:
        self._mount = mount
        self._dsn = dsn
        self._secret = secret
        self._database = database
        self._max_open = max_open_connections
        self._connect_timeout = connect_timeout
        self._serialize_ddl = serialize_ddl
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

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
        if parts.password:
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
        serialize = opts.get("serialize_ddl", True)
        if not isinstance(serialize, bool):
            raise PluginConfigError("serialize_ddl", "expected true or false")
        return cls(
            mount=mount.name,
            dsn=url,
            secret=mount.secret,
            database=database,
            max_open_connections=max_open,
            connect_timeout=float(timeout),
            serialize_ddl=serialize,
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

    async def new_user(self, req: NewUserRequest) -> NewUserResponse:
        name = check_username(req.username, _MAX_USERNAME)
        password = check_password(req.password)
        values = self._values(name, password=password, expiration=check_expiration(req.expiration))
        templates: Sequence[str] = req.role.creation_statements or DEFAULT_CREATION_STATEMENTS
        if req.role.creation_statements:
            templates = (*templates, _VALID_UNTIL)
        await self._transaction("new_user", self._render(templates, values, [password]), [password])
        return NewUserResponse(data={"username": name, "password": password})

    async def renew_user(self, req: RenewUserRequest) -> RenewUserResponse:
        name = check_username(req.username, _MAX_USERNAME)
        values = self._values(name, expiration=check_expiration(req.expiration))
        templates: Sequence[str] = req.role.renew_statements or DEFAULT_RENEW_STATEMENTS
        if req.role.renew_statements:
            templates = (*templates, _VALID_UNTIL)
        await self._transaction("renew_user", self._render(templates, values, []), [])
        return RenewUserResponse(expiration=req.expiration)

    async def delete_user(self, req: DeleteUserRequest) -> DeleteUserResponse:
        name = check_username(req.username, _MAX_USERNAME)
        role = req.role
        templates: Sequence[str] = DEFAULT_REVOCATION_STATEMENTS
        if role is not None and req.reason == "rollback" and role.rollback_statements:
            templates = role.rollback_statements
        elif role is not None and role.revocation_statements:
            templates = role.revocation_statements
        statements = self._render(templates, self._values(name), [])
        oid = await self._role_oid(name)
        if oid is None:
            log.debug("delete_user: role %s does not exist; nothing to revoke", name)
            return DeleteUserResponse()
        quoted = escape_identifier(name)
        # Committed on its own: a login racing the terminate below must already see it.
        await self._transaction(
            "delete_user", [f'ALTER ROLE "{quoted}" NOLOGIN'], [], role_oid=oid
        )
        await self._terminate(oid)
        await self._transaction("delete_user", statements, [], role_oid=oid)
        await self._terminate(oid)
        log.debug("delete_user: revoked role %s (%s)", name, req.reason)
        return DeleteUserResponse()

    async def rotate_root(self, req: RotateRootRequest) -> RotateRootResponse:
        """Give the admin role a new password, then use it for new pool connections."""
        new = check_password(req.new_password or generate_password(32))
        secrets_ = [new, self._secret]
        await self._transaction(
            "rotate_root", [f"ALTER ROLE CURRENT_USER PASSWORD '{escape_literal(new)}'"], secrets_
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

    async def _transaction(
        self,
        op: str,
        statements: Sequence[str],
        secret_values: Sequence[str | None],
        *,
        role_oid: int | None = None,
    ) -> None:
        """Run ``statements`` in one transaction, retrying transient conflicts.

        With ``role_oid`` (revocation), "role does not exist" is success when
        the role is really gone: a concurrent revocation got there first.
        """

        async def body(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                if self._serialize_ddl:
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _DDL_LOCK_KEY)
                for statement in statements:
                    # No arguments: the simple protocol, so one template may
                    # hold several statements separated by ";".
                    await conn.execute(statement)

        for attempt in range(_ATTEMPTS):
            error: BackendError
            try:
                await self._run(op, body, secret_values)
                return
            except _Transient as exc:
                error = exc.error
            except _Missing as exc:
                if role_oid is not None and not await self._role_exists(role_oid):
                    return
                error = BackendError(str(exc), retryable=False)
            if not error.retryable or attempt == _ATTEMPTS - 1:
                raise error
            delay = backoff_delay(attempt)
            log.debug("%s: transient conflict (%s), retry in %.3fs", op, error, delay)
            await asyncio.sleep(delay)

    async def _role_oid(self, name: str) -> int | None:
        async def body(conn: asyncpg.Connection) -> int | None:
            oid: int | None = await conn.fetchval(
                "SELECT oid FROM pg_roles WHERE rolname = $1", name
            )
            return oid

        return await self._run("delete_user", body)

    async def _role_exists(self, oid: int) -> bool:
        async def body(conn: asyncpg.Connection) -> bool:
            return bool(await conn.fetchval("SELECT 1 FROM pg_roles WHERE oid = $1", oid))

        return await self._run("delete_user", body)

    async def _terminate(self, oid: int) -> None:
        """End every session of role ``oid`` and wait until they are gone."""

        async def body(conn: asyncpg.Connection) -> int:
            if conn.get_server_version().major >= 14:
                # Waits for each backend to exit, so its locks are gone before DROP OWNED.
                await conn.execute(
                    "SELECT pg_terminate_backend(pid, $2) FROM pg_stat_activity "
                    "WHERE usesysid = $1 AND pid <> pg_backend_pid()",
                    oid,
                    _TERMINATE_WAIT_MS,
                )
            else:  # pragma: no cover - PostgreSQL 12/13
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE usesysid = $1 AND pid <> pg_backend_pid()",
                    oid,
                )
            left = 0
            for _ in range(50):
                left = int(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE usesysid = $1 AND pid <> pg_backend_pid()",
                        oid,
                    )
                )
                if not left:
                    break
                await asyncio.sleep(0.1)
            return left

        left = await self._run("delete_user", body)
        if left:
            raise BackendError(
                f"postgres delete_user: {left} session(s) of the role did not end; will retry",
                retryable=True,
            )


class _Transient(BackendError):
    """A conflict worth retrying the whole transaction for."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(str(error), retryable=True)
        self.error = error


class _Missing(BackendError):
    """The role vanished under us (a concurrent revocation): success for delete."""


def _wrap(op: str, exc: BaseException, secret_values: Sequence[str | None]) -> BackendError:
    """Classify a driver error into a redacted BackendError (transient ones as _Transient)."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        message = redact(str(exc), secret_values)
        text = f"postgres {op} failed: {message} (SQLSTATE {state})"
        if state in _RETRY_STATES or (state == "XX000" and "concurrently" in str(exc)):
            return _Transient(BackendError(text, retryable=True))
        if state == "42704" and op == "delete_user":
            return _Missing(text, retryable=False)
        return BackendError(text, retryable=state.startswith(_CONNECTION_CLASSES))
    if isinstance(exc, TimeoutError):
        return BackendError(f"postgres {op} failed: timed out reaching the server", retryable=True)
    # OSError (refused, unreachable), asyncpg.InterfaceError (connection closed), ...
    message = redact(str(exc), secret_values) or type(exc).__name__
    return BackendError(f"postgres {op} failed: cannot reach the server: {message}", retryable=True)
