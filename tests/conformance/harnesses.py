"""The harnesses the conformance suite runs over: name -> factory (or "module:attribute").

Adding a backend is one line in ``HARNESSES`` plus a ``BackendHarness``
subclass, here or in any importable module::

    HARNESSES["mysql"] = "tests.conformance.mysql_harness:MySQLHarness.factory"

A factory takes the fixture lookup (``request.getfixturevalue``), so a harness
asks for exactly the server fixture it needs and nothing starts for the
others.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import os
import secrets
import subprocess
import warnings
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import asyncpg

from broker.backend import MountSpec, RoleSpec
from broker.bench.pgcluster import PrivateCluster, local_initdb
from broker.conformance import BROKEN_ROLE, ROLE, BackendHarness, FixtureLookup, HarnessFactory
from broker.templating import generate_password
from tests.conftest import free_port, server_missing

__all__ = ["HARNESSES", "PostgresHarness", "password_checking_postgres"]


# -- PostgreSQL ----------------------------------------------------------------

_checked: dict[str, str | None] = {}


async def password_checking_postgres(dsn: str) -> str | None:
    """A superuser DSN for a PostgreSQL that checks passwords and VALID UNTIL.

    ``dsn`` itself when its server does. A server with ``trust`` in pg_hba
    (the local dev server) lets any password in and ignores VALID UNTIL, so
    login checks would prove nothing: then a throwaway cluster with
    scram-sha-256 is started from the local binaries, once per test session.
    None when neither is possible.
    """
    if dsn not in _checked:
        if await _checks_passwords(dsn):
            _checked[dsn] = dsn
        else:
            _checked[dsn] = await asyncio.to_thread(_start_private_cluster, local_initdb())
    return _checked[dsn]


async def _checks_passwords(dsn: str) -> bool:
    probe = f"broker_probe_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f"CREATE ROLE \"{probe}\" LOGIN PASSWORD '{generate_password()}'")
        try:
            parts = urlsplit(dsn)
            conn = await asyncpg.connect(
                host=parts.hostname, port=parts.port or 5432, user=probe,
                password="not-the-password", database=_database(dsn), timeout=5,
            )
        except (asyncpg.PostgresError, OSError):
            return True
        await conn.close()
        return False
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{probe}"')
        await admin.close()


def _pgserver_initdb() -> str | None:
    """initdb of the PostgreSQL 16 the ``pgserver`` wheel carries (a test extra), if installed."""
    try:
        with warnings.catch_warnings():
            # Its import reads XDG_RUNTIME_DIR, warning when unset (as in CI).
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        return None
    bindir = os.path.join(os.path.dirname(pgserver.__file__), "pginstall", "bin")
    try:
        version = subprocess.run([os.path.join(bindir, "postgres"), "--version"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return os.path.join(bindir, "initdb") if " 16." in version else None


_PG16: list[str] = []


def postgres16_dsn() -> str:
    """A superuser DSN of a private PostgreSQL 16 cluster, started once per test session.

    The local server is PostgreSQL 15 here; 16 changed what a CREATEROLE
    admin may do to the roles it creates (it gets ADMIN OPTION on them),
    which is what the least-privilege harness depends on.
    """
    if not _PG16:
        try:
            dsn = _start_private_cluster(_pgserver_initdb())
        except (OSError, subprocess.SubprocessError) as exc:
            # e.g. run as root with the virtualenv under /root, which the
            # postgres OS user the cluster runs as cannot read
            server_missing(f"PostgreSQL 16 from the pgserver wheel did not start: {exc}")
        if dsn is None:
            server_missing("PostgreSQL 16 (pip install pgserver, a test extra)")
        assert dsn is not None
        _PG16.append(dsn)
    return _PG16[0]


def _start_private_cluster(initdb: str | None) -> str | None:
    if initdb is None:
        return None
    try:
        cluster = PrivateCluster.start(
            initdb=initdb, settings={"fsync": "off", "max_connections": "200"},
            prefix="broker-kit-pg-")
    except LookupError:  # root, and no postgres OS user to run it as
        return None
    atexit.register(cluster.stop)
    return cluster.dsn


def _database(dsn: str) -> str:
    parts = urlsplit(dsn)
    return unquote(parts.path.lstrip("/")) or unquote(parts.username or "postgres")


class PostgresHarness(BackendHarness):
    """The postgres plugin against a real server, in a schema of its own with a few tables."""

    TABLES = ("items", "orders", "events")

    def __init__(self, dsn: str) -> None:
        self._source_dsn = dsn
        self.dsn = dsn
        tag = secrets.token_hex(3)
        self.mount_name = f"kit{tag}"
        self.schema = f"broker_kit_{tag}"
        self._admin: asyncpg.Connection | None = None

    @classmethod
    def factory(cls, fixture: FixtureLookup) -> PostgresHarness:
        return cls(fixture("postgres_dsn"))

    # -- server coordinates --------------------------------------------------

    @property
    def host(self) -> str:
        return urlsplit(self.dsn).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.dsn).port or 5432

    @property
    def database(self) -> str:
        return _database(self.dsn)

    @property
    def admin_user(self) -> str:
        return unquote(urlsplit(self.dsn).username or "postgres")

    @property
    def admin_password(self) -> str | None:
        password = urlsplit(self.dsn).password
        return unquote(password) if password else None

    @property
    def admin(self) -> asyncpg.Connection:
        assert self._admin is not None, "setup() not run"
        return self._admin

    # -- lifecycle ------------------------------------------------------------

    async def setup(self) -> None:
        dsn = await password_checking_postgres(self._source_dsn)
        if dsn is None:
            server_missing(
                "a PostgreSQL that checks passwords (the given server trusts every login "
                "and no local initdb was found to start one)"
            )
        assert dsn is not None
        self.dsn = dsn
        self._admin = await asyncpg.connect(dsn)
        await self.admin.execute(f'CREATE SCHEMA "{self.schema}"')
        for table in self.TABLES:
            await self.admin.execute(
                f'CREATE TABLE "{self.schema}".{table} (id int PRIMARY KEY, note text);'
                f'INSERT INTO "{self.schema}".{table} VALUES (1, \'one\'), (2, \'two\')'
            )

    async def teardown(self) -> None:
        if self._admin is None:
            return
        try:
            for name in await self.leftover_roles():
                await self.drop_role(name)
            await self.admin.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await self.admin.close()
            self._admin = None

    async def leftover_roles(self) -> list[str]:
        rows = await self.admin.fetch(
            "SELECT rolname FROM pg_roles WHERE strpos(rolname, $1) > 0", self.mount_name
        )
        return [r["rolname"] for r in rows]

    async def drop_role(self, name: str) -> None:
        """Out-of-band cleanup, independent of the plugin under test."""
        await self.admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name
        )
        await self.admin.execute(
            f'REASSIGN OWNED BY "{name}" TO CURRENT_USER; DROP OWNED BY "{name}"; '
            f'DROP ROLE IF EXISTS "{name}"'
        )

    # -- BackendHarness -------------------------------------------------------

    def role_spec(self, name: str = ROLE, **statements: Any) -> RoleSpec:
        return RoleSpec(name=name, default_ttl=3600, max_ttl=86400, **statements)

    def make_mount(self, *, reachable: bool = True, **options: Any) -> MountSpec:
        port = self.port
        if not reachable:
            port = free_port()  # nothing listens there
        schema = self.schema
        roles = {
            ROLE: self.role_spec(
                ROLE,
                creation_statements=(
                    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
                    "VALID UNTIL '{{expiration}}'",
                    f'GRANT USAGE ON SCHEMA "{schema}" TO "{{{{name}}}}"',
                    f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{{{{name}}}}"',
                ),
            ),
            BROKEN_ROLE: self.role_spec(
                BROKEN_ROLE,
                creation_statements=(
                    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}'",
                    # The server echoes the value: "invalid input syntax ...: "<password>"".
                    "SELECT '{{password}}'::integer",
                ),
            ),
        }
        return MountSpec(
            name=self.mount_name,
            plugin="postgres",
            roles=roles,
            secret=self.admin_password,
            options={
                "connection_url": f"postgresql://{self.admin_user}@{self.host}:{port}/"
                f"{self.database}",
                "connect_timeout": "5s",
                **options,
            },
        )

    async def connect_as(self, data: Mapping[str, Any]) -> asyncpg.Connection:
        return await asyncpg.connect(
            host=self.host,
            port=self.port,
            user=data["username"],
            password=data["password"],
            database=self.database,
            timeout=5,
        )

    async def exercise(self, session: asyncpg.Connection) -> None:
        for table in self.TABLES:
            count = await session.fetchval(f'SELECT count(*) FROM "{self.schema}".{table}')
            assert count == 2

    async def session_alive(self, session: asyncpg.Connection) -> bool:
        try:
            return bool(await session.fetchval("SELECT 1", timeout=5))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            return False

    async def close_session(self, session: asyncpg.Connection) -> None:
        try:
            await session.close(timeout=5)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            session.terminate()

    async def user_exists(self, username: str) -> bool:
        found = await self.admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", username)
        return bool(found)

    async def server_expiry(self, username: str) -> datetime | None:
        value: datetime | None = await self.admin.fetchval(
            "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1", username
        )
        return value

    def secret_values(self) -> list[str]:
        return [p for p in (self.admin_password,) if p]


def signed_by(mount: MountSpec, user: str, secret: str, options: Mapping[str, Any]
              ) -> MountSpec:
    """``mount`` logging in as ``user`` with ``secret`` (for the least-privilege harnesses).

    The user of its ``connection_url`` is replaced; ``options`` (what the test
    asked for) still win over that.
    """
    url = urlsplit(mount.options["connection_url"])
    own = url._replace(netloc=f"{quote(user)}@{url.netloc.rpartition('@')[2]}")
    return dataclasses.replace(mount, secret=secret, options={
        **mount.options, "connection_url": urlunsplit(own), **options})


class LeastPrivilegePostgresHarness(PostgresHarness):
    """The postgres plugin run by the admin docs/plugins.md describes: no superuser.

    ``CREATEROLE``, ``pg_signal_backend``, and the schema's rights ``WITH
    GRANT OPTION``; the harness's own checks and cleanup keep the superuser
    connection (``admin``).
    """

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        # Not containing mount_name: leftover_roles() must not list it.
        self.mount_admin = f"lp_admin_{self.schema.removeprefix('broker_kit_')}"
        self.mount_admin_password = generate_password()

    async def setup(self) -> None:
        await super().setup()
        who, schema = f'"{self.mount_admin}"', f'"{self.schema}"'
        await self.admin.execute(
            f"CREATE ROLE {who} LOGIN CREATEROLE PASSWORD '{self.mount_admin_password}';"
            f"GRANT pg_signal_backend TO {who};"
            # CREATE too: tests/integration/test_postgres_least_privilege.py
            # lets a role own a table, to revoke a role that owns objects.
            f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {who} WITH GRANT OPTION;"
            f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {who} WITH GRANT OPTION")

    async def teardown(self) -> None:
        try:
            if self._admin is not None:
                for name in await self.leftover_roles():
                    await self.drop_role(name)
                if await self.user_exists(self.mount_admin):  # setup may have failed first
                    await self.drop_role(self.mount_admin)
        finally:
            await super().teardown()

    def make_mount(self, *, reachable: bool = True, **options: Any) -> MountSpec:
        return signed_by(super().make_mount(reachable=reachable, **options),
                         self.mount_admin, self.mount_admin_password, options)

    def secret_values(self) -> list[str]:
        return [*super().secret_values(), self.mount_admin_password]


#: name -> factory or "module:attribute". One line per backend.
HARNESSES: dict[str, HarnessFactory | str] = {
    "postgres": PostgresHarness.factory,
    "postgres-least-privilege": LeastPrivilegePostgresHarness.factory,
    "postgres16": lambda _fixture: PostgresHarness(postgres16_dsn()),
    "postgres16-least-privilege": lambda _fixture: LeastPrivilegePostgresHarness(postgres16_dsn()),
    "mysql": "tests.conformance.mysql_harness:mysql_harness",
    "mysql-least-privilege": "tests.conformance.mysql_harness:least_privilege_mysql_harness",
    "aws": "tests.conformance.aws_harness:aws_harness",
    "aws-least-privilege": "tests.conformance.aws_harness:least_privilege_aws_harness",
}
