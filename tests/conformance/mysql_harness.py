"""The conformance harness of the mysql plugin: a real MySQL/MariaDB, a database of its own.

Registered in ``harnesses.HARNESSES`` as ``"tests.conformance.mysql_harness:mysql_harness"``.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomysql
import pymysql

from broker.backend import MountSpec, RoleSpec
from broker.conformance import BROKEN_ROLE, ROLE, BackendHarness, FixtureLookup

__all__ = ["LeastPrivilegeMySQLHarness", "MySQLHarness", "least_privilege_mysql_harness",
           "mysql_harness"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MySQLHarness(BackendHarness):
    """The mysql plugin on its safe default statements, granting SELECT on one database."""

    TABLES = ("items", "orders", "events")

    def __init__(self, dsn: str) -> None:
        url = urlsplit(dsn)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 3306
        self.admin_user = unquote(url.username or "root")
        self.admin_password = unquote(url.password) if url.password else None
        tag = secrets.token_hex(3)
        self.mount_name = f"kit{tag}"
        self.database = f"broker_kit_{tag}"
        self._admin: aiomysql.Connection | None = None

    @classmethod
    def factory(cls, fixture: FixtureLookup) -> MySQLHarness:
        return cls(fixture("mysql_dsn"))

    # -- admin side -----------------------------------------------------------

    async def _sql(self, stmt: str, *args: Any) -> list[tuple[Any, ...]]:
        assert self._admin is not None, "setup() not run"
        async with self._admin.cursor() as cur:
            await cur.execute(stmt, args or None)
            return list(await cur.fetchall())

    async def setup(self) -> None:
        self._admin = await aiomysql.connect(
            host=self.host, port=self.port, user=self.admin_user,
            password=self.admin_password or "", autocommit=True, connect_timeout=5,
        )
        await self._sql(f"CREATE DATABASE `{self.database}`")
        for table in self.TABLES:
            await self._sql(
                f"CREATE TABLE `{self.database}`.{table} (id INT PRIMARY KEY, note TEXT)"
            )
            await self._sql(f"INSERT INTO `{self.database}`.{table} VALUES (1, 'one'), (2, 'two')")

    async def teardown(self) -> None:
        if self._admin is None:
            return
        try:
            # Out of band, independent of the plugin under test: every user of this mount.
            rows = await self._sql(
                "SELECT User, Host FROM mysql.user WHERE User LIKE %s", f"%{self.mount_name}%"
            )
            for user, host in rows:
                for (thread,) in await self._sql(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s", user
                ):
                    try:
                        await self._sql(f"KILL CONNECTION {int(thread):d}")
                    except pymysql.err.MySQLError:
                        pass  # ended meanwhile
                await self._sql("DROP USER IF EXISTS %s@%s", user, host)
            await self._sql(f"DROP DATABASE IF EXISTS `{self.database}`")
        finally:
            self._admin.close()
            self._admin = None

    # -- BackendHarness -------------------------------------------------------

    def make_mount(self, *, reachable: bool = True, **options: Any) -> MountSpec:
        port = self.port if reachable else _free_port()
        roles = {
            # No creation_statements: the plugin's least-privilege defaults.
            ROLE: RoleSpec(name=ROLE, default_ttl=3600, max_ttl=86400,
                           options={"database": self.database}),
            BROKEN_ROLE: RoleSpec(
                name=BROKEN_ROLE, default_ttl=3600, max_ttl=86400,
                options={"database": self.database},
                creation_statements=(
                    "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'",
                    # A syntax error: the server echoes "near 'SELEKT '<password>''".
                    "SELEKT '{{password}}'",
                ),
            ),
        }
        return MountSpec(
            name=self.mount_name,
            plugin="mysql",
            roles=roles,
            secret=self.admin_password,
            options={
                "connection_url": f"mysql://{self.admin_user}@{self.host}:{port}/",
                **options,
            },
        )

    async def connect_as(self, data: Mapping[str, Any]) -> aiomysql.Connection:
        return await aiomysql.connect(
            host=self.host, port=self.port, user=data["username"], password=data["password"],
            db=self.database, autocommit=True, connect_timeout=5,
        )

    async def exercise(self, session: aiomysql.Connection) -> None:
        async with session.cursor() as cur:
            for table in self.TABLES:
                await cur.execute(f"SELECT COUNT(*) FROM {table}")
                assert (await cur.fetchone())[0] == 2

    async def session_alive(self, session: aiomysql.Connection) -> bool:
        try:
            async with session.cursor() as cur:
                await cur.execute("SELECT 1")
                return bool((await cur.fetchone())[0] == 1)
        except (pymysql.err.MySQLError, OSError, RuntimeError):
            return False

    async def close_session(self, session: aiomysql.Connection) -> None:
        session.close()  # synchronous and quiet on an already-dead socket

    async def user_exists(self, username: str) -> bool:
        return bool(await self._sql("SELECT 1 FROM mysql.user WHERE User = %s", username))

    def secret_values(self) -> list[str]:
        return [self.admin_password] if self.admin_password else []


def mysql_harness(fixture: FixtureLookup) -> MySQLHarness:
    """The factory ``harnesses.HARNESSES`` names (a plain function: a "module:attr" spec)."""
    return MySQLHarness.factory(fixture)


class LeastPrivilegeMySQLHarness(MySQLHarness):
    """The mysql plugin run by the admin docs/plugins.md describes: not root, no SUPER.

    ``CREATE USER``, ``PROCESS``, ``CONNECTION ADMIN``, ``SELECT`` on
    ``mysql.user``, and ``SELECT`` on the database ``WITH GRANT OPTION``; the
    harness's own checks and cleanup keep the root connection.
    """

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        # Not containing mount_name: teardown drops every user that does.
        self.mount_admin = f"lp_{self.database.removeprefix('broker_kit_')}"
        self.mount_admin_password = secrets.token_urlsafe(18)

    async def setup(self) -> None:
        await super().setup()
        who = f"'{self.mount_admin}'@'%'"
        # token_urlsafe: letters, digits, "-" and "_", nothing to quote.
        await self._sql(f"CREATE USER {who} IDENTIFIED BY '{self.mount_admin_password}'")
        await self._sql(f"GRANT CREATE USER, PROCESS, CONNECTION ADMIN ON *.* TO {who}")
        await self._sql(f"GRANT SELECT ON mysql.user TO {who}")
        await self._sql(f"GRANT SELECT ON `{self.database}`.* TO {who} WITH GRANT OPTION")

    async def teardown(self) -> None:
        try:
            if self._admin is not None:
                await self._sql(f"DROP USER IF EXISTS '{self.mount_admin}'@'%'")
        finally:
            await super().teardown()

    def make_mount(self, *, reachable: bool = True, **options: Any) -> MountSpec:
        # Imported here: harnesses.py names this module only as a string.
        from tests.conformance.harnesses import signed_by

        return signed_by(super().make_mount(reachable=reachable, **options),
                         self.mount_admin, self.mount_admin_password, options)

    def secret_values(self) -> list[str]:
        return [*super().secret_values(), self.mount_admin_password]


def least_privilege_mysql_harness(fixture: FixtureLookup) -> MySQLHarness:
    """``harnesses.HARNESSES``' "mysql-least-privilege"."""
    return LeastPrivilegeMySQLHarness.factory(fixture)
