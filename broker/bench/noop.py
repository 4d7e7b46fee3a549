"""The bench's no-op backend: creates nothing, so a benchmark measures the broker alone.

Registered only by the bench (``register()``), never as a distribution entry
point: a production broker cannot mount it by accident. With
``BROKER_BENCH_REVOKE_LOG`` set, every ``delete_user`` appends the username and
the time to that file, one line each, so the HA scenario can count revocations per lease
across replicas (a line written with ``os.write`` on an ``O_APPEND`` file
survives a SIGKILL of the process that wrote it). It revokes in batches too
(``delete_users``), as a batching backend would: one write for a batch.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Sequence

from broker.backend import (
    BackendError,
    Capabilities,
    DeleteUserRequest,
    DeleteUserResponse,
    MountSpec,
    NewUserRequest,
    NewUserResponse,
    PluginConfigError,
    RenewUserRequest,
    RenewUserResponse,
    RoleSpec,
    RotateRootRequest,
    RotateRootResponse,
    register_plugin,
)

__all__ = ["PLUGIN_NAME", "REVOKE_LOG_ENV", "NoopBackend", "register"]

PLUGIN_NAME = "bench-noop"
REVOKE_LOG_ENV = "BROKER_BENCH_REVOKE_LOG"


class NoopBackend:
    """Answers at once with a fake username/password; revocation is a no-op (or a log line)."""

    capabilities = Capabilities(can_renew=True, can_revoke=True, server_side_expiry=False,
                                max_username_length=63)

    def __init__(self, revoke_log: str | None = None) -> None:
        self._revoke_log = revoke_log
        self._fd: int | None = None

    @classmethod
    def from_config(cls, mount: MountSpec) -> NoopBackend:
        if mount.options:
            raise PluginConfigError(next(iter(mount.options)),
                                    "the bench-noop backend takes no options")
        return cls(os.environ.get(REVOKE_LOG_ENV) or None)

    @classmethod
    def validate_role(cls, role: RoleSpec) -> None:
        if role.options:
            raise PluginConfigError(next(iter(role.options)), "unknown key for a bench-noop role")

    async def initialize(self) -> None:
        if self._revoke_log and self._fd is None:
            self._fd = os.open(self._revoke_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def verify(self) -> None:
        return None

    async def new_user(self, req: NewUserRequest) -> NewUserResponse:
        await asyncio.sleep(0)
        return NewUserResponse(data={"username": req.username, "password": req.password})

    async def renew_user(self, req: RenewUserRequest) -> RenewUserResponse:
        await asyncio.sleep(0)
        return RenewUserResponse(expiration=req.expiration)

    async def delete_user(self, req: DeleteUserRequest) -> DeleteUserResponse:
        await asyncio.sleep(0)
        if self._fd is not None:
            # One small O_APPEND write: atomic, and in the kernel once it returns.
            os.write(self._fd, f"{req.username} {time.time():.6f}\n".encode())
        return DeleteUserResponse()

    async def delete_users(self, reqs: Sequence[DeleteUserRequest]
                           ) -> list[BackendError | None]:
        await asyncio.sleep(0)
        if self._fd is not None and reqs:
            # One O_APPEND write for the batch: all its lines are logged, or none.
            now = f"{time.time():.6f}"
            os.write(self._fd, "".join(f"{req.username} {now}\n" for req in reqs).encode())
        return [None] * len(reqs)

    async def rotate_root(self, req: RotateRootRequest) -> RotateRootResponse:
        return RotateRootResponse(new_password=req.new_password or secrets.token_urlsafe(16))

    async def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def register() -> None:
    """Make ``plugin = "bench-noop"`` mountable in this process."""
    register_plugin(PLUGIN_NAME, NoopBackend)
