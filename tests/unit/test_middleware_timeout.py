"""MountRuntime's per-call timeout: expiry is a retryable BackendError, the call is cancelled."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from broker.backend import Backend, BackendError, MountSpec
from broker.middleware import MountRuntime


class SlowBackend:
    """A plugin stand-in whose verify() takes ``delay`` seconds (no database involved)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.cancelled = False
        self.finished = False

    async def verify(self) -> str:
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.finished = True
        return "ok"


def runtime(backend: Any, timeout: float) -> MountRuntime:
    spec = MountSpec(name="m", plugin="slow", roles={}, secret="adm1n-s3cret")
    return MountRuntime(spec=spec, backend=cast(Backend, backend), timeout=timeout)


async def test_call_within_timeout_returns_its_result() -> None:
    backend = SlowBackend(0.0)
    mount = runtime(backend, timeout=5)
    assert await mount._call("verify", backend.verify, ()) == "ok"
    assert backend.finished and mount.stats["verify"].errors == 0


async def test_expired_call_is_cancelled_and_reported_retryable() -> None:
    backend = SlowBackend(10.0)
    mount = runtime(backend, timeout=0.05)
    with pytest.raises(BackendError, match=r"verify timed out after 0\.05s") as info:
        await mount._call("verify", backend.verify, ())
    assert info.value.retryable
    assert backend.cancelled and not backend.finished
    assert mount.stats["verify"].errors == 1


async def test_cancelling_the_caller_is_not_a_timeout() -> None:
    backend = SlowBackend(10.0)
    mount = runtime(backend, timeout=5)
    task = asyncio.create_task(mount._call("verify", backend.verify, ()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.cancelled
