"""Wraps every backend: timeouts, timing metrics, health, and redaction of secrets.

Plugins are asked never to put a secret into an error, but the engine does not
rely on it: whatever a plugin raises is turned into a BackendError whose text
has every secret the broker handed to that call replaced by ``[REDACTED]``.
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
    _init_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _ready: deque[tuple[str, Mapping[str, str]]] = field(default_factory=deque)
    _refill: asyncio.Task[None] | None = None
    _prepares: bool = True

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def capabilities(self) -> Any:
        return self.backend.capabilities

    async def ensure_initialized(self) -> bool:
        """(Re)connect; on failure remember why and stay unhealthy. Never raises."""
        async with self._init_lock:
            if self.healthy:
                return True
            try:
                await self._call("initialize", self.backend.initialize, ())
                await self._call("verify", self.backend.verify, ())
            except BackendError as exc:
                self.healthy, self.error = False, str(exc)
                log.warning("mount %s unhealthy: %s", self.name, exc)
                return False
            self.healthy, self.error = True, None
            return True

    async def check(self) -> bool:
        """Periodic health probe: verify a healthy mount, retry an unhealthy one.

        True when an unhealthy mount is healthy again (its irrevocable leases are
        then worth another try: broker/mounts.py, ``check_mounts``).
        """
        if not self.healthy:
            if await self.ensure_initialized():
                log.info("mount %s is healthy again", self.name)
                return True
            return False
        try:
            await self._call("verify", self.backend.verify, ())
        except BackendError as exc:
            self.healthy, self.error = False, str(exc)
            log.warning("mount %s became unhealthy: %s", self.name, exc)
        return False

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
            raise BackendError(redact_text(str(exc), hidden), retryable=exc.retryable,
                               created_nothing=exc.created_nothing) from None
        except TimeoutError:
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
