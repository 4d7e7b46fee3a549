"""Which asyncio event loop the server runs on.

uvloop (libuv underneath) runs the broker's request path with less CPU per
request than the standard loop: the socket reads and writes, timers and
callbacks are C rather than Python. It is the default where it is installed
(Linux and macOS wheels); ``server.event_loop = "asyncio"`` or
``BROKER_EVENT_LOOP=asyncio`` falls back to the standard loop, e.g. to rule
the loop out while debugging.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

__all__ = ["ENV_VAR", "EVENT_LOOPS", "loop_factory", "resolve", "unknown"]

#: the values ``[server] event_loop`` and ``BROKER_EVENT_LOOP`` accept.
EVENT_LOOPS = ("auto", "uvloop", "asyncio")

#: overrides ``[server] event_loop`` (handy for one run without editing the config).
ENV_VAR = "BROKER_EVENT_LOOP"

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _uvloop_factory() -> LoopFactory | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def unknown(value: str) -> str | None:
    """What is wrong with ``value`` as an event loop name, or None when it is one."""
    if value in EVENT_LOOPS:
        return None
    return f"unknown event loop {value!r} (expected one of: {', '.join(EVENT_LOOPS)})"


def resolve(configured: str) -> str:
    """The loop to use, ``"uvloop"`` or ``"asyncio"``, from the config value and the env.

    Raises ValueError (naming the setting) for an unknown value, or for
    ``uvloop`` asked for explicitly where it is not installed.
    """
    choice, source = configured, "server.event_loop"
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        choice, source = env, ENV_VAR
    problem = unknown(choice)
    if problem:
        raise ValueError(f"{source}: {problem}")
    if choice == "asyncio":
        return "asyncio"
    if _uvloop_factory() is None:
        if choice == "uvloop":
            raise ValueError(f"{source} = uvloop, but uvloop is not installed")
        return "asyncio"
    return "uvloop"


def loop_factory(name: str) -> LoopFactory | None:
    """A factory for :class:`asyncio.Runner`; None means the standard loop."""
    return _uvloop_factory() if name == "uvloop" else None
