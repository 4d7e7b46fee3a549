"""MySQL / MariaDB backend: short-lived database users through aiomysql.

Mount options (``[mounts.NAME]``)::

    plugin = "mysql"
    connection_url = "mysql://admin@db:3306/app"   # no password: password_file / password_env
    max_open_connections = 4     # admin connection pool size
    username_max_length = 32     # MySQL 5.7+ / MariaDB; 16 for MySQL <= 5.6 (8..80)
    host = "%"                   # host part of created accounts ('user'@'host')

Role options: ``database`` (defaults to the connection URL's database) and
``host`` (overrides the mount's). Statements are templates with ``{{name}}``
(alias ``{{username}}``), ``{{password}}``, ``{{expiration}}`` and
``{{database}}``. Without ``creation_statements`` a role gets least privilege
on one database::

    CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'
    GRANT SELECT ON `{{database}}`.* TO '{{name}}'@'%'

(in that default GRANT ``_`` and ``%`` of the database name are escaped: a
database-level GRANT reads them as wildcards).

A creation statement granting ``ON *.*`` anything but reading and watching
privileges, ``GRANT OPTION`` (``WITH GRANT OPTION`` too) at any level, or
anything on the ``mysql`` schema, is refused at config load (comments stripped, executable
``/*! */`` comments read as code): every lease could then create accounts or
hand out rights, which no revocation can take back (``plugins._mysql_grants``).

Quoting: the broker only ever substitutes values it generated itself
(usernames ``[a-z0-9_-]``, alphanumeric passwords, fixed-format timestamps) or
operator-configured names checked against a strict alphabet; each value is
validated again here before rendering, so it is inert inside ``'...'``,
```...``` and ``"..."`` alike. Statements the plugin writes itself quote
identifiers in backticks (backticks doubled) and literals with quotes doubled
(mode-independent: valid with and without ``NO_BACKSLASH_ESCAPES``).

Expiry trade-off (``server_side_expiry = False``): MySQL and MariaDB have no
``VALID UNTIL`` for accounts (``PASSWORD EXPIRE INTERVAL`` counts whole days
and only forces a password change), so the broker's own expiry sweeper is the
only thing that ends a credential. If the broker is down past a lease's
expiry, the account keeps working until the broker is back and revokes it.
Keep the broker highly available (several replicas on the PostgreSQL store)
and TTLs short for MySQL mounts.

Renewal (``can_renew = False``): there is no server-side expiry to push, so
the plugin does not claim to renew anything. The broker's own expiry is the
credential's real lifetime: the engine still extends a lease in its store on
renew (and the sweeper drops the account later), it just does not call the
backend. ``renew_user`` is therefore a no-op that returns the requested
expiration, and ``renew_statements`` are refused at config load rather than
silently never run.

Revocation leaves no window for a live session: it locks every host of the
user, kills its sessions, runs the role's ``revocation_statements``
(``rollback_statements`` for a rollback), drops every host and waits until no
session of the user is left; first it ends any admin session of the broker's
own that was dropped mid-statement, and for a rollback any still running a
statement that names the user. The protocol, step by step, lives in
``plugins._mysql_revoke`` (``_revoke``); ending sessions and waiting for them
in ``plugins._mysql_sessions``.

An issue refuses a name that exists on any host already, and the admin's own
name (revocation refuses that one too): the revocation above takes every host
of a name, so it must only ever meet accounts its lease made.

A rollback (an issue that failed, was cut off, or was left pending by a broker
that died) cannot rely on that check: a broker that died took with it whether
its issue got past it. So every issue tags its accounts with a hash of its
lease id, in the ``CREATE USER`` itself (two per-hour resource limits no client
reaches: ``plugins._mysql_grants``), and a rollback of an issue this process
did not make itself drops a name only if every account of it carries its own
lease's tag; else it leaves them all alone, with a warning (``_all_ours`` in
``plugins._mysql_revoke``).

The admin account needs ``CREATE USER``, the grants it hands out ``WITH GRANT
OPTION``, ``SELECT`` on ``mysql.user`` (to find every host of a user, and a
rollback's owner tag) and
``PROCESS`` plus ``CONNECTION ADMIN``/``SUPER`` to see and kill other users'
sessions.

Rotate-root (the admin's own password) lives in ``plugins._mysql_rotate``;
the error codes, cursor class and account quoting the modules share, in
``plugins._mysql_driver``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomysql
import pymysql

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
from broker.templating import render, template_names
from plugins._mysql_driver import (
    _ACCESS_DENIED,
    _RETRYABLE_CODES,
    CONNECT_TIMEOUT,
    _account,
    _error_code,
    _QuietCursor,
)
from plugins._mysql_grants import (
    grant_refusal,
    is_create_user,
    owner_tag,
    sets_own_limits,
    tag_clause,
    tag_create,
)
from plugins._mysql_revoke import _revoke
from plugins._mysql_rotate import _rotate_root
from plugins._sql import (
    check_expiration,
    check_password,
    check_username,
    quote_literal,
    redact,
    split_statements,
)

__all__ = ["MySQLBackend"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 3306
DEFAULT_HOST_PART = "%"
DEFAULT_MAX_OPEN = 4
DEFAULT_USERNAME_MAX = 32
USERNAME_MAX_RANGE = (8, 80)

_MOUNT_KEYS = frozenset({"connection_url", "max_open_connections", "username_max_length", "host"})
_ROLE_KEYS = frozenset({"database", "host"})
#: Schemas a role's {{database}} must not name: the server's own (accounts and their
#: password hashes, sessions, statements).
_SYSTEM_SCHEMAS = frozenset({"mysql", "sys", "performance_schema", "information_schema"})

# Database names we accept: safe inside backticks, quotes and bare. Real MySQL
# allows more, but an operator can rename a database far more easily than we
# can prove every quoting context of a hand-written template safe.
_DATABASE_OK = re.compile(r"[A-Za-z0-9_$-]{1,64}")
# Host part of an account: names, IPv4/IPv6, wildcards % and _, netmasks.
_HOST_OK = re.compile(r"[A-Za-z0-9.%_:/-]{1,255}")
#: How many issues' "made here" records (MySQLBackend._made_here) are kept at most.
_MADE_HERE_MAX = 4096


def _redact(text: str, secrets: Iterable[str | None]) -> str:
    """Secrets out, names in: MySQL quotes table, user and host names as '...' literals.

    The shared rule still removes every known secret and whatever follows
    IDENTIFIED BY / PASSWORD (also when cut off): see ``plugins._sql.redact``.
    """
    return redact(text, secrets, all_literals=False)


def _parse_url(url: str) -> tuple[str, int, str, str | None]:
    """``mysql://user@host:port/db`` -> (host, port, user, db); ValueError if malformed."""
    parts = urlsplit(url)
    if parts.scheme not in {"mysql", "mariadb"}:
        raise ValueError(f"expected mysql://user@host:port/db, got scheme {parts.scheme!r}")
    if parts.password is not None:
        raise ValueError("must not contain a password; use password_file or password_env")
    if not parts.hostname:
        raise ValueError("missing host (mysql://user@host:port/db)")
    if not parts.username:
        raise ValueError("missing user (mysql://user@host:port/db)")
    if parts.query or parts.fragment:
        raise ValueError("query parameters are not supported")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError("port is not a number in 1..65535") from None
    db = unquote(parts.path.lstrip("/")) or None
    if db is not None and not _DATABASE_OK.fullmatch(db):
        raise ValueError(f"database name {db!r} must match [A-Za-z0-9_$-], at most 64 characters")
    return parts.hostname, port, unquote(parts.username), db


class MySQLBackend:
    """One ``plugin = "mysql"`` mount: a small admin pool creating and dropping users."""

    def __init__(
        self,
        *,
        mount: str,
        host: str,
        port: int,
        user: str,
        password: str | None,
        database: str | None,
        max_open_connections: int = DEFAULT_MAX_OPEN,
        username_max_length: int = DEFAULT_USERNAME_MAX,
        host_part: str = DEFAULT_HOST_PART,
    ) -> None:
        self.mount = mount
        self._host = host
        self._port = port
        self._user = user
        self._password = password
        self._database = database
        self._max_open = max_open_connections
        self._host_part = host_part
        self._pool: aiomysql.Pool | None = None
        self._pool_lock = asyncio.Lock()
        #: server thread id of each admin connection dropped mid-statement, and
        #: when (loop time) it was dropped (see _settle in plugins._mysql_sessions).
        self._unsettled: dict[int, float] = {}
        #: lease id -> user name of the issues whose creation statements this process
        #: sent after finding no account of the name, and whose accounts may lack the
        #: owner tag: their rollback drops the name untagged (see delete_user).
        self._made_here: dict[str, str] = {}
        self.capabilities = Capabilities(
            can_renew=False,  # no server-side expiry to push: see "Renewal" above
            can_revoke=True,
            server_side_expiry=False,
            max_username_length=username_max_length,
            env_names={"username": "MYSQL_USER", "password": "MYSQL_PWD"},
        )

    # -- configuration (no I/O) -------------------------------------------------------

    @classmethod
    def from_config(cls, mount: MountSpec) -> MySQLBackend:
        """Validate the mount's options and roles; open nothing (see initialize)."""
        opts = mount.options
        for key in opts:
            if key not in _MOUNT_KEYS:
                raise PluginConfigError(
                    key, f"unknown option; the mysql plugin knows {', '.join(sorted(_MOUNT_KEYS))}"
                )
        url = opts.get("connection_url")
        if not isinstance(url, str) or not url:
            raise PluginConfigError("connection_url", "missing (e.g. mysql://admin@db:3306/app)")
        try:
            host, port, user, database = _parse_url(url)
        except ValueError as exc:
            raise PluginConfigError("connection_url", str(exc)) from None
        max_open = _int_option(opts, "max_open_connections", DEFAULT_MAX_OPEN, 1, 1000)
        lo, hi = USERNAME_MAX_RANGE
        max_len = _int_option(opts, "username_max_length", DEFAULT_USERNAME_MAX, lo, hi)
        host_part = _host_option(opts, "host", DEFAULT_HOST_PART)
        for role in mount.roles.values():
            cls.validate_role(role)
            db = role.options.get("database", database)
            uses_db = not role.creation_statements or any(
                "database" in template_names(s)
                for s in (*role.creation_statements, *role.renew_statements,
                          *role.revocation_statements, *role.rollback_statements)
            )
            if uses_db and db is None:
                raise PluginConfigError(
                    f"roles.{role.name}.database",
                    "no database to grant on: set database on the role or put one in "
                    "connection_url (mysql://user@host:port/DB)",
                )
            if uses_db and db is not None and db.lower() in _SYSTEM_SCHEMAS:
                # The statements grant on {{database}}: on `mysql` every lease could read
                # every account's password hash (mysql.user / global_priv), and the others
                # show the server's users, sessions and statements. A custom statement
                # naming such a schema is refused by grant_refusal already.
                where = ("connection_url" if "database" not in role.options
                         else f"roles.{role.name}.database")
                raise PluginConfigError(
                    where,
                    f"role {role.name!r} would grant on the system schema {db!r}: every "
                    "lease could read the server's accounts (password hashes in "
                    "mysql.user); grant on the application's database instead",
                )
        return cls(
            mount=mount.name,
            host=host,
            port=port,
            user=user,
            password=mount.secret,
            database=database,
            max_open_connections=max_open,
            username_max_length=max_len,
            host_part=host_part,
        )

    @classmethod
    def validate_role(cls, role: RoleSpec) -> None:
        """Refuse unknown options, unsafe names and statements granting too much."""
        prefix = f"roles.{role.name}"
        for key in role.options:
            if key not in _ROLE_KEYS:
                raise PluginConfigError(
                    f"{prefix}.{key}",
                    f"unknown option; mysql roles know {', '.join(sorted(_ROLE_KEYS))}",
                )
        db = role.options.get("database")
        if db is not None and (not isinstance(db, str) or not _DATABASE_OK.fullmatch(db)):
            raise PluginConfigError(
                f"{prefix}.database",
                f"{db!r} must be a name of [A-Za-z0-9_$-], at most 64 characters",
            )
        _host_option(role.options, "host", DEFAULT_HOST_PART, prefix=f"{prefix}.")
        for i, stmt in enumerate(role.creation_statements):
            refused = grant_refusal(stmt)
            if refused:
                raise PluginConfigError(
                    f"{prefix}.creation_statements[{i}]",
                    f"role {role.name!r}: refusing {refused}: every lease would be a server "
                    "administrator able to create accounts or grant rights that outlive its "
                    "revocation; grant only what the role needs on one database, e.g. "
                    "GRANT SELECT ON `app`.* TO '{{name}}'@'%'",
                )
        if role.creation_statements and not any(
            template_names(s) & {"name", "username"} for s in role.creation_statements
        ):
            raise PluginConfigError(
                f"{prefix}.creation_statements",
                "no statement uses {{name}}: the leased user would never be created",
            )
        if role.renew_statements:
            raise PluginConfigError(
                f"{prefix}.renew_statements",
                "MySQL accounts have no expiry to push, so the broker never runs renew "
                "statements for mysql mounts; remove them (the lease's own expiry still moves)",
            )
        later = {
            "revocation_statements": {"name", "username", "database"},
            "rollback_statements": {"name", "username", "database"},
        }
        for key, allowed in later.items():
            for stmt in getattr(role, key):
                unknown = template_names(stmt) - allowed
                if unknown:
                    raise PluginConfigError(
                        f"{prefix}.{key}",
                        f"{{{{{sorted(unknown)[0]}}}}} is not known when these run "
                        "(passwords are never stored); use "
                        + ", ".join(f"{{{{{n}}}}}" for n in sorted(allowed)),
                    )

    # -- lifecycle --------------------------------------------------------------------

    async def initialize(self) -> None:
        """Create the admin pool; connections are opened on first use (verify checks them)."""
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await self._new_pool(self._password)

    async def _new_pool(self, password: str | None) -> aiomysql.Pool:
        try:
            # minsize=0: a server that is down at start-up must not stop the
            # broker; the mount shows unhealthy through verify() until it is back.
            return await aiomysql.create_pool(
                minsize=0,
                maxsize=self._max_open,
                host=self._host,
                port=self._port,
                user=self._user,
                password=password or "",
                db=self._database,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT,
                pool_recycle=300,
                cursorclass=_QuietCursor,
            )
        except Exception as exc:  # wrapped, never leaked with its secret
            err = self._wrap("opening the admin pool", exc, connecting=True)
        raise err

    async def verify(self) -> None:
        async with self._cursor("verify") as cur:
            await self._run(cur, "verify", "SELECT 1")

    async def close(self) -> None:
        async with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            await pool.wait_closed()

    # -- users ------------------------------------------------------------------------

    async def new_user(self, req: NewUserRequest) -> NewUserResponse:
        name = self._check_username(req.username)
        password = check_password(req.password)
        host = self._role_host(req.role)
        values = self._values(req.role, name, expiration=req.expiration)
        values["password"] = password
        if not req.role.creation_statements and "database" in values:
            # The default GRANT is at database level (ON `db`.*), where "_" and
            # "%" are wildcards: GRANT ON `app_db`.* also grants on `appXdb`.
            values["database"] = _grant_database(values["database"])
        templates = req.role.creation_statements or self._default_creation(host)
        statements = self._render_all(templates, values, "creation_statements", [password])
        if name == self._user:
            raise self._taken(name, None)
        tag, tag_after = self._tag_statements(statements, templates, name, req.lease_id)
        tagged = tag is not None and tag_after is None  # in the CREATE USER itself
        # Until the first creation statement is sent, nothing can have been made:
        # a failure before it (no connection, the lookup below cut off) is
        # created_nothing, so no rollback goes looking for the name (and drops
        # an account of that name that is not ours).
        sent = False
        try:
            async with self._cursor("creating user", password) as cur:
                # A name that exists on any host is not this lease's: with it, the
                # lease's login could meet the other account (the most specific
                # host matches first), and its revocation, which locks, kills and
                # drops every host of the name, would take the other account and
                # its sessions too (a username_template without {{random}} and a
                # display_name of "root" made the broker lock out its own admin).
                # The hosts noted here also serve a multi-account first statement:
                # it is not all-or-nothing (with 'n'@'%' taken, error 1396, 'n'@'h'
                # is still made), so what it made is known from what was there.
                snapshot = bool(statements) and not _one_account(statements[0], name)
                before = await self._user_hosts(cur, name, "creating user")
                if before is None:
                    # Unknown: mysql.user unreadable (nothing to tell), or the name
                    # exists only with host parts we do not quote (taken all the same).
                    before = await self._hosts_as_stored(cur, name)
                if before:
                    raise self._taken(name, before)
                if not snapshot:
                    before = None
                ran = 0
                sent = True  # from here on, the server may have made something
                self._remember_made(req.lease_id, name)
                try:
                    for stmt in statements:
                        # Which one failed: the server's message quotes only the
                        # text near the error (the wrong word itself may be left out).
                        what = (f"creating user (statement {ran + 1} of {len(statements)})"
                                if len(statements) > 1 else "creating user")
                        await self._run(cur, what, stmt, password)
                        if ran == tag_after and tag is not None:
                            tagged = await self._tag_accounts(cur, name, host, tag)
                        ran += 1
                except BackendError as exc:
                    if ran == 0 and exc.created_nothing:
                        # The server refused the first statement (say, error 1396: the
                        # user exists): what it made anyway goes; a user of that name
                        # that was there before is not ours and stays.
                        if before is not None:
                            await self._drop_new_accounts(cur, name, before, exc)
                        elif snapshot:  # mysql.user unreadable: the rollback must look
                            exc.created_nothing = False
                        raise
                    exc.created_nothing = False
                    # Leave nothing half-made behind: the user may exist without its grants.
                    await self._drop_quietly(cur, name, host)
                    raise
        except BackendError as exc:
            if not sent:
                exc.created_nothing = True
            if exc.created_nothing:  # no rollback comes for it
                self._made_here.pop(req.lease_id, None)
            raise
        if tagged:
            # A rollback (of an activation that failed) knows the accounts by their tag.
            self._made_here.pop(req.lease_id, None)
        return NewUserResponse(
            data={"username": name, "password": password},
            revocation={"host": host},
        )

    def _tag_statements(self, statements: list[str], templates: Sequence[str], name: str,
                        lease_id: str) -> tuple[tuple[int, int] | None, int | None]:
        """Give the issue's accounts its owner tag (``plugins._mysql_grants``).

        Appended to each plain ``CREATE USER`` of ``name`` in ``statements`` (in
        place), so the account never exists without it. Returns the tag (None:
        no lease to tag for, or a template sets those limits itself) and, when no
        statement could take it, the index of the statement after which an
        ``ALTER USER`` sets it (``_tag_accounts``): the first CREATE USER naming
        the user, else the last. Until then a crash leaves the account untagged,
        and the rollback leaves it alone (with a warning).
        """
        tag = owner_tag(lease_id)
        if tag is None or not statements or sets_own_limits(templates):
            return None, None
        tagged = False
        for i, stmt in enumerate(statements):
            with_tag = tag_create(stmt, name, tag)
            if with_tag is not None:
                statements[i] = with_tag
                tagged = True
        if tagged:
            return tag, None
        after = next((i for i, s in enumerate(statements) if is_create_user(s) and name in s),
                     len(statements) - 1)
        return tag, after

    async def _tag_accounts(self, cur: Any, name: str, host: str, tag: tuple[int, int]
                            ) -> bool:
        """Tag every account of ``name`` (none was there before the issue) with ``tag``.

        A server that refuses the ``ALTER USER`` (too old for resource options in
        it) leaves the issue working, the account untagged: a warning, no error
        (False).
        """
        hosts = await self._user_hosts(cur, name, "creating user") or {host}
        for h in sorted(hosts):
            try:
                await self._run(cur, "tagging the user",
                                f"ALTER USER IF EXISTS {_account(name, h)} {tag_clause(tag)}")
            except BackendError as exc:
                if not exc.created_nothing:
                    raise  # the connection broke: the issue fails and is rolled back
                log.warning("mysql: could not tag %s@%s as this lease's (%s); a rollback "
                            "after a crash would leave it alone", name, h, exc)
                return False
        return True

    def _remember_made(self, lease_id: str, name: str) -> None:
        """Note that this process is creating ``name`` for ``lease_id`` (``_made_here``)."""
        if not lease_id:
            return
        while len(self._made_here) >= _MADE_HERE_MAX:
            del self._made_here[next(iter(self._made_here))]  # the oldest
        self._made_here[lease_id] = name

    def _taken(self, name: str, hosts: set[str] | None) -> BackendError:
        """The refusal of a name that is not this lease's to create (and so to drop)."""
        what = (f"{', '.join(_account(name, h) for h in sorted(hosts))} exists already"
                if hosts else f"{quote_literal(name)} is the mount's admin account")
        # Worded as the server's refusal of a taken name would be (error 1396).
        return BackendError(
            f"mysql {self._host}:{self._port}: creating user failed: (1396) {what}; not "
            "this lease's, so left alone (use a username_template with {{random}})",
            retryable=False, created_nothing=True)

    async def renew_user(self, req: RenewUserRequest) -> RenewUserResponse:
        """Nothing to push: MySQL accounts have no expiry (see "Renewal" in the module docs)."""
        self._check_username(req.username)
        return RenewUserResponse(expiration=req.expiration)

    async def delete_user(self, req: DeleteUserRequest) -> DeleteUserResponse:
        """Lock, kill, drop: the protocol is ``plugins._mysql_revoke``'s (``_revoke``)."""
        name = self._check_username(req.username)
        if name == self._user:
            # Never issued by this version (new_user refuses the name); a lease
            # of it from before would lock, kill and drop the admin's own account.
            raise BackendError(
                f"mysql mount {self.mount!r}: refusing to revoke {name!r}: it is the name of "
                "the mount's admin account; drop the lease's account by hand and end the "
                "lease with sys/leases/revoke-force", retryable=False)
        role = req.role
        custom: Sequence[str] = ()
        key = "revocation_statements"
        if role is not None:
            use_rollback = req.reason == "rollback" and role.rollback_statements
            key = "rollback_statements" if use_rollback else "revocation_statements"
            templates = role.rollback_statements if use_rollback else role.revocation_statements
            custom = self._render_all(templates, self._values(role, name), key)
        hosts = self._candidate_hosts(req)
        # A rollback drops only the accounts its own issue made: tagged with its
        # lease (plugins._mysql_grants), or made by this process's new_user after
        # it found the name free (_made_here: the tag may be missing, see there).
        owner = owner_tag(req.lease_id) if req.reason == "rollback" else None
        if owner is not None and self._made_here.get(req.lease_id) == name:
            owner = None
        async with self._cursor("revoking user") as cur:
            failed = await _revoke(self, cur, name, hosts, custom, key,
                                   rollback=req.reason == "rollback", owner=owner)
        self._made_here.pop(req.lease_id, None)
        if failed is not None:
            raise failed
        return DeleteUserResponse()

    async def rotate_root(self, req: RotateRootRequest) -> RotateRootResponse:
        """ALTER the admin account's own password, then reopen the pool with it
        (``plugins._mysql_rotate``: what happens when that fails half-way)."""
        return await _rotate_root(self, req)

    async def _adopt_root(self, pool: aiomysql.Pool, password: str) -> None:
        """Use ``pool`` (logging in with ``password``) from now on."""
        # Pooled connections stay logged in; new ones must use the new password.
        old_pool, self._pool, self._password = self._pool, pool, password
        if old_pool is not None:
            old_pool.close()
            await old_pool.wait_closed()

    # -- helpers ----------------------------------------------------------------------

    def _check_username(self, name: str) -> str:
        return check_username(name, self.capabilities.max_username_length)

    def _role_host(self, role: RoleSpec | None) -> str:
        if role is not None and isinstance(role.options.get("host"), str):
            return str(role.options["host"])
        return self._host_part

    def _role_database(self, role: RoleSpec | None) -> str | None:
        if role is not None and isinstance(role.options.get("database"), str):
            return str(role.options["database"])
        return self._database

    def _values(
        self, role: RoleSpec | None, name: str, *, expiration: datetime | None = None
    ) -> dict[str, str]:
        values = {"name": name, "username": name}
        db = self._role_database(role)
        if db is not None:
            values["database"] = db
        if expiration is not None:
            values["expiration"] = check_expiration(expiration)
        return values

    def _default_creation(self, host: str) -> tuple[str, ...]:
        h = quote_literal(host)
        return (
            f"CREATE USER '{{{{name}}}}'@{h} IDENTIFIED BY '{{{{password}}}}'",
            f"GRANT SELECT ON `{{{{database}}}}`.* TO '{{{{name}}}}'@{h}",
        )

    def _render_all(
        self,
        templates: Sequence[str],
        values: Mapping[str, str],
        key: str,
        secrets: Sequence[str] = (),
    ) -> list[str]:
        try:
            # One list entry may hold several statements; aiomysql sends one per call.
            return [stmt for t in templates for stmt in split_statements(render(t, values))]
        except ValueError as exc:
            message = _redact(str(exc), secrets)
        raise BackendError(f"mysql {key}: {message}", retryable=False)

    def _candidate_hosts(self, req: DeleteUserRequest) -> set[str]:
        hosts = {self._role_host(req.role)}
        stored = req.revocation.get("host")
        if isinstance(stored, str) and _HOST_OK.fullmatch(stored):
            hosts.add(stored)
        return hosts

    async def _user_hosts(self, cur: Any, name: str, what: str = "revoking user"
                          ) -> set[str] | None:
        """Every host part the user exists with (custom statements may pick their own).

        An empty set: the user exists nowhere. None: unknown (``mysql.user`` is
        not readable, or the user exists only with host parts we do not quote).
        """
        try:
            await cur.execute("SELECT Host FROM mysql.user WHERE User = %s", (name,))
        except pymysql.err.MySQLError as exc:
            if _error_code(exc) in _ACCESS_DENIED:
                log.debug("cannot read mysql.user; dropping the configured host only")
                return None
            raise self._wrap(what, exc) from None
        rows = await cur.fetchall()
        hosts = {str(row[0]) for row in rows if _HOST_OK.fullmatch(str(row[0]))}
        return None if rows and not hosts else hosts

    async def _hosts_as_stored(self, cur: Any, name: str) -> set[str] | None:
        """Every host part of ``name`` in ``mysql.user``, whatever it holds (only ever
        shown quoted); None if ``mysql.user`` is not readable."""
        try:
            await cur.execute("SELECT Host FROM mysql.user WHERE User = %s", (name,))
        except pymysql.err.MySQLError as exc:
            if _error_code(exc) in _ACCESS_DENIED:
                return None
            raise self._wrap("creating user", exc) from None
        return {str(row[0]) for row in await cur.fetchall()}

    async def _drop_new_accounts(
        self, cur: Any, name: str, before: set[str], exc: BackendError
    ) -> None:
        """Drop the accounts of ``name`` a refused first statement made anyway.

        ``before``: the hosts ``name`` had before it ran; those are not ours.
        If this cannot finish, ``exc`` stops saying the issue created nothing:
        the engine's rollback then drops every host of the name. That may take
        a colliding account that was there before, but leaves no untracked one.
        """
        try:
            after = await self._user_hosts(cur, name, "creating user")
            for host in sorted((after or set()) - before):
                await self._run(cur, "creating user", f"DROP USER IF EXISTS {_account(name, host)}")
        except BackendError:
            log.warning("mysql: could not drop the accounts of %s a failed CREATE made;"
                        " the rollback drops them", name)
            exc.created_nothing = False
            return
        if after is None:  # unknown: the rollback must look for itself
            exc.created_nothing = False

    async def _drop_quietly(self, cur: Any, name: str, host: str) -> None:
        try:
            await cur.execute(
                f"DROP USER IF EXISTS {quote_literal(name)}@{quote_literal(host)}"
            )
        except Exception:  # the engine's rollback retries the delete
            log.warning("mysql: could not drop half-created user %s@%s", name, host)

    async def _run(
        self,
        cur: Any,
        what: str,
        stmt: str,
        *secrets: str,
        params: tuple[Any, ...] | None = None,
    ) -> None:
        try:
            await cur.execute(stmt, params)
        except Exception as exc:  # wrapped without secrets below
            err = self._wrap(what, exc, secrets=secrets)
        else:
            return
        # Raised outside the except block so the driver's error (which may echo
        # the statement and its password) is not chained as __context__.
        raise err

    def _cursor(self, what: str, *secrets: str) -> AbstractAsyncContextManager[Any]:
        pool = self._pool
        if pool is None:
            raise BackendError(f"mysql mount {self.mount!r} is not initialized", retryable=True)
        return self._cursor_on(pool, what, *secrets)

    @asynccontextmanager
    async def _cursor_on(self, pool: aiomysql.Pool, what: str, *secrets: str
                         ) -> AsyncIterator[Any]:
        conn = await self._acquire(pool, what, secrets)
        try:
            async with conn.cursor() as cur:
                yield cur
        except BaseException as exc:
            if not isinstance(exc, BackendError) or (not exc.created_nothing and conn.closed):
                # Cancelled or broken mid-statement (the connection lost): the
                # session state is unknown, so it must not go back to the pool.
                # The server may still be running that statement (a CREATE USER
                # waiting on a lock): the next revocation ends it first (_settle).
                self._unsettled[conn.thread_id()] = asyncio.get_running_loop().time()
                conn.close()
            raise
        finally:
            await pool.release(conn)

    async def _acquire(self, pool: aiomysql.Pool, what: str, secrets: Sequence[str]) -> Any:
        try:
            return await pool.acquire()
        except Exception as exc:  # wrapped without secrets below
            err = self._wrap(what, exc, secrets=secrets, connecting=True)
        raise err

    def _wrap(
        self,
        what: str,
        exc: BaseException,
        *,
        secrets: Iterable[str | None] = (),
        connecting: bool = False,
    ) -> BackendError:
        """A BackendError saying what failed, with every secret removed."""
        code = _error_code(exc)
        if isinstance(exc, pymysql.err.MySQLError) and len(exc.args) >= 2:
            detail = f"({code}) {exc.args[1]}"
        else:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        retryable = (
            connecting
            or code in _RETRYABLE_CODES
            or isinstance(exc, OSError | asyncio.TimeoutError | pymysql.err.InterfaceError)
        )
        detail = _redact(detail, [*secrets, self._password])
        where = f"{self._host}:{self._port}"
        # An error the server sent back (not a client-side 2xxx code: lost
        # connection, gone away) means it refused the statement: it did nothing.
        refused = (isinstance(exc, pymysql.err.MySQLError) and code is not None
                   and not 2000 <= code < 3000)
        return BackendError(f"mysql {where}: {what} failed: {detail}", retryable=retryable,
                            created_nothing=refused)


def _one_account(stmt: str, name: str) -> bool:
    """Whether ``stmt`` is a CREATE USER of a single account of ``name``.

    If the server refuses such a statement, it made nothing. Anything else
    naming the user (several accounts, EXECUTE IMMEDIATE, CALL) may have made
    some accounts before failing; a statement not naming it made none of its.
    """
    mentions = stmt.count(name)
    return mentions == 0 or (
        mentions == 1 and re.match(r"\s*CREATE\s+USER\s", stmt, re.IGNORECASE) is not None
    )


def _grant_database(name: str) -> str:
    """``name`` as a database-level GRANT's pattern that matches only that database.

    MySQL and MariaDB read ``_`` and ``%`` in ``GRANT ... ON `db`.*`` as
    wildcards unless escaped with a backslash (what the official Docker images
    do too). ``_DATABASE_OK`` already keeps backslashes and ``%`` out.
    """
    return name.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")


def _int_option(opts: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = opts.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise PluginConfigError(key, f"expected an integer, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise PluginConfigError(key, f"must be in {lo}..{hi}, got {value}")
    return value


def _host_option(opts: Mapping[str, Any], key: str, default: str, *, prefix: str = "") -> str:
    value = opts.get(key, default)
    if not isinstance(value, str) or not _HOST_OK.fullmatch(value):
        raise PluginConfigError(
            f"{prefix}{key}",
            f"{value!r} is not an account host part (a name, an IP, % or _ wildcards)",
        )
    return value
