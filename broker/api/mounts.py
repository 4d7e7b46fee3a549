"""``POST /v1/{mount}/rotate-root``: replace a backend's admin credential (extension; also
at Vault's paths, ``{mount}/rotate-root/{connection}`` with the mount's own name as the
connection (routed through :func:`broker.api.db_config.rotate_root_connection`) and
``{mount}/config/rotate-root``).

The running backend uses the new secret at once, and the answer carries it
once (audited only as an HMAC). When the mount's secret comes from a
``password_file`` and the new credential is that one secret (postgres,
mysql), the file is rewritten with it, so the next start and every reload
read what the server now holds, and the other workers (and replicas reading
the same file) rebuild the mount with it within a second: each process's
password-file job sees the file change (``Engine.follow_password_files``).
Nothing else is reloaded: an unrelated edit waiting in the config file stays
waiting for its SIGHUP. Otherwise (``password_env``, AWS, whose access key id
lives in the config too, a file the broker may not write) the answer says to
store the secret by hand; other processes keep the old one until then.

A failed rotation answers 503 when the backend says trying again may help
(``BackendError.retryable``: unreachable, throttled, timed out) and 400 when it
refused for good (no permission, a bad config, a state to fix first).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator

from aiohttp import web

from broker.api.common import CALL, Call, vault_response
from broker.backend import BackendError, MountSpec, RotateRootRequest
from broker.errors import BackendUnavailable, BadRequest
from broker.middleware import MountRuntime
from broker.password_file import replace_password_file

try:
    import fcntl
except ImportError:  # Windows: no flock; one process's rotations are still serialized
    fcntl = None  # type: ignore[assignment]

__all__ = ["routes"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


@routes.post("/v1/{mount}/rotate-root")
@routes.post("/v1/{mount}/config/rotate-root")  # Vault's AWS engine
async def rotate_root(request: web.Request) -> web.Response:
    # Vault's database path, {mount}/rotate-root/{connection}, is routed by
    # db_config.rotate_root_connection: a broker mount has exactly one connection,
    # named as the mount, which comes here; another name is a 404 there.
    call: Call = request[CALL]
    mount = request.match_info["mount"]
    await call.authenticate()
    await call.read_body()
    # The policy path is the path asked for, as in Vault (a deny on
    # db/rotate-root/+ holds there, and sys/capabilities-self tells the truth).
    await call.require(_policy_path(request, mount), "update", "sudo")
    runtime = call.state.engine.mount(mount)
    # One rotation of a secret at a time: two at once (two workers, or replicas
    # on one host, sharing the password_file) each changed the password, and the
    # file could end up holding the one the server no longer had (day-2 QA).
    async with _rotation_lock(runtime.spec):
        return await _rotate(call, mount, runtime)


async def _rotate(call: Call, mount: str, runtime: MountRuntime) -> web.Response:
    try:
        resp = await runtime.rotate_root(RotateRootRequest())
    except BackendError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the backend's text held
        await call.audit("admin", outcome="error", action="rotate_root", mount=mount,
                         error=message, retryable=exc.retryable)
        # As for an issue: 503 only when trying again may help (unreachable, throttled,
        # timed out); a refusal for good (no permission, a bad config, a state the
        # operator must fix first) is a 400, so clients do not retry it.
        if exc.retryable:
            raise BackendUnavailable(f"mount {mount!r}: rotate-root failed: {message}") \
                from None
        raise BadRequest(f"mount {mount!r}: rotate-root refused: {message}") from None
    data = dataclasses.asdict(resp)
    # In a thread: the write ends with two fsyncs, and the loop serves everyone else.
    stored, warning = await asyncio.to_thread(_store, runtime.spec, data)
    if stored:
        # The running mount's spec now says what its backend uses and the file
        # holds: redaction hides the new secret, and neither a reload nor the
        # health job's password-file check rebuilds the mount for it. (Not when
        # the file was not written: a reload must still see the old secret there
        # as unchanged, or it would rebuild the mount with it.)
        runtime.spec = dataclasses.replace(runtime.spec, secret=data["new_password"])
    await call.audit("admin", action="rotate_root", mount=mount, data=data,
                     password_file_written=stored)
    if stored and call.state.config.storage.url.startswith("postgresql"):
        # A shared store: there may be replicas, each with its own password_file.
        warning = ("the new secret is in this broker's password_file; a replica that reads "
                   "its own copy needs it there too (it follows the file within a second)")
    return vault_response(call, data, warnings=[warning] if warning else None)


def _policy_path(request: web.Request, mount: str) -> str:
    """``{mount}/rotate-root``, ``{mount}/rotate-root/{connection}`` or
    ``{mount}/config/rotate-root``: whichever the request named."""
    connection = request.match_info.get("connection")
    if connection is not None:
        return f"{mount}/rotate-root/{connection}"
    if request.path.endswith("/config/rotate-root"):
        return f"{mount}/config/rotate-root"
    return f"{mount}/rotate-root"


#: Per mount in this process; the file lock below is for the other processes.
_LOCAL_LOCKS: dict[str, asyncio.Lock] = {}
#: How long a rotation waits for another one to end before it gives up (503).
ROTATION_WAIT = 120.0


@contextlib.asynccontextmanager
async def _rotation_lock(spec: MountSpec) -> AsyncIterator[None]:
    """Hold the mount's rotation lock: an asyncio lock in this process and, with a
    password_file, an flock on ``<password_file>.rotate.lock`` that every broker
    process on this host sharing the file takes too (the kernel drops it with the
    process, a crash included)."""
    local = _LOCAL_LOCKS.setdefault(spec.name, asyncio.Lock())
    try:
        async with asyncio.timeout(ROTATION_WAIT):
            await local.acquire()
    except TimeoutError:
        raise BackendUnavailable(f"mount {spec.name!r}: another rotate-root is still "
                                 "running; try again") from None
    fd: int | None = None
    try:
        if spec.secret_file is not None and fcntl is not None:
            fd = await _flock(spec.secret_file + ".rotate.lock", spec.name)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock
        local.release()


async def _flock(path: str, mount: str) -> int | None:
    """The exclusive flock on ``path``, waited for; None if the file cannot be made."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        # A directory the broker may not write: the rotation cannot write the
        # password_file there either, and says so; no other process can share it.
        log.warning("rotate-root of mount %s: no lock file %s (%s)", mount, path,
                    exc.strerror or exc)
        return None
    deadline = asyncio.get_running_loop().time() + ROTATION_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if asyncio.get_running_loop().time() > deadline:
                os.close(fd)
                raise BackendUnavailable(f"mount {mount!r}: another broker process is "
                                         "rotating its secret; try again") from None
            await asyncio.sleep(0.05)


def _store(spec: MountSpec, data: dict[str, object]) -> tuple[bool, str | None]:
    """Write the new secret to the mount's password_file; (written, warning for the caller)."""
    secret = data.get("new_password")
    by_hand = ("store the new secret where password_file/password_env points before the next "
               "restart, and reload (SIGHUP) every other broker process")
    others = [key for key, value in data.items() if key != "new_password" and value]
    if spec.secret_file is None or not isinstance(secret, str) or others:
        # password_env, or a credential of several parts (AWS: the access key id is
        # in the config as well): only the operator can put it where it belongs.
        return False, by_hand
    try:
        replace_password_file(spec.secret_file, secret)
    except OSError as exc:
        log.warning("rotate-root of mount %s: cannot write %s: %s", spec.name, spec.secret_file,
                    exc.strerror or exc)
        return False, f"could not write password_file ({exc.strerror or exc}): {by_hand}"
    log.info("rotate-root of mount %s: new secret written to %s", spec.name, spec.secret_file)
    return True, None
