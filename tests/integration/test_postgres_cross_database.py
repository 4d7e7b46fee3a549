"""Revoking a postgres role that owns objects or holds privileges in another database.

``REASSIGN OWNED`` and ``DROP OWNED`` act on the current database only, so
without the plugin's cross-database pass ``DROP ROLE`` fails ("some objects
depend on it ... in database X") and the lease can never be revoked. Each test
makes a database of its own in the test cluster (``broker_xdb_*``, dropped
afterwards even on failure), lets a leased role create a table and get grants
there, and revokes it through the plugin.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from broker.backend import BackendError, RoleSpec
from plugins.postgres import PostgresBackend
from tests.conformance.harnesses import (
    LeastPrivilegePostgresHarness,
    PostgresHarness,
    postgres16_dsn,
)
from tests.integration.test_postgres_backend import alive, delete_req, new_req, role, username

pytestmark = pytest.mark.integration

SUPERUSER = "superuser"
LEAST_PRIVILEGE = "least-privilege"
LEAST_PRIVILEGE_16 = "pg16-least-privilege"


@pytest.fixture
async def harness(request: pytest.FixtureRequest,
                  postgres_dsn: str) -> AsyncIterator[PostgresHarness]:
    """A harness whose mount admin is a superuser, or CREATEROLE only (PostgreSQL 15 or 16)."""
    kind = getattr(request, "param", SUPERUSER)
    h: PostgresHarness
    if kind == SUPERUSER:
        h = PostgresHarness(postgres_dsn)
    elif kind == LEAST_PRIVILEGE:
        h = LeastPrivilegePostgresHarness(postgres_dsn)
    else:
        h = LeastPrivilegePostgresHarness(postgres16_dsn())
    await h.setup()
    try:
        yield h
    finally:
        await h.teardown()


def mount_admin(harness: PostgresHarness) -> tuple[str, str | None]:
    """The user and password the plugin logs in with."""
    if isinstance(harness, LeastPrivilegePostgresHarness):
        return harness.mount_admin, harness.mount_admin_password
    return harness.admin_user, harness.admin_password


async def connect(harness: PostgresHarness, database: str, user: str,
                  password: str | None) -> asyncpg.Connection:
    return await asyncpg.connect(host=harness.host, port=harness.port, user=user,
                                 password=password, database=database, timeout=5)


class ExtraDatabase:
    """A database of its own in the harness cluster, with a table the admin may grant on."""

    def __init__(self, harness: PostgresHarness, name: str) -> None:
        self.harness = harness
        self.name = name

    async def superuser(self) -> asyncpg.Connection:
        return await connect(self.harness, self.name, self.harness.admin_user,
                             self.harness.admin_password)

    async def setup(self) -> None:
        conn = await self.superuser()
        try:
            await conn.execute("CREATE TABLE public.shared_t (id int); "
                               "INSERT INTO public.shared_t VALUES (1)")
            admin, _ = mount_admin(self.harness)
            if admin != self.harness.admin_user:  # what a least-privilege admin is given
                await conn.execute(
                    f'GRANT USAGE, CREATE ON SCHEMA public TO "{admin}" WITH GRANT OPTION; '
                    f'GRANT SELECT ON public.shared_t TO "{admin}" WITH GRANT OPTION')
        finally:
            await conn.close()

    async def give(self, name: str) -> None:
        """The mount admin grants ``name`` the right to create tables here and to read one."""
        admin, password = mount_admin(self.harness)
        conn = await connect(self.harness, self.name, admin, password)
        try:
            await conn.execute(f'GRANT USAGE, CREATE ON SCHEMA public TO "{name}"; '
                               f'GRANT SELECT ON public.shared_t TO "{name}"')
        finally:
            await conn.close()

    async def use(self, name: str, password: str, table: str) -> asyncpg.Connection:
        """Log in here as ``name``, create ``table`` and read the granted one; left open."""
        session = await connect(self.harness, self.name, name, password)
        await session.execute(f"CREATE TABLE public.{table} (id int); "
                              f"INSERT INTO public.{table} VALUES (7)")
        assert await session.fetchval("SELECT count(*) FROM public.shared_t") == 1
        return session

    async def owner_of(self, table: str) -> str | None:
        conn = await self.superuser()
        try:
            owner: str | None = await conn.fetchval(
                "SELECT tableowner FROM pg_tables WHERE schemaname = 'public' AND tablename = $1",
                table)
            return owner
        finally:
            await conn.close()

    async def rows_of(self, table: str) -> int:
        conn = await self.superuser()
        try:
            return int(await conn.fetchval(f"SELECT count(*) FROM public.{table}"))
        finally:
            await conn.close()


@pytest.fixture
async def extra(harness: PostgresHarness) -> AsyncIterator[ExtraDatabase]:
    """A fresh ``broker_xdb_*`` database; dropped (sessions and all) before the harness's
    own clean-up, whose DROP ROLE would otherwise meet the roles' objects in it."""
    name = f"broker_xdb_{secrets.token_hex(4)}"
    await harness.admin.execute(f'CREATE DATABASE "{name}"')
    try:
        db = ExtraDatabase(harness, name)
        await db.setup()
        yield db
    finally:
        await harness.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def backend(harness: PostgresHarness) -> AsyncIterator[PostgresBackend]:
    made = PostgresBackend.from_config(harness.make_mount())
    await made.initialize()
    try:
        yield made
    finally:
        await made.close()


async def issue_and_use(harness: PostgresHarness, backend: PostgresBackend,
                        extra: ExtraDatabase, table: str,
                        spec: RoleSpec | None = None) -> tuple[str, int, asyncpg.Connection]:
    """A leased role that owns ``table`` and holds grants in the extra database:
    (name, oid, its open session there)."""
    name = username(harness)
    issued = await backend.new_user(new_req(spec or role(), name))
    await extra.give(name)
    session = await extra.use(name, issued.data["password"], table)
    oid = int(await harness.admin.fetchval("SELECT oid FROM pg_roles WHERE rolname = $1", name))
    return name, oid, session


async def dependencies(harness: PostgresHarness, oid: int) -> int:
    """What still refers to role ``oid`` in any database of the cluster (pg_shdepend is shared)."""
    return int(await harness.admin.fetchval(
        "SELECT count(*) FROM pg_shdepend "
        "WHERE refclassid = 'pg_authid'::regclass AND refobjid = $1", oid))


@pytest.mark.parametrize("harness", [SUPERUSER, LEAST_PRIVILEGE, LEAST_PRIVILEGE_16],
                         indirect=True)
async def test_a_role_with_a_table_and_grants_in_another_database_is_dropped(
    harness: PostgresHarness, backend: PostgresBackend, extra: ExtraDatabase,
) -> None:
    """The role's table elsewhere is handed to the admin, its grants there go, the role too."""
    name, oid, session = await issue_and_use(harness, backend, extra, "mine_t")

    await backend.delete_user(delete_req(None, name))

    assert not await harness.user_exists(name)
    assert not await alive(session)  # its session in the other database ended too
    await harness.close_session(session)
    assert await dependencies(harness, oid) == 0
    assert await extra.owner_of("mine_t") == mount_admin(harness)[0]
    assert await extra.rows_of("mine_t") == 1  # data kept
    assert await extra.owner_of("shared_t") == harness.admin_user  # not the role's: untouched
    await backend.delete_user(delete_req(None, name))  # idempotent


@pytest.mark.parametrize("harness", [SUPERUSER, LEAST_PRIVILEGE], indirect=True)
async def test_concurrent_revocations_of_a_role_used_elsewhere(
    harness: PostgresHarness, backend: PostgresBackend, extra: ExtraDatabase,
) -> None:
    """Several revocations of the role at once all succeed: the clean-ups there do not collide,
    and the ones that find the role already gone call it done."""
    name, oid, session = await issue_and_use(harness, backend, extra, "raced_t")

    await asyncio.gather(*(backend.delete_user(delete_req(None, name)) for _ in range(4)))

    assert not await harness.user_exists(name)
    await harness.close_session(session)
    assert await dependencies(harness, oid) == 0
    assert await extra.owner_of("raced_t") == mount_admin(harness)[0]


@pytest.mark.parametrize("harness", [SUPERUSER, LEAST_PRIVILEGE], indirect=True)
async def test_a_batch_with_roles_in_another_database(
    harness: PostgresHarness, backend: PostgresBackend, extra: ExtraDatabase,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The sweeper's batch cleans the other database for its roles and stays one batch."""
    caplog.set_level(logging.INFO, logger="plugins.postgres")
    used = [await issue_and_use(harness, backend, extra, f"batch_{i}") for i in range(2)]
    plain = username(harness)
    await backend.new_user(new_req(role(), plain))
    names = [name for name, _, _ in used] + [plain]

    results = await backend.delete_users([delete_req(None, name) for name in names])

    assert results == [None, None, None]
    assert "one by one" not in caplog.text
    assert [await harness.user_exists(name) for name in names] == [False] * 3
    for i, (_, oid, session) in enumerate(used):
        await harness.close_session(session)
        assert await dependencies(harness, oid) == 0
        assert await extra.owner_of(f"batch_{i}") == mount_admin(harness)[0]


async def test_custom_revocation_statements_still_drop_a_role_used_elsewhere(
    harness: PostgresHarness, backend: PostgresBackend, extra: ExtraDatabase,
) -> None:
    """A custom DROP ROLE refused for the other database succeeds once that is cleaned up."""
    spec = role(revocation_statements=('DROP ROLE "{{name}}"',))
    name, oid, session = await issue_and_use(harness, backend, extra, "custom_t", spec)

    await backend.delete_user(delete_req(spec, name))

    assert not await harness.user_exists(name)
    await harness.close_session(session)
    assert await dependencies(harness, oid) == 0
    assert await extra.owner_of("custom_t") == harness.admin_user


async def test_a_database_that_accepts_no_connections_is_named_in_the_error(
    harness: PostgresHarness, backend: PostgresBackend, extra: ExtraDatabase,
) -> None:
    """datallowconn = false: the error says which database and why; allowed again, a retry
    finishes the revocation."""
    name, oid, session = await issue_and_use(harness, backend, extra, "closed_t")
    await harness.close_session(session)
    await harness.admin.execute(f'ALTER DATABASE "{extra.name}" ALLOW_CONNECTIONS false')

    with pytest.raises(BackendError) as info:
        await backend.delete_user(delete_req(None, name))
    message = str(info.value)
    assert f'"{extra.name}"' in message
    assert "accept no connections" in message
    assert not info.value.retryable
    assert await harness.user_exists(name)  # nothing half-dropped: the lease stays revoking

    await harness.admin.execute(f'ALTER DATABASE "{extra.name}" ALLOW_CONNECTIONS true')
    await backend.delete_user(delete_req(None, name))
    assert not await harness.user_exists(name)
    assert await dependencies(harness, oid) == 0


@pytest.mark.parametrize("harness", [LEAST_PRIVILEGE], indirect=True)
async def test_a_database_the_admin_may_not_enter_is_named_in_the_error(
    harness: PostgresHarness, backend: PostgresBackend, extra: ExtraDatabase,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No CONNECT for the admin there: a clear error naming the database, without the admin
    password; once granted, the retry (after the partial clean-up) succeeds."""
    name, oid, session = await issue_and_use(harness, backend, extra, "locked_t")
    admin, password = mount_admin(harness)
    assert password
    await harness.admin.execute(f'REVOKE CONNECT ON DATABASE "{extra.name}" FROM PUBLIC')

    with pytest.raises(BackendError) as info:
        await backend.delete_user(delete_req(None, name))
    message = str(info.value)
    assert f'database "{extra.name}"' in message
    assert "permission denied" in message
    assert not info.value.retryable  # retrying cannot help until the operator grants it
    assert password not in message and password not in caplog.text
    assert await harness.user_exists(name)
    assert not await alive(session)  # logins blocked and sessions ended all the same
    await harness.close_session(session)

    await harness.admin.execute(f'GRANT CONNECT ON DATABASE "{extra.name}" TO "{admin}"')
    await backend.delete_user(delete_req(None, name))
    assert not await harness.user_exists(name)
    assert await dependencies(harness, oid) == 0
    assert await extra.owner_of("locked_t") == admin
