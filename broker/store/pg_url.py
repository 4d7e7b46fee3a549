"""The ``postgresql://`` storage URL's query: the store's own parameters and their rules.

``pool_min_size``, ``pool_max_size`` and ``command_timeout`` belong to the
store; every other parameter goes to asyncpg as given. The config loader
checks ``storage.url`` with :func:`store_params` long before any store is
opened, so this lives apart from the store: no I/O, no database driver.
"""

from __future__ import annotations

import math
from typing import NamedTuple
from urllib.parse import parse_qsl

__all__ = ["DEFAULT_COMMAND_TIMEOUT", "StoreParams", "store_params"]

#: URL query parameters the store takes for itself; the rest go to asyncpg.
_STORE_PARAMS = {"pool_min_size", "pool_max_size", "command_timeout"}
#: Seconds a store query may take before the call answers 503. Below hvac's
#: 30 s request timeout (and ``[leases] backend_timeout``'s 30 s), so a client
#: hears "lease store unavailable" instead of timing out itself; far above the
#: slowest query at 1M leases (~0.2 s). Migrations run without it.
DEFAULT_COMMAND_TIMEOUT = 15.0


class StoreParams(NamedTuple):
    """A storage URL's query split: the store's own parameters, and the rest (for asyncpg)."""

    pool_min_size: int
    pool_max_size: int
    command_timeout: float
    rest: list[tuple[str, str]]


def store_params(query: str) -> StoreParams:
    """Parse and check the query string of a ``postgresql://`` storage URL. Does no I/O.

    ``pool_min_size``, ``pool_max_size`` and ``command_timeout`` (seconds) are
    the store's own; any other parameter is kept, in order, for asyncpg. A
    ValueError names the parameter and the rule, never the URL or a value: the
    config loader shows it under ``storage.url`` and the URL may hold a password.
    """
    pairs = parse_qsl(query, keep_blank_values=True)
    own: dict[str, str] = {}
    for key, value in pairs:
        if key in _STORE_PARAMS:
            if key in own:
                raise ValueError(f"{key} is given twice")
            own[key] = value
    min_size = _whole(own, "pool_min_size", 1)
    max_size = _whole(own, "pool_max_size", 10)
    try:
        timeout = float(own.get("command_timeout", DEFAULT_COMMAND_TIMEOUT))
    except ValueError:
        timeout = math.nan
    if not 0 < timeout < math.inf:  # also refuses nan, which every comparison passes
        raise ValueError("command_timeout must be a number of seconds greater than 0")
    if max_size < 1:
        raise ValueError("pool_max_size must be at least 1")
    if min_size > max_size:
        raise ValueError(f"pool_min_size ({min_size}) must not be greater than "
                         f"pool_max_size ({max_size})")
    rest = [(key, value) for key, value in pairs if key not in _STORE_PARAMS]
    return StoreParams(min_size, max_size, timeout, rest)


def _whole(params: dict[str, str], key: str, default: int) -> int:
    value = params.get(key)
    if value is None:
        return default
    text = value.strip()
    if not (text.isascii() and text.isdigit()):  # "-1", "2.5", "ten", "" (isdigit: no sign)
        raise ValueError(f"{key} must be a whole number of connections, 0 or more")
    return int(text)
