"""The postgres plugin never locks out or drops its own admin role, nor a role it did not create.

A security QA found that ``delete_user`` of the mount's admin role committed
``ALTER ROLE ... NOLOGIN`` (and ended the admin's other sessions) before
``DROP ROLE`` failed ("current user cannot be dropped"): the mount was locked
out of its own server. The same revocation took any role that existed before
an issue of its name, whenever that issue was rolled back with its outcome
unknown (a staged issue that timed out, the stale-pending rollback after a
crash), e.g. under a ``username_template`` without ``{{random}}``.

These tests run against the real PostgreSQL of ``postgres_dsn`` (by default
127.0.0.1:5432) with a mount admin of their own that is no superuser
(``CREATEROLE`` and ``pg_signal_backend``, what docs/plugins.md asks for),
created and dropped here, as is every other role they make.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import requests

from broker.backend import (
    BackendError,
    DeleteUserRequest,
    MountSpec,
    NewUserRequest,
    RoleSpec,
)
from broker.lease import Lease, LeaseFilter, new_lease_id
from broker.templating import generate_password
from plugins.postgres import PostgresBackend
from tests.integration.broker_harness import BrokerThread, start_broker, write_config
from tests.integration.db_fixtures import started_backend

pytestmark = pytest.mark.integration

CREATE = ("CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
          "VALID UNTIL '{{expiration}}'")
#: Everything that makes a role what it is, read as the superuser: a role "left
#: exactly as it was" has the same row (same oid: not dropped and made again).
SNAPSHOT = """
SELECT a.oid, a.rolname, a.rolcanlogin, a.rolsuper, a.rolinherit, a.rolcreaterole,
       a.rolcreatedb, a.rolreplication, a.rolbypassrls, a.rolconnlimit, a.rolpassword,
       a.rolvaliduntil, shobj_description(a.oid, 'pg_authid') AS comment,
       ARRAY(SELECT m.roleid::regrole::text || ' > ' || m.member::regrole::text
               FROM pg_auth_members m WHERE a.oid IN (m.member, m.roleid) ORDER BY 1)
         AS memberships
  FROM pg_authid a WHERE a.rolname = $1
"""


def role(name: str = "r", **keys: Any) -> RoleSpec:
    return RoleSpec(name=name, default_ttl=3600, max_ttl=3600, **keys)


@dataclass
class Server:
    """The test server: a superuser connection, a mount admin of our own, the roles we made."""

    dsn: str
    su: asyncpg.Connection
    tag: str
    admin: str
    admin_password: str
    made: list[str] = field(default_factory=list)
    stack: AsyncExitStack = field(default_factory=AsyncExitStack)

    def name(self, what: str = "lease") -> str:
        """A fresh role name of this test's own (dropped at the end if still there)."""
        name = f"pgguard-{self.tag}-{what}-{secrets.token_hex(3)}"
        self.made.append(name)
        return name

    @property
    def admin_url(self) -> str:
        """The mount's connection_url: the test server, logged in as our admin."""
        parts = urlsplit(self.dsn)
        database = parts.path.lstrip("/") or "postgres"
        return (f"postgresql://{self.admin}@{parts.hostname or '127.0.0.1'}:"
                f"{parts.port or 5432}/{database}")

    def mount(self, roles: dict[str, RoleSpec] | None = None) -> MountSpec:
        return MountSpec(name=f"pgg{self.tag}", plugin="postgres",
                         roles=roles or {"r": role()}, secret=self.admin_password,
                         options={"connection_url": self.admin_url})

    async def backend(self, roles: dict[str, RoleSpec] | None = None) -> PostgresBackend:
        """An initialized backend on our admin, closed before the roles are dropped."""
        return await self.stack.enter_async_context(
            started_backend(PostgresBackend, self.mount(roles)))

    async def make_role(self, name: str, *attributes: str) -> str:
        """A role made by hand, not by the broker, with ``attributes`` (e.g. LOGIN)."""
        password = generate_password()
        await self.su.execute(
            f'CREATE ROLE "{name}" {" ".join(attributes)} PASSWORD \'{password}\'')
        return password

    async def snapshot(self, name: str) -> dict[str, Any] | None:
        row = await self.su.fetchrow(SNAPSHOT, name)
        return dict(row) if row is not None else None

    async def connect(self, user: str, password: str) -> asyncpg.Connection:
        parts = urlsplit(self.admin_url)
        return await asyncpg.connect(host=parts.hostname, port=parts.port, user=user,
                                     password=password, database=parts.path.lstrip("/"),
                                     timeout=10)


async def alive(session: asyncpg.Connection) -> bool:
    """Whether a session still answers (a terminated one raises)."""
    try:
        return bool(await session.fetchval("SELECT 1", timeout=10))
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        return False


async def _drop_roles(su: asyncpg.Connection, names: list[str]) -> None:
    """Drop ``names`` (those that exist), their sessions ended first."""
    for name in names:
        if not await su.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name):
            continue
        await su.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE usename = $1", name)
        quoted = '"' + name.replace('"', '""') + '"'
        # Anything it came to own or hold here (an old revocation reassigned to the admin).
        await su.execute(f"REASSIGN OWNED BY {quoted} TO CURRENT_USER; DROP OWNED BY {quoted}")
        for _ in range(50):  # terminated sessions take a moment to go
            try:
                await su.execute(f"DROP ROLE IF EXISTS {quoted}")
                break
            except asyncpg.PostgresError:
                await asyncio.sleep(0.1)


@pytest.fixture
async def server(postgres_dsn: str) -> AsyncIterator[Server]:
    """The test server with a mount admin of our own (CREATEROLE, pg_signal_backend).

    Every role made here (the admin, roles made by hand, issued roles) is
    dropped at the end, also when the test failed half-way.
    """
    su = await asyncpg.connect(postgres_dsn)
    tag = secrets.token_hex(3)
    env = Server(dsn=postgres_dsn, su=su, tag=tag, admin=f"pgguard_admin_{tag}",
                 admin_password=generate_password())
    try:
        await su.execute(f"CREATE ROLE \"{env.admin}\" LOGIN CREATEROLE "
                         f"PASSWORD '{env.admin_password}'; "
                         f'GRANT pg_signal_backend TO "{env.admin}"')
        assert not await su.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = $1",
                                     env.admin)
        async with env.stack:
            yield env
    finally:
        try:
            rest = [r["rolname"] for r in await su.fetch(
                "SELECT rolname FROM pg_roles WHERE starts_with(rolname, $1)",
                f"pgguard-{tag}-")]
            await _drop_roles(su, [*dict.fromkeys([*env.made, *rest]), env.admin])
        finally:
            await su.close()


def new_req(spec: RoleSpec, name: str, lease_id: str) -> NewUserRequest:
    return NewUserRequest(role=spec, username=name, password=generate_password(),
                          expiration=datetime.now(UTC) + timedelta(minutes=10),
                          lease_id=lease_id)


def delete_req(spec: RoleSpec | None, name: str, lease_id: str, reason: str = "revoke"
               ) -> DeleteUserRequest:
    return DeleteUserRequest(role=spec, username=name, revocation={"username": name},
                             reason=reason, lease_id=lease_id)


# -- (a) the admin's own role -----------------------------------------------------------------


@pytest.mark.parametrize("reason", ["rollback", "revoke", "force"])
async def test_delete_user_refuses_the_admins_own_role(server: Server, reason: str) -> None:
    """Refused before any statement: the admin keeps LOGIN, its sessions, and can log in."""
    backend = await server.backend()
    before = await server.snapshot(server.admin)
    assert before is not None and before["rolcanlogin"]
    other = await server.connect(server.admin, server.admin_password)  # another admin session
    try:
        with pytest.raises(BackendError) as info:
            await backend.delete_user(delete_req(None, server.admin, "pg/creds/r/a", reason))
        after = await server.snapshot(server.admin)
        assert after is not None and after["rolcanlogin"], "the admin was locked out"
        assert after == before, "the admin role was changed"
        assert await alive(other), "an admin session was ended"
        assert not info.value.retryable
        assert repr(server.admin) in str(info.value)
        assert "admin role" in str(info.value)
    finally:
        await other.close()
    fresh = await server.connect(server.admin, server.admin_password)
    await fresh.close()
    # The mount still works: issue and revoke a role.
    name = server.name()
    await backend.new_user(new_req(role(), name, "pg/creds/r/b"))
    await backend.delete_user(delete_req(None, name, "pg/creds/r/b"))
    assert await server.snapshot(name) is None


async def test_a_batch_refuses_the_admins_own_role_and_revokes_the_others(
        server: Server) -> None:
    """delete_users: an error for the admin's name, the others revoked, the admin untouched."""
    backend = await server.backend()
    names = [server.name(), server.name()]
    for i, name in enumerate(names):
        await backend.new_user(new_req(role(), name, f"pg/creds/r/{i}"))
    before = await server.snapshot(server.admin)
    results = await backend.delete_users([
        delete_req(None, names[0], "pg/creds/r/0", "expire"),
        delete_req(None, server.admin, "pg/creds/r/admin", "expire"),
        delete_req(None, names[1], "pg/creds/r/1", "expire"),
    ])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], BackendError) and not results[1].retryable
    assert await server.snapshot(server.admin) == before
    assert [await server.snapshot(name) for name in names] == [None, None]


async def test_an_issue_refuses_the_admins_own_name(server: Server) -> None:
    """new_user of the admin's name makes nothing (and says so: no rollback follows)."""
    backend = await server.backend()
    before = await server.snapshot(server.admin)
    for spec in (role(), role("custom", creation_statements=(CREATE,))):
        with pytest.raises(BackendError) as info:
            await backend.new_user(new_req(spec, server.admin, "pg/creds/r/c"))
        assert info.value.created_nothing
        assert not info.value.retryable
    assert await server.snapshot(server.admin) == before


# -- (b) a role that existed before the issue -------------------------------------------------


async def test_a_failed_issue_and_its_rollback_leave_a_preexisting_role_alone(
        server: Server) -> None:
    """An issue of a taken name fails; the rollback the engine may run after it (the issue's
    outcome unknown: a timeout, a crash, a template that commits on its own) changes nothing."""
    non_atomic = role("custom", creation_statements=(
        CREATE, "DO $$ BEGIN PERFORM 1; END $$"))  # a DO block: not known to be all-or-nothing
    backend = await server.backend({"r": role(), "custom": non_atomic})
    pre = server.name("pre")
    password = await server.make_role(pre, "LOGIN")
    before = await server.snapshot(pre)
    session = await server.connect(pre, password)
    try:
        for spec in (role(), non_atomic):
            lease_id = new_lease_id(f"pgg{server.tag}", spec.name)
            with pytest.raises(BackendError):
                await backend.new_user(new_req(spec, pre, lease_id))
            with pytest.raises(BackendError):
                await backend.stage_user(new_req(spec, pre, lease_id))
            assert await server.snapshot(pre) == before
            # What the engine's rollback of such an issue calls (alone, or in a batch).
            await backend.delete_user(delete_req(spec, pre, lease_id, "rollback"))
            assert await server.snapshot(pre) == before, "the rollback changed the role"
            await backend.delete_users([delete_req(spec, pre, lease_id, "rollback"),
                                        delete_req(None, server.name(), "x/creds/r/y")])
            assert await server.snapshot(pre) == before, "the batch rollback changed the role"
            assert await alive(session), "a session of the pre-existing role was ended"
    finally:
        await session.close()
    again = await server.connect(pre, password)
    await again.close()


async def test_a_rollback_leaves_another_leases_role_alone(server: Server) -> None:
    """A fixed name: lease A's live role is left alone by lease B's rollback, then revoked by A."""
    backend = await server.backend()
    name = server.name("fixed")
    first, second = "pg/creds/r/first", "pg/creds/r/second"
    issued = await backend.new_user(new_req(role(), name, first))
    session = await server.connect(name, issued.data["password"])
    try:
        before = await server.snapshot(name)
        with pytest.raises(BackendError) as info:
            await backend.new_user(new_req(role(), name, second))  # taken
        assert info.value.created_nothing
        await backend.delete_user(delete_req(None, name, second, "rollback"))
        assert await server.snapshot(name) == before
        assert await alive(session)
        await backend.delete_user(delete_req(None, name, first, "revoke"))
        assert await server.snapshot(name) is None
        assert not await alive(session)
    finally:
        await session.close()


def _broker_config(server: Server, pre: str) -> str:
    """A mount on our admin whose roles all name the pre-existing role ``pre``.

    No password: the test server trusts the admin's login.
    """
    quoted = CREATE.replace('"', '\\"')
    return f"""
[leases]
backend_timeout = "1s"

[mounts.pg]
plugin = "postgres"
connection_url = "{server.admin_url}"
max_open_connections = 2

[mounts.pg.roles.fixed]
username_template = "{pre}"
default_ttl = "1h"
max_ttl = "1h"

[mounts.pg.roles.slow]
username_template = "{pre}"
default_ttl = "1h"
max_ttl = "1h"
# Cut off by backend_timeout before its CREATE ROLE: the outcome is unknown to the
# engine, which rolls the issue back by name.
creation_statements = ["SELECT pg_sleep(3)", "{quoted}"]
"""


def _issue(broker: BrokerThread, role_name: str) -> requests.Response:
    return requests.post(f"{broker.url}/v1/pg/creds/{role_name}", timeout=60,
                         headers={"X-Vault-Token": broker.root_token})


def _lease_ids(broker: BrokerThread, role_name: str) -> list[str]:
    assert broker.state is not None
    return broker.call(broker.state.store.list_ids(LeaseFilter(prefix=f"pg/creds/{role_name}/")))


async def test_the_brokers_rollbacks_leave_a_preexisting_role_alone(
        server: Server, tmp_path: Path) -> None:
    """Through the engine, with a username_template naming a role made by hand (LOGIN, with a
    session open): a refused issue, a staged issue cut off by backend_timeout, and the
    stale-pending rollback after a crash all leave that role exactly as it was."""
    pre = server.name("pre")
    password = await server.make_role(pre, "LOGIN")
    before = await server.snapshot(pre)
    session = await server.connect(pre, password)
    broker = start_broker(write_config(tmp_path, _broker_config(server, pre)))
    try:
        refused = await asyncio.to_thread(_issue, broker, "fixed")
        assert refused.status_code == 400, refused.text
        assert "already exists" in refused.json()["errors"][0]
        assert await server.snapshot(pre) == before, "the refused issue changed the role"

        cut_off = await asyncio.to_thread(_issue, broker, "slow")
        assert cut_off.status_code == 503, cut_off.text
        assert "timed out" in cut_off.json()["errors"][0]
        assert await server.snapshot(pre) == before, "the cut-off issue's rollback changed it"

        # A crash left a pending row of an issue of that name: start-up (or the
        # stale-pending job) rolls it back.
        assert broker.state is not None
        engine, store = broker.state.engine, broker.state.store
        now = time.time()
        lease = Lease(id=new_lease_id("pg", "fixed"), mount="pg", role="fixed",
                      owner="test-root", issue_time=now - 60, expire_time=now + 3600,
                      max_expire_time=now + 3600, revocation={"username": pre})
        broker.call(store.insert_pending(lease))
        broker.call(engine.rollback_stale_pending(older_than=0))
        assert await server.snapshot(pre) == before, "the stale-pending rollback changed it"

        # Every rollback is done (none left a pending row to retry) ...
        assert await asyncio.to_thread(_lease_ids, broker, "fixed") == []
        assert await asyncio.to_thread(_lease_ids, broker, "slow") == []
        # ... and the role is as it was, its session alive, its login working.
        assert await server.snapshot(pre) == before, "the pre-existing role was changed"
        assert await alive(session), "a session of the pre-existing role was ended"
        again = await server.connect(pre, password)
        await again.close()
    finally:
        await asyncio.to_thread(broker.stop)
        await session.close()


# -- (c) what must still work -----------------------------------------------------------------


@pytest.mark.parametrize("custom", [False, True], ids=["default", "custom"])
async def test_issue_and_revoke_still_work(server: Server, custom: bool) -> None:
    """An issued role logs in; its revocation ends its session and drops it."""
    spec = role("custom", creation_statements=(CREATE,)) if custom else role()
    backend = await server.backend({spec.name: spec})
    name = server.name()
    issued = await backend.new_user(new_req(spec, name, "pg/creds/r/ok"))
    session = await server.connect(name, issued.data["password"])
    assert await alive(session)
    await backend.delete_user(delete_req(spec, name, "pg/creds/r/ok", "revoke"))
    assert await server.snapshot(name) is None
    assert not await alive(session)
    await session.close()


async def test_a_rollback_still_drops_its_own_issues_role(server: Server) -> None:
    """The role an issue made (plain or staged, default or custom statements) is rolled back."""
    custom = role("custom", creation_statements=(CREATE,))
    backend = await server.backend({"r": role(), "custom": custom})
    for spec in (role(), custom):
        lease_id = new_lease_id(f"pgg{server.tag}", spec.name)
        name = server.name()
        await backend.new_user(new_req(spec, name, lease_id))
        assert await server.snapshot(name) is not None
        await backend.delete_user(delete_req(spec, name, lease_id, "rollback"))
        assert await server.snapshot(name) is None

        lease_id = new_lease_id(f"pgg{server.tag}", spec.name)
        name = server.name()
        staged = await backend.stage_user(new_req(spec, name, lease_id))
        await staged.commit()
        assert await server.snapshot(name) is not None
        results = await backend.delete_users([delete_req(spec, name, lease_id, "rollback")])
        assert results == [None]
        assert await server.snapshot(name) is None
