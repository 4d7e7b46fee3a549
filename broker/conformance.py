"""The backend conformance kit: one suite that every broker plugin passes on a real server.

Like Vault's ``dbtesting``: a plugin author writes a *harness* (how to reach a
real server, how to log in with issued credentials, how to look at the server
from outside) and subclasses ``ConformanceSuite``. The suite then proves,
against that server, what the engine relies on:

- ``new_user`` returns credentials that log in and can do what the role grants;
- ``renew_user`` really moves the server-side expiry (when ``can_renew``);
- ``delete_user`` stops the credentials, ends live sessions, and is idempotent
  (twice, for a user that never existed, for a rollback, with the role gone);
- 20+ concurrent ``new_user`` calls on one role all succeed;
- a backend that stages users (``stage_user``, see ``broker.backend.StagingBackend``):
  a staged user is invisible until ``commit``, ``abort`` leaves nothing, and
  neither holds on to a connection; a revocation that meets a staged user
  waits for its outcome (the engine activates a lease beside its commit);
- no BackendError (or its cause/context) and no log record carries a password;
- the declared ``Capabilities`` match behaviour (``server_side_expiry``: a
  credential whose expiry is past cannot log in; ``max_username_length``: a
  name that long works).

It ships in the wheel, so a plugin outside this repository can run it:
``pip install 'broker[kit]'`` (pytest and pytest-asyncio), and in the
plugin's pytest config ``asyncio_mode = "auto"`` (the suite's tests are
coroutines). Usage (see ``tests/conformance/README.md`` in broker's source)::

    from broker.conformance import ConformanceSuite, HarnessFactory

    class TestMyPlugin(ConformanceSuite):
        @pytest.fixture
        def harness_factory(self) -> HarnessFactory:
            return lambda fixture: MyHarness(fixture("my_server_dsn"))
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.backend import (
    Backend,
    BackendError,
    BackendFactory,
    Capabilities,
    DeleteUserRequest,
    MountSpec,
    NewUserRequest,
    RenewUserRequest,
    RoleSpec,
    StagedUser,
    StagingBackend,
    load_plugin,
    stages_users,
)
from broker.templating import generate_password, render_username

__all__ = [
    "BROKEN_ROLE",
    "CONCURRENCY",
    "ROLE",
    "BackendHarness",
    "ConformanceSuite",
    "FixtureLookup",
    "HarnessFactory",
    "Kit",
    "resolve_harness",
]

#: The role of ``make_mount()`` the suite issues from. Its statements must grant
#: what ``BackendHarness.exercise`` uses (e.g. SELECT on every table of a schema),
#: so the concurrency test hits the grant path, not only user creation.
ROLE = "conformance"
#: A role whose creation statements use ``{{password}}`` and then fail in a way
#: that makes the server echo the value (e.g. ``SELECT '{{password}}'::integer``):
#: the suite checks the resulting BackendError does not carry it.
BROKEN_ROLE = "broken"
#: How many new_user calls the concurrency test runs at once.
CONCURRENCY = 24

#: ``request.getfixturevalue``: lets a harness ask for the server fixture it needs.
FixtureLookup = Callable[[str], Any]
#: Builds a harness; called once per test with the fixture lookup.
HarnessFactory = Callable[[FixtureLookup], "BackendHarness"]


class BackendHarness(ABC):
    """How the suite builds a backend for a real server and checks credentials from outside.

    A harness owns the server-side fixtures the roles need (a schema, a table)
    and removes them, and anything left behind, in ``teardown``. ``session``
    objects are whatever the harness's driver returns; the suite only passes
    them back.
    """

    async def setup(self) -> None:  # noqa: B027 - optional hook
        """Prepare the server (schema, tables the roles grant on). Called before each test."""

    async def teardown(self) -> None:  # noqa: B027 - optional hook
        """Remove what setup created and any user the suite left behind.

        Called after a setup that failed halfway too: remove what exists.
        """

    @abstractmethod
    def make_mount(self, *, reachable: bool = True) -> MountSpec:
        """The mount to test, with roles ``ROLE`` and ``BROKEN_ROLE``.

        ``reachable=False``: the same mount pointed at an address where no
        server listens, to check connection errors are retryable and redacted.
        """

    @abstractmethod
    async def connect_as(self, data: Mapping[str, Any]) -> Any:
        """Open a session with issued credentials (``NewUserResponse.data``) or raise."""

    async def exercise(self, session: Any) -> None:  # noqa: B027 - optional hook
        """Use what ``ROLE`` grants (e.g. read a table); raise if it is not allowed."""

    @abstractmethod
    async def session_alive(self, session: Any) -> bool:
        """Whether ``session`` can still run a statement."""

    @abstractmethod
    async def close_session(self, session: Any) -> None:
        """Close ``session``; must not raise if the server already ended it."""

    @abstractmethod
    async def user_exists(self, username: str) -> bool:
        """Whether the server still knows ``username`` (asked as admin)."""

    async def server_expiry(self, username: str) -> datetime | None:
        """The expiry the server enforces for ``username``; required when ``can_renew``."""
        raise NotImplementedError

    def wrong_credentials(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """``data`` with a wrong secret, to prove ``connect_as`` really checks it."""
        if "password" not in data:
            raise NotImplementedError("override wrong_credentials for non-password data")
        return {**data, "password": generate_password(len(str(data["password"])) or 32)}

    def secret_values(self) -> list[str]:
        """Values that must never appear in an error or log (default: the admin secret)."""
        secret = self.make_mount().secret
        return [secret] if secret else []


def resolve_harness(spec: HarnessFactory | str) -> HarnessFactory:
    """A factory, or ``"package.module:attribute"`` naming one (imported only when used)."""
    if callable(spec):
        return spec
    module, _, attr = spec.partition(":")
    factory: HarnessFactory = getattr(importlib.import_module(module), attr)
    return factory


@dataclass
class Kit:
    """One test's backend, built through the plugin registry, with cleanup of what it issued."""

    harness: BackendHarness
    mount: MountSpec
    factory: BackendFactory
    backend: Backend
    issued: list[str] = field(default_factory=list)

    @property
    def capabilities(self) -> Capabilities:
        return self.backend.capabilities

    def role(self, name: str = ROLE) -> RoleSpec:
        return self.mount.roles[name]

    def username(self) -> str:
        """A fresh username the way the engine makes one (default template, length cap)."""
        name = render_username(
            None,
            mount=self.mount.name,
            role="kit",
            max_length=self.capabilities.max_username_length,
        )
        self.issued.append(name)
        return name

    async def new_user(
        self,
        *,
        role: str = ROLE,
        expires_in: timedelta = timedelta(minutes=10),
        username: str | None = None,
        password: str | None = None,
    ) -> tuple[str, str, Mapping[str, Any]]:
        """Issue a credential; returns (username, password, data)."""
        username = username or self.username()
        password = password or generate_password()
        resp = await self.backend.new_user(
            NewUserRequest(
                role=self.role(role),
                username=username,
                password=password,
                expiration=datetime.now(UTC) + expires_in,
                lease_id=f"{self.mount.name}/creds/{role}/kit",
            )
        )
        return username, password, resp.data

    async def stage_user(
        self, *, role: str = ROLE, password: str | None = None
    ) -> tuple[str, str, StagedUser]:
        """Stage a credential (skips without ``stage_user``): (username, password, stage)."""
        if not stages_users(self.backend):
            pytest.skip("backend does not stage users")
        username = self.username()
        password = password or generate_password()
        staging: StagingBackend = self.backend  # type: ignore[assignment]
        staged = await staging.stage_user(
            NewUserRequest(
                role=self.role(role),
                username=username,
                password=password,
                expiration=datetime.now(UTC) + timedelta(minutes=10),
                lease_id=f"{self.mount.name}/creds/{role}/kit",
            )
        )
        return username, password, staged

    async def delete_user(
        self, username: str, *, reason: str = "revoke", role: RoleSpec | str | None = ROLE
    ) -> None:
        spec = self.role(role) if isinstance(role, str) else role
        await self.backend.delete_user(
            DeleteUserRequest(role=spec, username=username, revocation={}, reason=reason)
        )

    async def cleanup(self) -> None:
        for name in self.issued:
            try:
                await self.delete_user(name, reason="force")
            except BackendError:
                pass  # the harness teardown removes leftovers out of band


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo += [cur.__cause__, cur.__context__]


def assert_no_secret(exc: BaseException, secret_values: list[str]) -> None:
    """No exception in ``exc``'s chain mentions a secret (str, repr or args)."""
    for link in _exception_chain(exc):
        text = f"{link}\n{link!r}\n{link.args!r}"
        for value in secret_values:
            assert value not in text, f"{type(link).__name__} carries a secret: {text[:200]}"


class ConformanceSuite:
    """The suite. Subclass it (name starting with ``Test``) and provide ``harness_factory``."""

    @pytest.fixture
    def harness_factory(self) -> HarnessFactory:
        raise NotImplementedError("provide a harness_factory fixture")

    @pytest.fixture
    async def harness(
        self, harness_factory: HarnessFactory, request: pytest.FixtureRequest
    ) -> AsyncIterator[BackendHarness]:
        harness = harness_factory(request.getfixturevalue)
        try:
            await harness.setup()  # a failure halfway must not leave its database behind
            yield harness
        finally:
            await harness.teardown()

    @pytest.fixture
    async def kit(self, harness: BackendHarness) -> AsyncIterator[Kit]:
        mount = harness.make_mount()
        factory = load_plugin(mount.plugin)
        backend = factory.from_config(mount)
        await backend.initialize()
        kit = Kit(harness, mount, factory, backend)
        try:
            yield kit
        finally:
            await kit.cleanup()
            await backend.close()

    # -- registration and configuration -------------------------------------

    async def test_plugin_registered_and_roles_valid(self, harness: BackendHarness) -> None:
        """The plugin loads by name, accepts the harness roles and builds a Backend."""
        mount = harness.make_mount()
        factory = load_plugin(mount.plugin)
        for role in mount.roles.values():
            factory.validate_role(role)
        backend = factory.from_config(mount)
        assert isinstance(backend, Backend)
        assert isinstance(backend.capabilities, Capabilities)
        assert {ROLE, BROKEN_ROLE} <= set(mount.roles)

    async def test_unreachable_server_is_retryable_and_redacted(
        self, harness: BackendHarness
    ) -> None:
        """from_config does no I/O; a dead server gives a retryable error without secrets."""
        mount = harness.make_mount(reachable=False)
        backend = load_plugin(mount.plugin).from_config(mount)  # must not connect
        try:
            with pytest.raises(BackendError) as info:
                await backend.initialize()
                await backend.verify()
            assert info.value.retryable
            assert_no_secret(info.value, harness.secret_values())
        finally:
            await backend.close()

    async def test_verify_passes(self, kit: Kit) -> None:
        """verify() succeeds against the live server."""
        await kit.backend.verify()

    # -- issuing ------------------------------------------------------------

    async def test_harness_rejects_wrong_password(self, kit: Kit) -> None:
        """The server refuses a wrong secret, so every login check in this suite means something."""
        _, _, data = await kit.new_user()
        with pytest.raises(Exception):  # noqa: B017 - any driver error is a refusal
            session = await kit.harness.connect_as(kit.harness.wrong_credentials(data))
            await kit.harness.close_session(session)

    async def test_new_user_credentials_work(self, kit: Kit) -> None:
        """Issued credentials log in and can use what the role grants."""
        username, password, data = await kit.new_user()
        assert set(kit.capabilities.env_names) <= set(data)
        if "username" in data:
            assert data["username"] == username
        if "password" in data:
            assert data["password"] == password
        assert await kit.harness.user_exists(username)
        session = await kit.harness.connect_as(data)
        try:
            await kit.harness.exercise(session)
        finally:
            await kit.harness.close_session(session)

    async def test_max_username_length_works(self, kit: Kit) -> None:
        """A username exactly max_username_length long is accepted and logs in."""
        length = kit.capabilities.max_username_length
        name = ("v" + kit.username().replace("-", "_") * 4)[:length]
        kit.issued.append(name)
        _, _, data = await kit.new_user(username=name)
        session = await kit.harness.connect_as(data)
        await kit.harness.close_session(session)
        assert len(name) == length

    async def test_concurrent_new_user_all_succeed(self, kit: Kit) -> None:
        """CONCURRENCY simultaneous new_user calls on one role all succeed and log in."""
        results = await asyncio.gather(
            *(kit.new_user() for _ in range(CONCURRENCY)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"{len(errors)} of {CONCURRENCY} failed, e.g. {errors[0]!r}"
        sessions = [await kit.harness.connect_as(data) for _, _, data in results]  # type: ignore[misc]
        try:
            for session in sessions:
                await kit.harness.exercise(session)
        finally:
            for session in sessions:
                await kit.harness.close_session(session)
        # And revoking them all at once works too.
        names = [name for name, _, _ in results]  # type: ignore[misc]
        await asyncio.gather(*(kit.delete_user(n) for n in names))
        for name in names:
            assert not await kit.harness.user_exists(name)

    # -- staging (backends with stage_user) ---------------------------------

    async def test_staged_user_is_invisible_until_commit(self, kit: Kit) -> None:
        """Nobody sees or uses a staged user before commit; after it, it logs in."""
        username, password, staged = await kit.stage_user()
        try:
            assert not await kit.harness.user_exists(username), "visible before commit"
            with pytest.raises(Exception):  # noqa: B017 - any driver error is a refusal
                await kit.harness.close_session(await kit.harness.connect_as(staged.response.data))
        except BaseException:
            await staged.abort()
            raise
        await staged.commit()
        assert await kit.harness.user_exists(username)
        assert staged.response.data.get("password", password) == password
        session = await kit.harness.connect_as(staged.response.data)
        try:
            await kit.harness.exercise(session)
        finally:
            await kit.harness.close_session(session)

    async def test_aborted_stages_leave_nothing_and_hold_no_connection(self, kit: Kit) -> None:
        """abort leaves no user; many stages, aborted or committed, in a row never run dry."""
        names = []
        async with asyncio.timeout(60):  # a leaked connection would make this hang
            for i in range(3 * CONCURRENCY):
                username, _, staged = await kit.stage_user()
                if i % 3 == 2:
                    await staged.commit()
                else:
                    await staged.abort()
                names.append((username, i % 3 == 2))
        for username, committed in names:
            assert await kit.harness.user_exists(username) == committed, username

    async def test_revoking_a_staged_user_waits_for_its_outcome(self, kit: Kit) -> None:
        """A revocation that meets a staged user waits for its commit or abort.

        The engine makes a lease active beside the stage's commit, so a
        revocation (a revoke-prefix, say) can reach the user before that
        commit lands. Calling it gone then would leave the committed user
        untracked. Committed, the revocation removes it; aborted, there is
        nothing to remove.
        """
        for outcome in ("commit", "abort"):
            username, _, staged = await kit.stage_user()
            revoking = asyncio.ensure_future(kit.delete_user(username))
            await asyncio.sleep(0.5)
            waited = not revoking.done()
            await (staged.commit() if outcome == "commit" else staged.abort())
            await asyncio.wait_for(revoking, 30)
            assert waited, f"the revocation did not wait for the staged user ({outcome})"
            assert not await kit.harness.user_exists(username), f"left after {outcome}"

    async def test_failed_stage_carries_no_secret(self, kit: Kit) -> None:
        """A failing staged statement raises a BackendError free of secrets, and holds nothing."""
        password = generate_password()
        with pytest.raises(BackendError) as info:
            await kit.stage_user(role=BROKEN_ROLE, password=password)
        assert_no_secret(info.value, [password, *kit.harness.secret_values()])
        # The connection it used went back to the pool in a usable state.
        username, _, _ = await kit.new_user()
        assert await kit.harness.user_exists(username)

    # -- renewing -----------------------------------------------------------

    async def test_renew_pushes_server_expiry(self, kit: Kit) -> None:
        """renew_user moves the expiry the server enforces (backends declaring can_renew)."""
        if not kit.capabilities.can_renew:
            pytest.skip("backend declares can_renew=False")
        username, _, data = await kit.new_user(expires_in=timedelta(minutes=5))
        try:
            before = await kit.harness.server_expiry(username)
        except NotImplementedError:
            pytest.fail("the harness must implement server_expiry to prove can_renew")
        target = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
        await kit.backend.renew_user(
            RenewUserRequest(role=kit.role(), username=username, revocation={}, expiration=target)
        )
        after = await kit.harness.server_expiry(username)
        assert before is not None and after is not None
        assert after > before
        assert abs((after - target).total_seconds()) <= 1
        session = await kit.harness.connect_as(data)  # still valid after renew
        await kit.harness.close_session(session)

    # -- revoking -----------------------------------------------------------

    async def test_delete_user_revokes_and_ends_sessions(self, kit: Kit) -> None:
        """After delete_user the credentials fail and an open session is ended."""
        if not kit.capabilities.can_revoke:
            pytest.skip("backend declares can_revoke=False")
        username, _, data = await kit.new_user()
        session = await kit.harness.connect_as(data)
        try:
            assert await kit.harness.session_alive(session)
            await kit.delete_user(username)
            assert not await kit.harness.session_alive(session), "a live session survived"
        finally:
            await kit.harness.close_session(session)
        assert not await kit.harness.user_exists(username)
        with pytest.raises(Exception):  # noqa: B017 - any driver error is a refusal
            await kit.harness.close_session(await kit.harness.connect_as(data))

    async def test_delete_user_is_idempotent(self, kit: Kit) -> None:
        """Deleting twice, or a user that never existed, is success."""
        username, _, _ = await kit.new_user()
        await kit.delete_user(username)
        await kit.delete_user(username)
        await kit.delete_user(kit.username())
        assert not await kit.harness.user_exists(username)

    async def test_rollback_of_pending_lease(self, kit: Kit) -> None:
        """reason="rollback" removes a user whose creation completed, and accepts one never made."""
        username, _, data = await kit.new_user()
        await kit.delete_user(username, reason="rollback")
        assert not await kit.harness.user_exists(username)
        with pytest.raises(Exception):  # noqa: B017 - any driver error is a refusal
            await kit.harness.close_session(await kit.harness.connect_as(data))
        await kit.delete_user(kit.username(), reason="rollback")

    async def test_delete_user_after_role_removed(self, kit: Kit) -> None:
        """delete_user with role=None (role gone from the config) revokes with the defaults."""
        username, _, _ = await kit.new_user()
        await kit.delete_user(username, role=None)
        assert not await kit.harness.user_exists(username)

    # -- capabilities -------------------------------------------------------

    async def test_server_side_expiry(self, kit: Kit) -> None:
        """With server_side_expiry, a credential whose expiry has passed cannot log in."""
        if not kit.capabilities.server_side_expiry:
            pytest.skip("backend declares server_side_expiry=False")
        _, _, live = await kit.new_user(expires_in=timedelta(minutes=5))
        await kit.harness.close_session(await kit.harness.connect_as(live))
        _, _, dead = await kit.new_user(expires_in=timedelta(seconds=-60))
        with pytest.raises(Exception):  # noqa: B017 - any driver error is a refusal
            await kit.harness.close_session(await kit.harness.connect_as(dead))

    # -- secrets ------------------------------------------------------------

    async def test_no_secret_in_errors_or_logs(
        self, kit: Kit, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A failing statement's BackendError and every log record are free of passwords."""
        caplog.set_level(logging.DEBUG)
        password = generate_password()
        with pytest.raises(BackendError) as info:
            await kit.new_user(role=BROKEN_ROLE, password=password)
        assert not info.value.retryable, "a statement error is not worth retrying"
        secrets_ = [password, *kit.harness.secret_values()]
        assert_no_secret(info.value, secrets_)
        # A full lifecycle, logged at DEBUG, mentions no password either.
        username, other, _ = await kit.new_user()
        secrets_.append(other)
        if kit.capabilities.can_renew:
            await kit.backend.renew_user(
                RenewUserRequest(
                    role=kit.role(),
                    username=username,
                    revocation={},
                    expiration=datetime.now(UTC) + timedelta(hours=1),
                )
            )
        await kit.delete_user(username)
        for record in caplog.records:
            text = record.getMessage() + (str(record.exc_info) if record.exc_info else "")
            for value in secrets_:
                assert value not in text, f"log record from {record.name} carries a secret"
