"""PostgreSQL-specific behaviour of plugins.postgres, beyond the conformance kit."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from broker.backend import (
    BackendError,
    DeleteUserRequest,
    MountSpec,
    NewUserRequest,
    PluginConfigError,
    RenewUserRequest,
    RoleSpec,
    RotateRootRequest,
)
from broker.middleware import READY_PASSWORDS, MountRuntime
from broker.templating import generate_password, render_username
from plugins._scram import verifies
from plugins.postgres import _DDL_LOCK_KEY, DEFAULT_CREATION_STATEMENTS, PostgresBackend
from tests.conformance.harnesses import PostgresHarness
from tests.integration.db_fixtures import harness_up, started_backend, started_backends

pytestmark = pytest.mark.integration

MakeBackend = Callable[..., Awaitable[PostgresBackend]]


@pytest.fixture
async def harness(postgres_dsn: str) -> AsyncIterator[PostgresHarness]:
    """The conformance harness on the test server (a schema of its own, a superuser admin)."""
    async with harness_up(PostgresHarness, postgres_dsn) as h:
        yield h


@pytest.fixture
async def make_backend(harness: PostgresHarness) -> AsyncIterator[MakeBackend]:
    """``make(roles, **options)``: an initialized backend of the harness's mount with these
    roles added and these plugin options; closed afterwards."""

    def harness_mount(roles: dict[str, RoleSpec] | None = None, **options: Any) -> MountSpec:
        made = harness.make_mount(**options)
        return dataclasses.replace(made, roles={**made.roles, **roles}) if roles else made

    async with started_backends(PostgresBackend, harness_mount) as make:
        yield make


def role(name: str = "r", **statements: Any) -> RoleSpec:
    return RoleSpec(name=name, default_ttl=3600, max_ttl=86400, **statements)


def username(harness: PostgresHarness) -> str:
    return render_username(None, mount=harness.mount_name, role="it")


def new_req(
    spec: RoleSpec,
    name: str,
    *,
    password: str | None = None,
    expires: datetime | None = None,
) -> NewUserRequest:
    return NewUserRequest(
        role=spec,
        username=name,
        password=password or generate_password(),
        expiration=expires or datetime.now(UTC) + timedelta(minutes=10),
        lease_id="pg/creds/r/x",
    )


def delete_req(spec: RoleSpec | None, name: str, reason: str = "revoke") -> DeleteUserRequest:
    return DeleteUserRequest(role=spec, username=name, revocation={}, reason=reason)


async def alive(session: asyncpg.Connection) -> bool:
    """Whether ``session`` still answers; any failure (asyncpg may raise its own
    InternalClientError on a connection the server just ended) means it does not."""
    try:
        return bool(await session.fetchval("SELECT 1", timeout=5))
    except Exception:
        return False


def grant_role(schema: str) -> RoleSpec:
    return role(
        "grant",
        creation_statements=(
            "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
            "VALID UNTIL '{{expiration}}'",
            f'GRANT USAGE ON SCHEMA "{schema}" TO "{{{{name}}}}"',
            f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{{{{name}}}}"',
        ),
    )


# -- creation -----------------------------------------------------------------


async def test_default_creation_sets_valid_until_and_nothing_else(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """Default statements make a plain LOGIN role whose VALID UNTIL is the lease expiry."""
    backend = await make_backend()
    name = username(harness)
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=7)
    resp = await backend.new_user(new_req(role(), name, expires=expires))
    assert set(resp.data) == {"username", "password"}
    row = await harness.admin.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", name)
    assert row is not None
    assert row["rolvaliduntil"] == expires
    assert row["rolcanlogin"]
    for flag in ("rolsuper", "rolcreaterole", "rolcreatedb", "rolreplication", "rolbypassrls"):
        assert not row[flag], flag
    members = await harness.admin.fetchval(
        "SELECT count(*) FROM pg_auth_members WHERE member = $1", row["oid"]
    )
    assert members == 0
    await backend.delete_user(delete_req(None, name))


async def test_custom_creation_still_gets_valid_until(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """Custom statements without VALID UNTIL still leave the server-side expiry set."""
    spec = role(creation_statements=("CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}'",))
    backend = await make_backend({"r": spec})
    name = username(harness)
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=3)
    await backend.new_user(new_req(spec, name, expires=expires))
    assert await harness.server_expiry(name) == expires
    later = expires + timedelta(hours=1)
    await backend.renew_user(
        RenewUserRequest(
            role=role(renew_statements=('COMMENT ON ROLE "{{name}}" IS \'renewed\'',)),
            username=name,
            revocation={},
            expiration=later,
        )
    )
    assert await harness.server_expiry(name) == later
    await backend.delete_user(delete_req(spec, name))


async def test_hyphenated_username_is_quoted(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """A name with hyphens and underscores is created, logs in, and is dropped."""
    backend = await make_backend({"grant": grant_role(harness.schema)})
    name = f"v-{harness.mount_name}-a-b_c--d-"
    resp = await backend.new_user(new_req(grant_role(harness.schema), name))
    session = await harness.connect_as(resp.data)
    assert await session.fetchval("SELECT current_user") == name
    await harness.exercise(session)
    await backend.delete_user(delete_req(grant_role(harness.schema), name))
    assert not await harness.session_alive(session)
    await harness.close_session(session)
    assert not await harness.user_exists(name)


@pytest.mark.parametrize(
    ("name", "password"),
    [
        ('x"; ALTER ROLE postgres NOLOGIN; --', None),
        ("Upper", None),
        ("v" * 64, None),
        ("ok-name", "pw' SUPERUSER '"),
        ("ok-name", "pw\\"),
    ],
)
async def test_values_outside_the_alphabets_are_refused(
    harness: PostgresHarness, make_backend: MakeBackend, name: str, password: str | None
) -> None:
    """A username or password outside the generated alphabets never reaches SQL."""
    backend = await make_backend()
    before = await harness.admin.fetchval("SELECT count(*) FROM pg_roles")
    with pytest.raises(BackendError) as info:
        await backend.new_user(new_req(role(), name, password=password or generate_password()))
    assert not info.value.retryable
    assert await harness.admin.fetchval("SELECT count(*) FROM pg_roles") == before
    if password:
        assert password not in str(info.value)


# -- concurrency ----------------------------------------------------------------


async def test_concurrent_grants_fail_without_the_plugin(harness: PostgresHarness) -> None:
    """Control: plain concurrent GRANT ON ALL TABLES does hit "tuple concurrently updated"."""
    conns = [await asyncpg.connect(harness.dsn) for _ in range(16)]
    names = [f"v-{harness.mount_name}-raw-{i}" for i in range(len(conns))]
    errors: list[str] = []

    async def grant(conn: asyncpg.Connection, name: str) -> None:
        try:
            async with conn.transaction():
                await conn.execute(
                    f'CREATE ROLE "{name}"; '
                    f'GRANT USAGE ON SCHEMA "{harness.schema}" TO "{name}"; '
                    f'GRANT SELECT ON ALL TABLES IN SCHEMA "{harness.schema}" TO "{name}"'
                )
        except asyncpg.PostgresError as exc:
            errors.append(f"{exc.sqlstate} {exc}")

    try:
        for _ in range(5):  # the race is very likely per round; a few rounds make it certain
            await asyncio.gather(*(grant(c, n) for c, n in zip(conns, names, strict=True)))
            if errors:
                break
            for name in names:
                await harness.drop_role(name)
    finally:
        for conn in conns:
            await conn.close()
    assert any(e.startswith("XX000") and "concurrently" in e for e in errors), errors


@pytest.mark.parametrize(
    "options",
    [
        {"max_open_connections": 8},
        {"serialize_ddl": True, "max_open_connections": 8},
        {"serialize_ddl": False, "max_open_connections": 8},
    ],
    ids=["auto", "always", "retry-only"],
)
async def test_fifty_concurrent_new_user_with_grant_all_succeed(
    harness: PostgresHarness, make_backend: MakeBackend, options: dict[str, Any]
) -> None:
    """50 simultaneous new_user/delete_user with GRANT ON ALL TABLES succeed in every mode.

    "auto" takes the DDL lock for this template (and for revoking roles that
    hold grants); "retry-only" shows the retry of "tuple concurrently updated".
    """
    spec = grant_role(harness.schema)
    backend = await make_backend({"grant": spec}, **options)
    names = [username(harness) for _ in range(50)]
    results = await asyncio.gather(
        *(backend.new_user(new_req(spec, n)) for n in names), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} failed, e.g. {errors[0]!r}"
    granted = await harness.admin.fetchval(
        "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1::text[]) AND "
        "has_table_privilege(oid, $2, 'SELECT')",
        names,
        f'"{harness.schema}".items',
    )
    assert granted == 50
    deleted = await asyncio.gather(
        *(backend.delete_user(delete_req(spec, n)) for n in names), return_exceptions=True
    )
    assert not [r for r in deleted if isinstance(r, BaseException)]


LOCK_KEY_SQL = "SELECT pg_advisory_lock($1)"


async def finishes_while_ddl_lock_held(harness: PostgresHarness, call: Awaitable[Any]) -> bool:
    """Whether ``call`` completes while another session holds the broker's DDL lock.

    The lock is released afterwards either way, so a blocked call then finishes.
    """
    holder = await asyncpg.connect(harness.dsn)
    try:
        await holder.execute(LOCK_KEY_SQL, _DDL_LOCK_KEY)
        task = asyncio.ensure_future(call)
        done, _ = await asyncio.wait({task}, timeout=1.5)
        await holder.execute("SELECT pg_advisory_unlock($1)", _DDL_LOCK_KEY)
        await asyncio.wait_for(task, timeout=30)
        return bool(done)
    finally:
        await holder.close()


async def test_auto_takes_the_ddl_lock_only_for_shared_row_ddl(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """serialize_ddl = "auto": plain CREATE/ALTER/DROP ROLE run without the lock, GRANT ON waits.

    Revocation waits too for a role that holds grants (DROP OWNED rewrites the
    tables' ACLs), not for one that holds none.
    """
    grant = grant_role(harness.schema)
    backend = await make_backend({"grant": grant})
    plain, granted = username(harness), username(harness)
    assert await finishes_while_ddl_lock_held(harness, backend.new_user(new_req(role(), plain)))
    assert not await finishes_while_ddl_lock_held(
        harness, backend.new_user(new_req(grant, granted))
    )
    assert await harness.user_exists(granted)
    assert await finishes_while_ddl_lock_held(
        harness, backend.delete_user(delete_req(None, plain))
    )
    assert not await finishes_while_ddl_lock_held(
        harness, backend.delete_user(delete_req(None, granted))
    )
    assert not await harness.user_exists(plain)
    assert not await harness.user_exists(granted)


async def test_serialize_ddl_true_locks_every_transaction(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """serialize_ddl = true: even the default CREATE ROLE waits for the DDL lock."""
    backend = await make_backend(serialize_ddl=True)
    name = username(harness)
    assert not await finishes_while_ddl_lock_held(harness, backend.new_user(new_req(role(), name)))
    await backend.delete_user(delete_req(None, name))
    assert not await harness.user_exists(name)


@pytest.mark.parametrize(
    ("template", "locks"),
    [
        (DEFAULT_CREATION_STATEMENTS[0], False),
        ('GRANT "readers" TO "{{name}}"', False),
        ('COMMENT ON ROLE "{{name}}" IS \'lease\'', False),
        ('GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{{name}}"', True),
        ('grant usage on schema app to "{{name}}"', True),
        ('GRANT CONNECT\n  ON DATABASE "{{database}}" TO "{{name}}"', True),
        ('REVOKE ALL ON t FROM "{{name}}"', True),
        ('ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO "{{name}}"', True),
        ("DO $$ BEGIN EXECUTE 'SELECT 1'; END $$", True),
    ],
)
def test_auto_lock_rule(template: str, locks: bool) -> None:
    """The "auto" rule, on unrendered templates: GRANT/REVOKE ... ON, default privileges, code."""
    backend = PostgresBackend.from_config(mount(connection_url="postgresql://a@b/c"))
    assert backend._needs_lock([template]) is locks


# -- one round trip per transaction ---------------------------------------------


@pytest.mark.parametrize("lock", [False, True], ids=["no-lock", "lock"])
async def test_failing_statement_leaves_the_pooled_connection_clean(
    harness: PostgresHarness, make_backend: MakeBackend, lock: bool
) -> None:
    """A statement failing mid-batch rolls the batch back; the one pooled connection works on."""
    failing = role(
        creation_statements=(
            "CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}' -- a trailing comment",
            "COMMENT ON ROLE \"{{name}}\" IS 'first'",
            "SELECT 1/0",
            "COMMENT ON ROLE \"{{name}}\" IS 'never'",
        )
    )
    backend = await make_backend({"r": failing}, max_open_connections=1, serialize_ddl=lock)
    bad, good = username(harness), username(harness)
    with pytest.raises(BackendError) as info:
        await backend.new_user(new_req(failing, bad))
    assert "division by zero" in str(info.value)
    assert not info.value.retryable
    assert not await harness.user_exists(bad), "the batch was rolled back"
    # The advisory lock went with the rolled-back transaction.
    assert await harness.admin.fetchval("SELECT pg_try_advisory_xact_lock($1)", _DDL_LOCK_KEY)
    await backend.new_user(new_req(role(), good))  # same (only) connection
    assert await harness.user_exists(good)
    pool = backend._pool
    assert pool is not None and pool.get_size() == 1
    async with pool.acquire() as conn:
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                   "AND pid = pg_backend_pid()") == 0
    await backend.delete_user(delete_req(None, good))


async def test_session_state_from_a_custom_template_is_reset(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """A custom template's session-level SET does not leak into the pooled connection.

    The plugin skips the pool's reset query after its own statements only.
    """
    spec = role(
        creation_statements=(
            "CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}'",
            "SET search_path TO pg_catalog",
            "SET statement_timeout = 1",
        )
    )
    backend = await make_backend({"r": spec}, max_open_connections=1)
    pool = backend._pool
    assert pool is not None
    async with pool.acquire() as conn:
        expected = await conn.fetchval("SHOW search_path")
    name, other = username(harness), username(harness)
    await backend.new_user(new_req(spec, name))
    async with pool.acquire() as conn:
        assert await conn.fetchval("SHOW search_path") == expected
        assert await conn.fetchval("SHOW statement_timeout") == "0"
    await backend.new_user(new_req(role(), other))  # default template: no reset needed
    await backend.delete_user(delete_req(spec, name))
    await backend.delete_user(delete_req(None, other))
    assert not await harness.user_exists(name)
    assert not await harness.user_exists(other)


async def test_several_statements_in_one_entry_and_across_entries(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """Entries and ";"-separated statements inside one entry all run, in order, in one go."""
    spec = role(
        creation_statements=(
            "CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}'; "
            "COMMENT ON ROLE \"{{name}}\" IS 'one';",
            "COMMENT ON ROLE \"{{name}}\" IS 'two'",
        )
    )
    backend = await make_backend({"r": spec})
    name = username(harness)
    await backend.new_user(new_req(spec, name))
    comment = await harness.admin.fetchval(
        "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1", name
    )
    assert comment == "two"
    await backend.delete_user(delete_req(spec, name))


# -- revocation -----------------------------------------------------------------


async def test_revocation_kills_open_sessions_of_a_default_role(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """Two open sessions (one idle in a transaction) die; the role is gone; logins fail."""
    backend = await make_backend()
    name = username(harness)
    resp = await backend.new_user(new_req(role(), name))
    idle = await harness.connect_as(resp.data)
    in_tx = await harness.connect_as(resp.data)
    await in_tx.execute("BEGIN; SELECT 1")
    await asyncio.wait_for(backend.delete_user(delete_req(None, name)), timeout=30)
    for session in (idle, in_tx):
        assert not await harness.session_alive(session)
        await harness.close_session(session)
    assert not await harness.user_exists(name)
    with pytest.raises(asyncpg.PostgresError):
        await harness.connect_as(resp.data)
    await backend.delete_user(delete_req(None, name))  # idempotent


async def test_concurrent_revocations_of_the_same_role(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """Revoking one role from several calls at once: all succeed, the role is gone."""
    spec = grant_role(harness.schema)
    backend = await make_backend({"grant": spec}, max_open_connections=4)
    name = username(harness)
    resp = await backend.new_user(new_req(spec, name))
    session = await harness.connect_as(resp.data)
    await asyncio.gather(*(backend.delete_user(delete_req(spec, name)) for _ in range(4)))
    assert not await harness.session_alive(session)
    await harness.close_session(session)
    assert not await harness.user_exists(name)



async def test_revoking_a_role_with_many_sessions_ends_them_together(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """Forty open sessions of one role are ended at once, not one 100 ms wait after another.

    A pooled application holds tens of sessions per lease. PostgreSQL's waiting
    ``pg_terminate_backend(pid, timeout)`` sleeps 100 ms before its first look
    at each pid, so ending them one by one cost ~4 s here (and a few hundred
    sessions ran past the backend timeout).
    """
    backend = await make_backend()
    name = username(harness)
    resp = await backend.new_user(new_req(role(), name))
    sessions = await asyncio.gather(*(harness.connect_as(resp.data) for _ in range(40)))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(backend.delete_user(delete_req(None, name)), timeout=30)
    elapsed = loop.time() - started
    still = [await alive(s) for s in sessions]
    for session in sessions:
        await harness.close_session(session)
    assert not any(still)
    assert not await harness.user_exists(name)
    # One by one it is >= 40 x 100 ms = 4 s; 3 s, not 2 s, leaves a loaded machine room.
    assert elapsed < 3.0, f"revoking 40 sessions took {elapsed:.1f}s"


async def test_a_batch_of_roles_with_many_sessions_ends_them_together(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """The batch revocation (delete_users) also ends every session of every role at once."""
    backend = await make_backend()
    names = [username(harness) for _ in range(4)]
    sessions: list[asyncpg.Connection] = []
    for name in names:
        resp = await backend.new_user(new_req(role(), name))
        sessions += await asyncio.gather(*(harness.connect_as(resp.data) for _ in range(10)))
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.wait_for(
        backend.delete_users([delete_req(None, n) for n in names]), timeout=30)
    elapsed = loop.time() - started
    still = [await alive(s) for s in sessions]
    for session in sessions:
        await harness.close_session(session)
    assert results == [None] * len(names)
    assert not any(still)
    assert [await harness.user_exists(n) for n in names] == [False] * len(names)
    # One by one it is >= 40 x 100 ms = 4 s; 3 s, not 2 s, leaves a loaded machine room.
    assert elapsed < 3.0, f"revoking 4 x 10 sessions took {elapsed:.1f}s"


async def revoke_with_writes_queued(harness: PostgresHarness, backend: PostgresBackend,
                                    spec: RoleSpec, waiting: int = 5) -> list[object]:
    """Revoke a role while one session holds a lock and ``waiting`` others queue an
    UPDATE behind it; the UPDATEs' outcomes. ``spec`` must let the role create tables."""
    name = username(harness)
    resp = await backend.new_user(new_req(spec, name))
    table = f'"{harness.schema}".queued_{name.replace("-", "_")}'
    holder = await harness.connect_as(resp.data)
    sessions = [holder]
    try:
        await holder.execute(f"CREATE TABLE {table} (x int); INSERT INTO {table} VALUES (0)")
        await holder.execute(f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        sessions += [await harness.connect_as(resp.data) for _ in range(waiting)]
        writes = [asyncio.create_task(w.execute(f"UPDATE {table} SET x = x + 1"))
                  for w in sessions[1:]]
        for _ in range(500):  # until every UPDATE waits on the lock
            queued = await harness.admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1"
                " AND wait_event_type = 'Lock'", name)
            if queued >= waiting:
                break
            await asyncio.sleep(0.02)
        await asyncio.wait_for(backend.delete_user(delete_req(spec, name)), timeout=30)
        outcomes: list[object] = list(await asyncio.gather(*writes, return_exceptions=True))
        assert not await harness.user_exists(name)
        assert await harness.admin.fetchval(f"SELECT x FROM {table}") == 0, outcomes
        return outcomes
    finally:
        for session in sessions:
            session.terminate()
        await harness.admin.execute(f"DROP TABLE IF EXISTS {table}")


async def test_a_write_queued_behind_the_roles_own_lock_does_not_run(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """Sessions of the role queued on a lock another of its sessions holds die with it.

    Ended one after the other, the holder died first, its lock went to a
    waiting UPDATE, and that write committed in the middle of the revocation.
    """
    spec = role(creation_statements=(
        "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
        "VALID UNTIL '{{expiration}}'",
        f'GRANT USAGE, CREATE ON SCHEMA "{harness.schema}" TO "{{{{name}}}}"',
    ))
    backend = await make_backend({"r": spec})
    for _ in range(3):  # a race: a few rounds
        outcomes = await revoke_with_writes_queued(harness, backend, spec)
        assert all(isinstance(o, BaseException) for o in outcomes), outcomes


async def test_revocation_with_open_session_owning_a_locked_table(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """A role whose open session owns and locks a table is terminated, reassigned and dropped."""
    spec = role(
        creation_statements=(
            "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
            "VALID UNTIL '{{expiration}}'",
            f'GRANT USAGE, CREATE ON SCHEMA "{harness.schema}" TO "{{{{name}}}}"',
        )
    )
    backend = await make_backend({"r": spec})
    name = username(harness)
    resp = await backend.new_user(new_req(spec, name))
    session = await harness.connect_as(resp.data)
    table = f'"{harness.schema}".made_by_lease'
    await session.execute(f"CREATE TABLE {table} (x int); INSERT INTO {table} VALUES (42)")
    # Idle in a transaction holding ACCESS EXCLUSIVE: DROP OWNED would wait forever.
    await session.execute(f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    await asyncio.wait_for(backend.delete_user(delete_req(spec, name)), timeout=30)
    assert not await harness.session_alive(session)
    await harness.close_session(session)
    assert not await harness.user_exists(name)
    owner = await harness.admin.fetchval(
        "SELECT tableowner FROM pg_tables WHERE schemaname = $1 AND tablename = 'made_by_lease'",
        harness.schema,
    )
    assert owner == harness.admin_user  # data kept, handed to the admin
    assert await harness.admin.fetchval(f"SELECT x FROM {table}") == 42


async def test_custom_revocation_still_ends_sessions(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """Custom revocation statements run after logins are blocked and sessions ended."""
    spec = role(revocation_statements=('DROP ROLE "{{name}}"',))
    backend = await make_backend({"r": spec})
    name = username(harness)
    resp = await backend.new_user(new_req(spec, name))
    session = await harness.connect_as(resp.data)
    await backend.delete_user(delete_req(spec, name))
    assert not await harness.session_alive(session)
    await harness.close_session(session)
    assert not await harness.user_exists(name)
    # Idempotent even though the custom statement has no IF EXISTS.
    await backend.delete_user(delete_req(spec, name))


async def test_custom_revocation_that_leaves_the_role_is_a_failure(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """Custom statements that do not drop the role (here only NOLOGIN) used to end the
    lease as revoked while the role and its password lived on (QA): now the revocation
    fails for good, naming the role, so the lease goes irrevocable and is seen."""
    spec = role(revocation_statements=('ALTER ROLE "{{name}}" NOLOGIN',))
    backend = await make_backend({"r": spec})
    name = username(harness)
    await backend.new_user(new_req(spec, name))
    try:
        with pytest.raises(BackendError, match="still exists") as failed:
            await backend.delete_user(delete_req(spec, name))
        assert failed.value.retryable is False and name in str(failed.value)
        assert await harness.user_exists(name)
    finally:
        await harness.admin.execute(f'DROP ROLE IF EXISTS "{name}"')


async def test_rollback_statements_used_for_rollback(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """reason="rollback" runs the role's rollback_statements instead of revocation ones."""
    spec = role(
        revocation_statements=("SELECT 1/0",),  # would fail: proves it is not used
        rollback_statements=('DROP ROLE "{{name}}"',),
    )
    backend = await make_backend({"r": spec})
    name = username(harness)
    await backend.new_user(new_req(spec, name))
    await backend.delete_user(delete_req(spec, name, reason="rollback"))
    assert not await harness.user_exists(name)


# -- secrets --------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT '{{password}}'::integer",
        "DO $$ BEGIN RAISE EXCEPTION 'failed for %', '{{password}}'; END $$",
        "ALTER ROLE \"{{name}}\" PASSWORD '{{password}}' NOT A KEYWORD",
        "SELECT * FROM \"{{password}}\"",
    ],
    ids=["cast", "raise", "syntax", "identifier"],
)
async def test_password_redacted_from_failing_custom_statement(
    harness: PostgresHarness,
    make_backend: MakeBackend,
    caplog: pytest.LogCaptureFixture,
    statement: str,
) -> None:
    """The server echoes the password in its error; the BackendError and logs do not."""
    caplog.set_level(logging.DEBUG)
    spec = role(
        creation_statements=("CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}'", statement)
    )
    backend = await make_backend({"r": spec})
    name = username(harness)
    password = generate_password()
    with pytest.raises(BackendError) as info:
        await backend.new_user(new_req(spec, name, password=password))
    err = info.value
    assert not err.retryable
    assert "postgres new_user failed" in str(err)
    for text in (str(err), repr(err), repr(err.args)):
        assert password not in text
        assert password[:12] not in text
    assert err.__cause__ is None and err.__context__ is None
    assert all(password not in r.getMessage() for r in caplog.records)
    assert not await harness.user_exists(name), "the failed transaction was rolled back"


# -- root rotation --------------------------------------------------------------


async def test_rotate_root_changes_admin_password(harness: PostgresHarness) -> None:
    """rotate_root sets a new admin password: the old one stops working, the new one works."""
    admin = f"kitadmin_{harness.mount_name}"
    old = generate_password()
    await harness.admin.execute(f"CREATE ROLE \"{admin}\" LOGIN SUPERUSER PASSWORD '{old}'")
    try:
        mount = harness.make_mount()
        url = mount.options["connection_url"].replace(f"{harness.admin_user}@", f"{admin}@", 1)
        mount = dataclasses.replace(mount, secret=old, options={**mount.options,
                                                                "connection_url": url})
        async with started_backend(PostgresBackend, mount) as backend:
            resp = await backend.rotate_root(RotateRootRequest())
            new = resp.new_password
            assert new and new != old
            login = {"username": admin, "password": old}
            with pytest.raises(asyncpg.PostgresError):
                await harness.connect_as(login)
            await harness.close_session(await harness.connect_as({**login, "password": new}))
            await backend.close()
            await backend.initialize()  # reconnects with the rotated password
            await backend.verify()
    finally:
        await harness.admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", admin
        )
        await harness.admin.execute(f'DROP ROLE IF EXISTS "{admin}"')


# -- configuration (no server needed, kept here with the plugin's other tests) ---


def mount(**options: Any) -> MountSpec:
    return MountSpec(name="pg", plugin="postgres", roles={}, options=options)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "connection_url"),
        ({"connection_url": "mysql://a@b/c"}, "connection_url"),
        ({"connection_url": "postgresql://a:pw@b/c"}, "connection_url"),
        ({"connection_url": "postgresql://b/c"}, "connection_url"),
        ({"connection_url": "postgresql://a@b/c\"d"}, "connection_url"),
        ({"connection_url": "postgresql://a@b/c", "max_open_connections": 0},
         "max_open_connections"),
        ({"connection_url": "postgresql://a@b/c", "connect_timeout": "soon"}, "connect_timeout"),
        ({"connection_url": "postgresql://a@b/c", "password": "x"}, "password"),
        ({"connection_url": "postgresql://a@b/c", "serialize_ddl": "yes"}, "serialize_ddl"),
        ({"connection_url": "postgresql://a@b/c", "serialize_ddl": 1}, "serialize_ddl"),
        ({"connection_url": "postgresql://a@b/c", "password_hashing": "md5"}, "password_hashing"),
    ],
)
def test_from_config_rejects_bad_options(options: dict[str, Any], key: str) -> None:
    """Bad mount options name the offending key."""
    with pytest.raises(PluginConfigError) as info:
        PostgresBackend.from_config(mount(**options))
    assert info.value.key == key


def test_validate_role_rejects_bad_roles() -> None:
    """Unknown role keys, nameless creation and {{password}} outside creation are refused."""
    bad = [
        (dataclasses.replace(role(), options={"grants": "all"}), "grants"),
        (role(creation_statements=("SELECT 1",)), "creation_statements"),
        (role(revocation_statements=("SELECT '{{password}}'",)), "revocation_statements"),
    ]
    for spec, key in bad:
        with pytest.raises(PluginConfigError) as info:
            PostgresBackend.validate_role(spec)
        assert info.value.key == key
    PostgresBackend.validate_role(role())


# -- password hashing -------------------------------------------------------------


@pytest.fixture
async def md5_admin(harness: PostgresHarness) -> AsyncIterator[MountSpec]:
    """A mount whose admin sessions hash plaintext passwords as md5.

    So the stored password shows who hashed it: a plaintext sent to the server
    is stored as ``md5...``; a verifier the broker computed stays SCRAM.
    """
    admin = f"md5admin_{harness.mount_name}"
    secret = generate_password()
    await harness.admin.execute(f"CREATE ROLE \"{admin}\" LOGIN SUPERUSER PASSWORD '{secret}'")
    await harness.admin.execute(f"ALTER ROLE \"{admin}\" SET password_encryption = 'md5'")
    mount = harness.make_mount()
    url = mount.options["connection_url"].replace(f"{harness.admin_user}@", f"{admin}@", 1)
    try:
        yield dataclasses.replace(mount, secret=secret,
                                  options={**mount.options, "connection_url": url})
    finally:
        await harness.admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", admin)
        await harness.admin.execute(f'DROP ROLE IF EXISTS "{admin}"')


async def stored_password(harness: PostgresHarness, name: str) -> str:
    value = await harness.admin.fetchval(
        "SELECT rolpassword FROM pg_authid WHERE rolname = $1", name)
    assert isinstance(value, str)
    return value


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "in-new_user"])
async def test_the_server_gets_a_scram_verifier_never_the_password(
    harness: PostgresHarness, md5_admin: MountSpec, prepared: bool
) -> None:
    """By default the statement carries a SCRAM verifier of the password (computed
    ahead by prepare_password, or in new_user when that was skipped): the server stores
    it as sent, so the plaintext never reached it, and it verifies the password."""
    async with started_backend(PostgresBackend, md5_admin) as backend:
        name = username(harness)
        req = new_req(role(), name)
        if prepared:
            req = dataclasses.replace(req, prepared=await backend.prepare_password(req.password))
            assert req.prepared["password"].startswith("SCRAM-SHA-256$4096:")
        resp = await backend.new_user(req)
        stored = await stored_password(harness, name)
        assert stored.startswith("SCRAM-SHA-256$")
        assert verifies(stored, resp.data["password"])
        assert not verifies(stored, generate_password())
        if prepared:
            assert stored == req.prepared["password"]
        await backend.delete_user(delete_req(None, name))


async def test_password_hashing_server_sends_the_plaintext(
    harness: PostgresHarness, md5_admin: MountSpec
) -> None:
    """``password_hashing = "server"``: the server hashes (here as md5, its session's setting)."""
    mount = dataclasses.replace(md5_admin, options={**md5_admin.options,
                                                    "password_hashing": "server"})
    async with started_backend(PostgresBackend, mount) as backend:
        name = username(harness)
        assert await backend.prepare_password(generate_password()) == {}
        resp = await backend.new_user(new_req(role(), name))
        digest = hashlib.md5((resp.data["password"] + name).encode()).hexdigest()  # noqa: S324
        assert await stored_password(harness, name) == f"md5{digest}"
        await backend.delete_user(delete_req(None, name))


async def test_the_mount_keeps_a_few_passwords_hashed_ahead(
    harness: PostgresHarness, md5_admin: MountSpec
) -> None:
    """The mount's runtime hashes passwords ahead, in the background: the first
    take finds none ready and starts the refill; later takes get a password with
    its verifier, each one once. With password_hashing = "server" it stops asking."""
    for hashing in ("scram-sha-256", "server"):
        mount = dataclasses.replace(md5_admin, options={**md5_admin.options,
                                                        "password_hashing": hashing})
        runtime = MountRuntime(spec=mount, backend=PostgresBackend.from_config(mount))
        assert await runtime.ensure_initialized()
        try:
            assert runtime.take_password() is None  # nothing made yet: starts the refill
            await asyncio.sleep(0.5)
            if hashing == "server":
                assert not runtime.prepares_passwords and runtime.take_password() is None
                continue
            taken = [runtime.take_password() for _ in range(READY_PASSWORDS)]
            assert all(t is not None for t in taken)
            passwords = [t[0] for t in taken if t is not None]
            assert len(set(passwords)) == READY_PASSWORDS
            for password, prepared in (t for t in taken if t is not None):
                assert verifies(prepared["password"], password)
        finally:
            await runtime.close()


async def test_probing_for_missing_roles_leaves_nothing(
    harness: PostgresHarness, make_backend: MakeBackend
) -> None:
    """Revoking roles that do not exist: success, no role made, the pool's connections idle."""
    backend = await make_backend(max_open_connections=1)
    names = [username(harness) for _ in range(3)]
    assert await backend.delete_users([delete_req(None, n) for n in names]) == [None] * 3
    await backend.delete_user(delete_req(None, names[0]))
    for name in names:
        assert not await harness.user_exists(name)
    # The one pooled connection is usable: no transaction was left open on it.
    await backend.verify()
