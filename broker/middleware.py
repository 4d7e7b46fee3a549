"""Wraps every backend: timeouts, timing metrics, health, and redaction of secrets.

Plugins are asked never to put a secret into an error, but the engine does not
rely on it: whatever a plugin raises is turned into a BackendError whose text
has every secret the broker handed to that call replaced by ``[REDACTED]``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from broker.backend import (
    Backend,
    BackendError,
    DeleteUserRequest,
    DeleteUserResponse,
    MountSpec,
    NewUserRequest,
    NewUserResponse,
    RenewUserRequest,
    RenewUserResponse,
    RotateRootRequest,
    RotateRootResponse,
)

__all__ = ["CallStats", "MountRuntime", "redact_text"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_SECRET_KEYS = ("password", "secret_key", "security_token", "secret", "token")


def redact_text(text: str, secrets_: Iterable[str | None]) -> str:
    """Replace every secret (of 4+ chars) in ``text`` by ``[REDACTED]``."""
    for secret in secrets_:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[REDACTED]")
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

    async def check(self) -> None:
        """Periodic health probe: verify a healthy mount, retry an unhealthy one."""
        if not self.healthy:
            await self.ensure_initialized()
            return
        try:
            await self._call("verify", self.backend.verify, ())
        except BackendError as exc:
            self.healthy, self.error = False, str(exc)
            log.warning("mount %s became unhealthy: %s", self.name, exc)

    @property
    def prepares_users(self) -> bool:
        return hasattr(self.backend, "prepare_user")

    async def prepare_user(self, req: NewUserRequest) -> NewUserRequest:
        """The backend's optional ``prepare_user``; never raises (new_user copes without)."""
        prepare = getattr(self.backend, "prepare_user", None)
        if prepare is None:
            return req
        try:
            prepared: NewUserRequest = await self._call("prepare_user", prepare, (req,),
                                                        (req.password,))
            return prepared
        except BackendError as exc:  # already redacted by _call
            log.warning("mount %s: prepare_user failed, new_user goes without: %s",
                        self.name, exc)
            return req

    async def new_user(self, req: NewUserRequest) -> NewUserResponse:
        return await self._call("new_user", self.backend.new_user, (req,),
                                (req.password, *req.prepared.values()))

    async def renew_user(self, req: RenewUserRequest) -> RenewUserResponse:
        return await self._call("renew_user", self.backend.renew_user, (req,))

    async def delete_user(self, req: DeleteUserRequest) -> DeleteUserResponse:
        return await self._call("delete_user", self.backend.delete_user, (req,))

    async def rotate_root(self, req: RotateRootRequest) -> RotateRootResponse:
        return await self._call("rotate_root", self.backend.rotate_root, (req,),
                                (req.new_password,))

    async def close(self) -> None:
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
    ) -> T:
        start = time.perf_counter()
        ok = False
        hidden = (*secrets_, self.spec.secret)
        try:
            # asyncio.timeout, not wait_for: no extra Task per call (Python 3.11);
            # expiry raises the same TimeoutError, handled below.
            async with asyncio.timeout(self.timeout):
                result = await fn(*args)
            ok = True
            return result
        except BackendError as exc:
            raise BackendError(redact_text(str(exc), hidden), retryable=exc.retryable) from None
        except TimeoutError:
            raise BackendError(f"{op} timed out after {self.timeout:g}s", retryable=True) from None
        except Exception as exc:  # a plugin bug: still never leak a secret
            message = redact_text(f"{type(exc).__name__}: {exc}", hidden)
            raise BackendError(message, retryable=True) from None
        finally:
            self.stats.setdefault(op, CallStats()).record(time.perf_counter() - start, ok)
