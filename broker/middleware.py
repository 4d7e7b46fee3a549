"""Wraps every backend: timeouts, timing metrics, health, and redaction of secrets.

Plugins are asked never to put a secret into an error, but the engine does not
rely on it: whatever a plugin raises is turned into a BackendError whose text
has every secret the broker handed to that call replaced by ``[REDACTED]``.

Health: a mount is unhealthy from a failed (re)connection (``initialize`` +
``verify``) or a failed ``verify``. Requests never connect it themselves: they
answer 503 at once with the last reason (:meth:`MountRuntime.usable`), and at
most one attempt runs at a time, in the background, started by the health job
or, at most once per :data:`RETRY_SPACING`, by a request. A backend that hangs
instead of refusing made each issue wait for its own attempt, queued behind
the others' (QA: 20 s, 36 s, 56 s for three at once). A call that fails in a
way that may mean the backend is gone has the mount verified at once, in the
background, so health says so before the next probe.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast

from broker.backend import (
    Backend,
    BackendError,
    BatchRevoker,
    DeleteUserRequest,
    DeleteUserResponse,
    MountSpec,
    NewUserRequest,
    NewUserResponse,
    RenewUserRequest,
    RenewUserResponse,
    RotateRootRequest,
    RotateRootResponse,
    StagedUser,
    StagingBackend,
    stages_users,
)
from broker.templating import generate_password

__all__ = ["CallStats", "MountRuntime", "redact_text"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: passwords a mount keeps prepared ahead (see MountRuntime.take_password).
READY_PASSWORDS = 4

#: Least seconds between two tries of an unhealthy or suspect mount that requests
#: start (a reconnection, a verify): never one per request. The health job's tries
#: come on its own schedule.
RETRY_SPACING = 1.0
#: Longest a request that starts a reconnection waits for it before answering 503:
#: a backend that is back serves that request; one that hangs costs it no more.
REQUEST_WAIT = 1.0
#: Seconds between the log lines saying a mount is still unhealthy.
UNHEALTHY_REPEAT = 60.0
#: Calls whose retryable failure has the mount verified at once, in the background:
#: a retryable error (refused, lost connection, timeout, throttling) may be an outage.
_WATCHED = frozenset({"new_user", "stage_user", "commit_user", "renew_user", "delete_user",
                      "delete_users"})

#: how long rotate-root may go on past the mount's timeout: a statement whose
#: answer never came is followed by ending its session (up to 10 s) and a fresh
#: login with each password (up to the connect timeout), plugins/_rotation.py.
ROTATE_PROBE_GRACE = 30.0

_SECRET_KEYS = ("password", "secret_key", "security_token", "secret", "token")


def redact_text(text: str, secrets_: Iterable[str | None]) -> str:
    """Replace every secret (of 4+ chars) in ``text`` by ``[REDACTED]``, in any letter case.

    (A server may fold what it echoes: PostgreSQL lower-cases an unquoted identifier.)
    """
    for secret in secrets_:
        if secret and len(secret) >= 4:
            text = re.sub(re.escape(secret), lambda _m: "[REDACTED]", text, flags=re.IGNORECASE)
    return text


@dataclass
class CallStats:
    """Counters per backend operation, for /v1/sys/metrics."""

    calls: int = 0
    errors: int = 0
    total_seconds: float = 0.0
    max_seconds: float = 0.0

    def record(self, seconds: float, ok: bool) -> None:
        self.calls += 1
        self.errors += 0 if ok else 1
        self.total_seconds += seconds
        self.max_seconds = max(self.max_seconds, seconds)


@dataclass
class MountRuntime:
    """A configured mount and its live backend, wrapped."""

    spec: MountSpec
    backend: Backend
    timeout: float = 30.0
    healthy: bool = False
    error: str | None = "not initialised"
    stats: dict[str, CallStats] = field(default_factory=dict)
    #: the one (re)connection under way, if any; every caller shares it.
    _attempt: asyncio.Task[bool] | None = None
    #: the background verify after a failed call (``_suspect``), if one runs.
    _watch: asyncio.Task[None] | None = None
    _suspect: bool = False
    #: time.monotonic() of the last try (reconnection or verify): requests space theirs.
    _last_try: float = float("-inf")
    #: when the outage the log told of began, and when it last said so (None: healthy).
    _down_since: float | None = None
    _said: float = 0.0
    #: healthy again since the health job last looked (it retries irrevocable leases).
    _recovered: bool = False
    _ready: deque[tuple[str, Mapping[str, str]]] = field(default_factory=deque)
    _refill: asyncio.Task[None] | None = None
    _prepares: bool = True

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def capabilities(self) -> Any:
        return self.backend.capabilities

    @property
    def connecting(self) -> bool:
        """Whether a (re)connection attempt is under way."""
        return self._attempt is not None and not self._attempt.done()

    async def ensure_initialized(self) -> bool:
        """(Re)connect unless healthy, and wait for the outcome; True when healthy.

        One attempt at a time: a caller that comes while one is under way waits for
        that one (start-up, a reload, the health job). Requests use :meth:`usable`,
        which never waits behind another attempt. Never raises.
        """
        if self.healthy:
            return True
        attempt = self._start_attempt()
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if attempt.cancelled() and not (current is not None and current.cancelling()):
                return False  # the mount closed under us, not our caller cancelled
            raise

    async def usable(self) -> bool:
        """For a request: is the mount healthy? Never queues behind a reconnection.

        An unhealthy mount is tried again in the background when no attempt is
        under way and none began in the last RETRY_SPACING seconds; the request
        that starts it waits for it up to REQUEST_WAIT seconds (a backend that is
        back serves it). Otherwise False at once: the caller answers 503 with
        ``error``, the last reason.
        """
        if self.healthy:
            return True
        if self._attempt is not None and not self._attempt.done():
            return False
        if time.monotonic() - self._last_try < RETRY_SPACING:
            return False
        attempt = self._start_attempt()
        try:
            async with asyncio.timeout(REQUEST_WAIT):
                return await asyncio.shield(attempt)
        except TimeoutError:
            return False  # it goes on in the background

    def _start_attempt(self) -> asyncio.Task[bool]:
        if self._attempt is None or self._attempt.done():
            self._last_try = time.monotonic()
            self._attempt = asyncio.create_task(self._connect(), name=f"connect {self.name}")
        return self._attempt

    async def _connect(self) -> bool:
        try:
            await self._call("initialize", self.backend.initialize, ())
            await self._call("verify", self.backend.verify, ())
        except BackendError as exc:
            self._mark_unhealthy(str(exc))
            return False
        self._mark_healthy()
        return True

    async def check(self) -> bool:
        """Periodic health probe: verify a healthy mount, retry an unhealthy one.

        True when the mount is healthy again since the last probe, whoever brought
        it back (its irrevocable leases are then worth another try:
        broker/mounts.py, ``check_mounts``).
        """
        if not self.healthy:
            await self.ensure_initialized()
        else:
            self._last_try = time.monotonic()
            try:
                await self._call("verify", self.backend.verify, ())
            except BackendError as exc:
                self._mark_unhealthy(str(exc))
        recovered, self._recovered = self._recovered, False
        return recovered and self.healthy

    def replaces(self, old: MountRuntime) -> None:
        """This runtime (verified) takes over from ``old``: an outage of ``old``'s ends here."""
        if old._down_since is not None:
            self._down_since, self._said = old._down_since, old._said
            self._mark_healthy()

    def _suspected(self) -> None:
        """A call failed in a way that may mean the backend is gone: verify it now, in
        the background (the failing request is not held up, the success path pays
        nothing). Several failures at once make one verify; then one a RETRY_SPACING."""
        if not self.healthy:
            return  # already known; reconnections are under way or spaced
        self._suspect = True
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._verify_suspect(), name=f"verify {self.name}")

    async def _verify_suspect(self) -> None:
        while self.healthy:
            wait = self._last_try + RETRY_SPACING - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._suspect = False
            self._last_try = time.monotonic()
            try:
                await self._call("verify", self.backend.verify, ())
            except BackendError as exc:
                if self.healthy:  # not reconnected meanwhile
                    self._mark_unhealthy(str(exc))
                return
            if not self._suspect:
                return  # no failure since this verify began

    def _mark_unhealthy(self, reason: str) -> None:
        """The mount is unhealthy for ``reason``: logged when it starts, then once a
        UNHEALTHY_REPEAT while it lasts (not at every failed try, every 10 s)."""
        self.healthy, self.error = False, reason
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = self._said = now
            log.warning("mount %s unhealthy: %s (issuing from it answers 503 and its "
                        "revocations wait; it is retried in the background, and said again "
                        "every %gs while it lasts)",
                        self.name, reason, UNHEALTHY_REPEAT)
        elif now - self._said >= UNHEALTHY_REPEAT:
            self._said = now
            log.warning("mount %s still unhealthy after %.0fs: %s", self.name,
                        now - self._down_since, reason)
        else:
            log.debug("mount %s: still unhealthy: %s", self.name, reason)

    def _mark_healthy(self) -> None:
        self.healthy, self.error = True, None
        if self._down_since is not None:
            log.info("mount %s is healthy again after %.0fs", self.name,
                     time.monotonic() - self._down_since)
            self._down_since = None
            self._recovered = True

    # -- passwords prepared ahead ------------------------------------------------
    # A backend may offer ``prepare_password(password) -> Mapping[str, str]``:
    # work that depends on the password only and has no effect on the backend
    # (the postgres plugin's SCRAM hashing). The runtime keeps READY_PASSWORDS
    # passwords with their prepared form ready, made in a thread while the loop
    # waits on I/O, so an issue at low concurrency does not wait for the hash.
    # They live only in memory, each handed out once.

    @property
    def prepares_passwords(self) -> bool:
        return self._prepares and hasattr(self.backend, "prepare_password")

    def take_password(self) -> tuple[str, Mapping[str, str]] | None:
        """A password made ahead and what the backend prepared from it, or None."""
        if not self.prepares_passwords:
            return None
        ready = self._ready.popleft() if self._ready else None
        if self._refill is None or self._refill.done():
            self._refill = asyncio.create_task(self._fill(), name=f"prepare {self.name}")
        return ready

    async def prepare_password(self, password: str) -> Mapping[str, str] | None:
        """The backend's ``prepare_password``; None if it failed (new_user copes without)."""
        prepare = getattr(self.backend, "prepare_password", None)
        if prepare is None:
            return {}
        try:
            prepared: Mapping[str, str] = await self._call("prepare_password", prepare,
                                                           (password,), (password,))
            return prepared
        except BackendError as exc:  # already redacted by _call
            log.warning("mount %s: prepare_password failed, new_user goes without: %s",
                        self.name, exc)
            return None

    async def _fill(self) -> None:
        while len(self._ready) < READY_PASSWORDS:
            password = generate_password()
            prepared = await self.prepare_password(password)
            if prepared is None:
                return  # failed (logged): issues prepare their own; the next take retries
            if not prepared:
                # Nothing to prepare (postgres with password_hashing = "server").
                self._prepares = False
                return
            self._ready.append((password, prepared))

    async def new_user(self, req: NewUserRequest) -> NewUserResponse:
        return await self._call("new_user", self.backend.new_user, (req,),
                                (req.password, *req.prepared.values()))

    @property
    def stages_users(self) -> bool:
        """Whether the backend creates users in two steps (``broker.backend.StagingBackend``)."""
        return stages_users(self.backend)

    async def stage_user(self, req: NewUserRequest) -> StagedUser:
        """``stage_user``, wrapped; so are the commit and abort of what it returns."""
        hidden = (req.password, *req.prepared.values())
        backend = cast(StagingBackend, self.backend)
        staged = await self._call("stage_user", backend.stage_user, (req,), hidden)
        return _WrappedStage(self, staged, hidden)

    async def renew_user(self, req: RenewUserRequest) -> RenewUserResponse:
        return await self._call("renew_user", self.backend.renew_user, (req,))

    async def delete_user(self, req: DeleteUserRequest) -> DeleteUserResponse:
        return await self._call("delete_user", self.backend.delete_user, (req,))

    async def delete_users(self, reqs: list[DeleteUserRequest]) -> list[BackendError | None]:
        """One ``delete_users`` call (see ``broker.backend.BatchRevoker``), wrapped.

        The wrapper redacts what the call raises; the errors it returns per
        request are redacted here the same way, and anything but a list of one
        BackendError-or-None per request is treated as a plugin bug.
        """
        # Not isinstance(..., BatchRevoker): a runtime Protocol check costs ~70 µs.
        backend = cast(BatchRevoker, self.backend)
        results = await self._call("delete_users", backend.delete_users, (reqs,))
        if not isinstance(results, list) or len(results) != len(reqs):
            raise BackendError("delete_users: plugin returned a malformed result",
                               retryable=True)
        hidden = [self.spec.secret]
        out: list[BackendError | None] = []
        for result in results:
            if result is None:
                out.append(None)
            elif isinstance(result, BackendError):
                if result.retryable:
                    self._suspected()
                out.append(BackendError(redact_text(str(result), hidden),
                                        retryable=result.retryable))
            else:
                out.append(BackendError(redact_text(f"{type(result).__name__}: {result}", hidden),
                                        retryable=True))
        return out

    async def rotate_root(self, req: RotateRootRequest) -> RotateRootResponse:
        # The plugin bounds its statement by our timeout and may then spend a
        # while asking the server whether the password changed (plugins/_rotation.py).
        return await self._call("rotate_root", self.backend.rotate_root,
                                (replace(req, timeout=self.timeout),), (req.new_password,),
                                timeout=self.timeout + ROTATE_PROBE_GRACE)

    async def close(self) -> None:
        if self._refill is not None:
            self._refill.cancel()
        self._ready.clear()
        tasks = [t for t in (self._attempt, self._watch) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self.backend.close(), timeout=self.timeout)
        except Exception as exc:  # closing must not stop shutdown
            log.warning("closing mount %s: %s", self.name,
                        redact_text(str(exc), [self.spec.secret]))

    async def _call(
        self,
        op: str,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        secrets_: tuple[str | None, ...] = (),
        *,
        timeout: float | None = None,
    ) -> T:
        limit = self.timeout if timeout is None else timeout
        start = time.perf_counter()
        ok = False
        hidden = (*secrets_, self.spec.secret)
        try:
            # asyncio.timeout, not wait_for: no extra Task per call (Python 3.11);
            # expiry raises the same TimeoutError, handled below.
            async with asyncio.timeout(limit):
                result = await fn(*args)
            ok = True
            return result
        except BackendError as exc:
            if exc.retryable and op in _WATCHED:
                self._suspected()
            raise BackendError(redact_text(str(exc), hidden), retryable=exc.retryable,
                               created_nothing=exc.created_nothing) from None
        except TimeoutError:
            if op in _WATCHED:
                self._suspected()
            raise BackendError(f"{op} timed out after {limit:g}s", retryable=True) from None
        except Exception as exc:  # a plugin bug: still never leak a secret
            message = redact_text(f"{type(exc).__name__}: {exc}", hidden)
            raise BackendError(message, retryable=True) from None
        finally:
            self.stats.setdefault(op, CallStats()).record(time.perf_counter() - start, ok)


class _WrappedStage:
    """A backend's StagedUser with the runtime's timeout, timing and redaction."""

    def __init__(self, runtime: MountRuntime, staged: StagedUser,
                 hidden: tuple[str | None, ...]) -> None:
        self.response = staged.response
        self._runtime = runtime
        self._staged = staged
        self._hidden = hidden

    async def commit(self) -> None:
        await self._runtime._call("commit_user", self._staged.commit, (), self._hidden)

    async def abort(self) -> None:
        try:
            await self._runtime._call("abort_user", self._staged.abort, (), self._hidden)
        except BackendError as exc:  # abort must not raise: the broker is already undoing
            log.warning("mount %s: abort of a staged user failed: %s", self._runtime.name, exc)
