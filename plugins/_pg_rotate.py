"""What became of a rotate-root whose connection was lost during ``ALTER ROLE``.

The admin's ``ALTER ROLE CURRENT_USER PASSWORD ...`` went out and the
connection broke before the answer came back (a proxy or load balancer reset
it, the network failed, the server restarted). The server may have changed
the password or not. Guessing wrong either way locks the broker out of its
own backend: keep the old password after the server took the new one (the
next pooled connection cannot log in, and nobody knows the new password,
since it was never returned), or adopt a new one the server never saw.

So the broker asks the server, as a client would: it ends the cut-off
session first (``PostgresBackend._settle``: until that session is gone its
``ALTER`` may still commit), then logs in afresh with each password. The old
one logging in and the new one refused: unchanged. The reverse: changed.
Both logging in (the server does not check passwords for this host, e.g.
``trust``), or the server unreachable until the deadline: unknown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg

from broker.backend import BackendError

__all__ = ["rotation_outcome"]

#: what a fresh login may fail with when the server cannot be reached (try again).
_UNREACHABLE = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
                asyncpg.TooManyConnectionsError)
#: pause between attempts while the server cannot be reached.
_RETRY_PAUSE = 0.2


async def rotation_outcome(
    login: Callable[[str | None], Awaitable[asyncpg.Connection]],
    settle: Callable[[asyncpg.Connection], Awaitable[None]],
    old: str | None,
    new: str,
    *,
    seconds: float,
) -> tuple[bool | None, str]:
    """(True: the server took ``new``; False: it still has ``old``; None: unknown, why).

    ``login(password)`` opens a fresh admin connection (``None``: no password);
    ``settle(conn)`` ends the cut-off session through it and waits until it is
    gone. Keeps trying for ``seconds`` while the server cannot be reached.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        try:
            if not await _settled(login, settle, (old, new)):
                return None, "neither password logs in"
            old_ok = await _logs_in(login, old)
            new_ok = await _logs_in(login, new)
            if old_ok != new_ok:
                return new_ok, ""
            return None, ("the server does not check passwords for this host" if old_ok
                          else "neither password logs in")
        except _UNREACHABLE as exc:
            why = f"the server could not be reached ({type(exc).__name__})"
        except asyncpg.PostgresError as exc:  # e.g. no right to end the session
            return None, f"the cut-off session could not be ended (SQLSTATE {exc.sqlstate})"
        except BackendError:  # settle: it did not go in time
            return None, "the cut-off session did not end"
        if loop.time() + _RETRY_PAUSE >= deadline:
            return None, why
        await asyncio.sleep(_RETRY_PAUSE)


async def _settled(login: Callable[[str | None], Awaitable[asyncpg.Connection]],
                   settle: Callable[[asyncpg.Connection], Awaitable[None]],
                   passwords: tuple[str | None, str]) -> bool:
    """Log in with either password and end the cut-off session; False if neither logs in."""
    for password in passwords:
        try:
            conn = await login(password)
        except asyncpg.InvalidPasswordError:
            continue
        try:
            await settle(conn)
        finally:
            await conn.close()
        return True
    return False


async def _logs_in(login: Callable[[str | None], Awaitable[asyncpg.Connection]],
                   password: str | None) -> bool:
    try:
        conn = await login(password)
    except asyncpg.InvalidPasswordError:
        return False
    await conn.close()
    return True
