"""The postgres ``reassign_owned_to`` mount option, and SECURITY DEFINER stripped on revocation.

A leased role that may create objects can leave a SECURITY DEFINER function
behind; handed to the admin by REASSIGN OWNED, it would run with the admin's
rights for every other credential. With ``reassign_owned_to`` the role's
objects go to a powerless NOLOGIN role instead, and whatever the target, the
revocation makes such functions SECURITY INVOKER. Run with the superuser
admin and with the least-privilege (CREATEROLE) admin of docs/plugins.md.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from broker.backend import DeleteUserRequest, MountSpec, PluginConfigError, RoleSpec
from plugins.postgres import PostgresBackend
from tests.conformance.harnesses import LeastPrivilegePostgresHarness, PostgresHarness
from tests.integration.db_fixtures import harness_up, started_backend
from tests.integration.test_postgres_backend import new_req, role, username

pytestmark = pytest.mark.integration


@pytest.fixture(params=["superuser", "least-privilege"])
async def harness(request: pytest.FixtureRequest,
                  postgres_dsn: str) -> AsyncIterator[PostgresHarness]:
    """The conformance harness, with a superuser admin or a CREATEROLE one."""
    kind = LeastPrivilegePostgresHarness if request.param == "least-privilege" else PostgresHarness
    async with harness_up(kind, postgres_dsn) as h:
        yield h


@pytest.fixture
async def orphans(harness: PostgresHarness) -> AsyncIterator[str]:
    """A NOLOGIN role without privileges, set up as docs/plugins.md says; dropped afterwards."""
    name = f"pgre-orphans-{secrets.token_hex(4)}"
    await harness.admin.execute(f'CREATE ROLE "{name}" NOLOGIN')
    try:
        if isinstance(harness, LeastPrivilegePostgresHarness):
            await harness.admin.execute(
                f'GRANT "{name}" TO "{harness.mount_admin}";'
                f'GRANT CREATE ON SCHEMA "{harness.schema}" TO "{name}"')
        yield name
    finally:
        await harness.admin.execute(f'DROP OWNED BY "{name}"; DROP ROLE "{name}"')


@pytest.fixture
async def reassigning(harness: PostgresHarness, orphans: str) -> AsyncIterator[PostgresBackend]:
    """A backend of the harness's mount with ``reassign_owned_to`` the orphan role."""
    async with started_backend(PostgresBackend,
                               harness.make_mount(reassign_owned_to=orphans)) as backend:
        yield backend


def _creator(schema: str) -> RoleSpec:
    """A role whose leases may create objects in the harness schema (a migration role)."""
    return role("creator", creation_statements=(
        "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
        "VALID UNTIL '{{expiration}}'",
        f'GRANT USAGE, CREATE ON SCHEMA "{schema}" TO "{{{{name}}}}"',
    ))


async def _leave_behind(harness: PostgresHarness, backend: PostgresBackend,
                        spec: RoleSpec) -> tuple[str, str]:
    """Issue a lease that creates a table and a SECURITY DEFINER function; (role, tag)."""
    name = username(harness)
    issued = await backend.new_user(new_req(spec, name))
    session = await harness.connect_as(issued.data)
    tag = secrets.token_hex(3)
    try:
        await session.execute(
            f'CREATE TABLE "{harness.schema}".pgre_t_{tag} (id int);'
            f'CREATE FUNCTION "{harness.schema}".pgre_f_{tag}() RETURNS text LANGUAGE sql'
            " SECURITY DEFINER AS $$ SELECT current_user::text $$")
    finally:
        await session.close()
    return name, tag


async def _call_as_other(harness: PostgresHarness, backend: PostgresBackend,
                         spec: RoleSpec, tag: str) -> tuple[str, str]:
    """Call the function left behind as another leased role; (that role, current_user seen)."""
    other = username(harness)
    issued = await backend.new_user(new_req(spec, other))
    session = await harness.connect_as(issued.data)
    try:
        seen = await session.fetchval(f'SELECT "{harness.schema}".pgre_f_{tag}()')
    finally:
        await session.close()
        await backend.delete_user(DeleteUserRequest(role=spec, username=other, revocation={}))
    return other, str(seen)


async def _owner(harness: PostgresHarness, tag: str) -> tuple[str, str, bool]:
    row = await harness.admin.fetchrow(
        "SELECT (SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = $1) AS t,"
        " pg_get_userbyid(p.proowner) AS f, p.prosecdef FROM pg_proc p WHERE proname = $2",
        f"pgre_t_{tag}", f"pgre_f_{tag}")
    assert row is not None, "the function was dropped, not kept"
    return str(row["t"]), str(row["f"]), bool(row["prosecdef"])


async def test_objects_go_to_the_orphan_role_and_run_as_the_caller(
    harness: PostgresHarness, orphans: str, reassigning: PostgresBackend,
) -> None:
    """With reassign_owned_to, a revoked role's table and function belong to that role."""
    spec = _creator(harness.schema)
    name, tag = await _leave_behind(harness, reassigning, spec)
    await reassigning.delete_user(DeleteUserRequest(role=spec, username=name, revocation={}))
    assert not await harness.user_exists(name)
    assert await _owner(harness, tag) == (orphans, orphans, False)
    other, seen = await _call_as_other(harness, reassigning, spec, tag)
    assert seen == other


async def test_a_batch_goes_to_the_orphan_role_too(
    harness: PostgresHarness, orphans: str, reassigning: PostgresBackend,
) -> None:
    """The sweeper's batch revocation (delete_users) uses reassign_owned_to as well."""
    spec = _creator(harness.schema)
    left = [await _leave_behind(harness, reassigning, spec) for _ in range(2)]
    results = await reassigning.delete_users([
        DeleteUserRequest(role=spec, username=name, revocation={}) for name, _ in left])
    assert results == [None, None]
    for name, tag in left:
        assert not await harness.user_exists(name)
        assert await _owner(harness, tag) == (orphans, orphans, False)


async def test_the_default_target_no_longer_lends_the_admin_its_rights(
    harness: PostgresHarness,
) -> None:
    """Without the option objects go to the admin, but a SECURITY DEFINER function loses it."""
    async with started_backend(PostgresBackend, harness.make_mount()) as backend:
        admin = await backend._run("test", lambda c: c.fetchval("SELECT current_user"))
        spec = _creator(harness.schema)
        name, tag = await _leave_behind(harness, backend, spec)
        await backend.delete_user(DeleteUserRequest(role=spec, username=name, revocation={}))
        assert await _owner(harness, tag) == (admin, admin, False)
        other, seen = await _call_as_other(harness, backend, spec, tag)
        assert seen == other != admin


@pytest.mark.parametrize(("value", "says"), [
    ("", "expected a role name"),
    (7, "expected a role name"),
    ("pg_signal_backend", "reserved"),
    ("public", "reserved"),
    ("x" * 64, "at most 63 bytes"),
    ("postgres", "is the admin itself"),
])
def test_a_bad_reassign_owned_to_is_a_config_error(value: object, says: str) -> None:
    """The option is checked when the config loads, and the error names the key."""
    mount = MountSpec(name="pg", plugin="postgres", roles={}, options={
        "connection_url": "postgresql://postgres@127.0.0.1:5432/postgres",
        "reassign_owned_to": value})
    with pytest.raises(PluginConfigError, match=says) as caught:
        PostgresBackend.from_config(mount)
    assert caught.value.key == "reassign_owned_to"
