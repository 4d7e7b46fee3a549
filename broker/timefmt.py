"""Times as the broker writes them: RFC 3339 in UTC, with Z.

One implementation for the API's times (``expire_time``, ``issue_time``...) and the
audit lines' (the limiter's summary window), which must read alike; a leaf module,
so that any layer can use it without an import cycle.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["rfc3339", "rfc3339_seconds"]


def rfc3339(ts: float) -> str:
    """``ts`` (a Unix time) with microseconds: ``2026-01-02T03:04:05.678901Z``, as the
    audit log's own ``time`` field and Vault's API times."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def rfc3339_seconds(ts: float) -> str:
    """``ts`` (a Unix time) to the second: ``2026-01-02T03:04:05Z`` (an expiry given to
    the second, as AWS gives it)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
