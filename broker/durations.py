"""Durations as users write them: ``"90s"``, ``"15m"``, ``"1h"``, ``"7d"``, or seconds."""

from __future__ import annotations

import math
import re

__all__ = ["MAX_SECONDS", "format_duration", "parse_duration"]

#: The longest duration anything takes: 100 years. Longer is a typo, and every
#: expiry computed from it must still be a date the broker can write down
#: (a TTL of 1e308 seconds made a token whose every lookup failed).
MAX_SECONDS = 100 * 365 * 86400

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")  # ASCII digits only


def parse_duration(value: str | int | float) -> int:
    """Return whole seconds for ``value``; raise ValueError with a one-line reason.

    Accepts an int (seconds), a digit string (seconds, as Vault does for ``ttl``)
    or unit strings that may be combined (``"1h30m"``). The result is whole
    seconds: a fraction is dropped, as Vault does (``"1.5s"`` is 1), and a
    duration above zero but under one second is refused, because callers read
    0 as "the default" (a ``"500ms"`` lease would have lived an hour).
    """
    if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"expected a duration like '90s', '15m', '1h', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value!r}")
        return _whole(value, value)
    text = str(value).strip().lower()
    if text.isdigit() and text.isascii():  # "١٢٣".isdigit() too: Arabic-Indic digits
        if len(text) > len(str(MAX_SECONDS)):  # before int(): Python refuses 4,300+ digits
            raise ValueError(f"duration {_shown(value)} is longer than 100 years")
        return _bounded(int(text), value)
    pos = 0
    total = 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(f"expected a duration like '90s', '15m', '1h' or '7d', "
                         f"got {_shown(value)}")
    if not math.isfinite(total):  # "1e400" cannot be spelt, but 400 nines of seconds can
        raise ValueError(f"duration {_shown(value)} is longer than 100 years")
    return _whole(total, value)


def _whole(seconds: float, value: object) -> int:
    # To the microsecond first: in binary "4.1m" is 245.99999999999997 seconds,
    # which must not truncate to 245.
    rounded = round(seconds, 6)
    if seconds > 0 and rounded < 1:
        raise ValueError(f"duration must be at least 1s (durations are counted in whole "
                         f"seconds), got {_shown(value)}")
    return _bounded(int(rounded), value)


def _bounded(seconds: int, value: object) -> int:
    if seconds > MAX_SECONDS:
        raise ValueError(f"duration {_shown(value)} is longer than 100 years")
    return seconds


def _shown(value: object, most: int = 40) -> str:
    """``value`` for an error message: its repr, cut short (it is the caller's input)."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 5] + "...'"


def format_duration(seconds: int) -> str:
    """Render seconds compactly (``3600`` -> ``"1h"``, ``5400`` -> ``"1h30m"``)."""
    if seconds <= 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
