"""What became of a rotate-root whose connection was lost while its ``ALTER`` was out.

The admin's own ``ALTER ROLE ... PASSWORD`` (postgres) or ``ALTER USER ...
IDENTIFIED BY`` (mysql) went out and the connection broke before the answer
came back (a proxy or load balancer reset it, the network failed, the server
restarted), or the answer did not come within the mount's timeout (a lock, a
synchronous standby, a stalled network; :func:`no_answer`). The server may
have changed the password or not. Guessing wrong either way locks the broker
out of its own backend: keep the old password after the server took the new
one (the next new connection cannot log in, and nobody knows the new
password, since it was never returned), or adopt a new one the server never
saw.

So the broker asks the server, as a client would: it ends the cut-off session
first (the plugin's ``settle``: until that session is gone, its ``ALTER`` may
still take effect), then logs in afresh with each password. The old one
logging in and the new one refused: unchanged. The reverse: changed. Both
logging in (the server does not check passwords for this host, e.g. ``trust``)
or neither: unknown. While the server cannot be reached, it tries again until
the deadline; then: unknown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from broker.backend import BackendError

__all__ = ["confirm_rotation", "no_answer", "rotation_outcome"]

log = logging.getLogger(__name__)

#: pause between attempts while the server cannot be reached.
_RETRY_PAUSE = 0.2

Login = Callable[[str | None], Awaitable[Any]]


def no_answer(what: str, timeout: float | None) -> BackendError:
    """The error for a password statement whose answer did not come within ``timeout``:
    its outcome is unknown, so the caller asks the server (:func:`confirm_rotation`)."""
    within = f" within {timeout:g}s" if timeout else ""
    return BackendError(f"{what}: the server did not answer{within}", retryable=True)


async def confirm_rotation(lost: BackendError, *, who: str, statement: str,
                           **probe: Any) -> None:
    """Return if the server took the new password although ``lost`` cut the ``statement``
    off; else raise why not. ``probe``: :func:`rotation_outcome`'s arguments."""
    took, why = await rotation_outcome(**probe)
    if took:
        # ``lost`` says which it was: a cut connection, or no answer in time.
        log.warning("%s: %s got no answer (%s), but the server took the new password",
                    who, statement, lost)
        return
    if took is False:
        raise BackendError(f"{lost}; the server kept the old password", retryable=True)
    raise BackendError(
        f"{lost}; whether the server took the new password is unknown ({why}). The broker"
        " keeps the old one: if it no longer logs in, set the admin password by hand and"
        " write it to the mount's password_file",
        retryable=False)


async def rotation_outcome(
    *,
    login: Login,
    settle: Callable[[Any], Awaitable[None]],
    logout: Callable[[Any], Awaitable[None]],
    wrong_password: Callable[[BaseException], bool],
    old: str | None,
    new: str,
    seconds: float,
) -> tuple[bool | None, str]:
    """(True: the server took ``new``; False: it still has ``old``; None: unknown), and why.

    ``login(password)`` opens a fresh admin connection (``None``: no password)
    and ``logout`` closes it; ``settle(conn)`` ends the cut-off session through
    it and waits until it is gone; ``wrong_password(exc)`` tells a refused
    login from any other failure (which is retried until ``seconds`` pass).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def logs_in(password: str | None) -> bool:
        try:
            conn = await login(password)
        except Exception as exc:
            if wrong_password(exc):
                return False
            raise
        await logout(conn)
        return True

    while True:
        try:
            if not await _settled(login, settle, logout, wrong_password, (old, new)):
                return None, "neither password logs in"
            old_ok, new_ok = await logs_in(old), await logs_in(new)
            if old_ok != new_ok:
                return new_ok, ""
            return None, ("the server does not check passwords for this host" if old_ok
                          else "neither password logs in")
        except Exception as exc:  # unreachable, or the session could not be ended
            why = f"the server could not be asked ({type(exc).__name__})"
        if loop.time() + _RETRY_PAUSE >= deadline:
            return None, why
        await asyncio.sleep(_RETRY_PAUSE)


async def _settled(login: Login, settle: Callable[[Any], Awaitable[None]],
                   logout: Callable[[Any], Awaitable[None]],
                   wrong_password: Callable[[BaseException], bool],
                   passwords: tuple[str | None, str]) -> bool:
    """Log in with either password and end the cut-off session; False if neither logs in."""
    for password in passwords:
        try:
            conn = await login(password)
        except Exception as exc:
            if wrong_password(exc):
                continue
            raise
        try:
            await settle(conn)
        finally:
            await logout(conn)
        return True
    return False
