"""The postgres plugin with a least-privilege admin: CREATEROLE and pg_signal_backend, no superuser.

What docs/plugins.md tells operators to create. Every other PostgreSQL test
runs as a superuser, which hides what such an admin may not do; here the
broker's own revocations (one role, a batch, a role that owns a table) must
still end every session and drop every role.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from broker.backend import DeleteUserRequest, RoleSpec
from plugins.postgres import PostgresBackend
from tests.conformance.harnesses import LeastPrivilegePostgresHarness, PostgresHarness
from tests.integration.db_fixtures import harness_up, started_backend
from tests.integration.test_postgres_backend import (
    new_req,
    revoke_with_writes_queued,
    role,
    username,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def harness(postgres_dsn: str) -> AsyncIterator[LeastPrivilegePostgresHarness]:
    """The conformance harness whose mount admin is CREATEROLE + pg_signal_backend only."""
    async with harness_up(LeastPrivilegePostgresHarness, postgres_dsn) as h:
        yield h


@pytest.fixture
async def backend(harness: LeastPrivilegePostgresHarness) -> AsyncIterator[PostgresBackend]:
    """A backend of the harness's mount, checked to run as that non-superuser admin."""
    async with started_backend(PostgresBackend, harness.make_mount()) as made:
        assert not await made._run("test", lambda c: c.fetchval(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))
        yield made


def _owner_role(schema: str) -> RoleSpec:
    """A role that may create tables in the schema, so its leases can own objects."""
    return role("owner", creation_statements=(
        "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
        "VALID UNTIL '{{expiration}}'",
        f'GRANT USAGE, CREATE ON SCHEMA "{schema}" TO "{{{{name}}}}"',
        f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{{{{name}}}}"',
    ))


async def _exists(harness: PostgresHarness, name: str) -> bool:
    return bool(await harness.admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name))


async def test_revoking_a_role_with_a_session_and_a_table_of_its_own(
    harness: PostgresHarness, backend: PostgresBackend,
) -> None:
    spec = _owner_role(harness.schema)
    name = username(harness)
    issued = await backend.new_user(new_req(spec, name))
    session = await harness.connect_as(issued.data)
    table = f"made_{secrets.token_hex(3)}"
    await session.execute(f'CREATE TABLE "{harness.schema}".{table} (id int)')
    await harness.exercise(session)

    await backend.delete_user(DeleteUserRequest(role=spec, username=name, revocation={}))
    assert not await _exists(harness, name)
    assert not await harness.session_alive(session)
    # The table it made stays, owned by the admin now.
    owner = await harness.admin.fetchval(
        "SELECT tableowner FROM pg_tables WHERE schemaname = $1 AND tablename = $2",
        harness.schema, table)
    assert owner == harness.mount_admin
    await harness.close_session(session)


async def test_a_batch_of_revocations(harness: PostgresHarness, backend: PostgresBackend) -> None:
    spec = role()  # the default statements: revoked together in one batch
    names = [username(harness) for _ in range(4)]
    sessions: list[asyncpg.Connection] = []
    for name in names:
        issued = await backend.new_user(new_req(spec, name))
        sessions.append(await harness.connect_as(issued.data))
    results = await backend.delete_users(
        [DeleteUserRequest(role=spec, username=n, revocation={}) for n in names])
    assert results == [None] * len(names)
    assert [await _exists(harness, n) for n in names] == [False] * len(names)
    assert [await harness.session_alive(s) for s in sessions] == [False] * len(names)
    for session in sessions:
        await harness.close_session(session)


async def test_a_rollback_of_a_staged_role(harness: PostgresHarness,
                                           backend: PostgresBackend) -> None:
    """A role whose issue was undone after its COMMIT is revoked with the same rights."""
    spec = _owner_role(harness.schema)
    name = username(harness)
    staged = await backend.stage_user(new_req(spec, name))
    await staged.commit()
    assert await _exists(harness, name)
    await backend.delete_user(DeleteUserRequest(role=spec, username=name, revocation={},
                                                reason="rollback"))
    assert not await _exists(harness, name)


async def test_writes_queued_behind_a_lock_of_the_role_do_not_run(
    harness: PostgresHarness, backend: PostgresBackend,
) -> None:
    """Without superuser (wait events of other roles' sessions hidden from it) the
    admin still ends the sessions queued on a lock before the one holding it."""
    spec = _owner_role(harness.schema)
    for _ in range(3):  # a race: a few rounds
        outcomes = await revoke_with_writes_queued(harness, backend, spec)
        assert all(isinstance(o, BaseException) for o in outcomes), outcomes
