"""A per-client limit on the audit lines of unauthenticated failures.

Anyone who can reach the port can send a bad token or a bad JWT login, and each
such request wrote its ``request`` and ``auth_failure`` lines, fsync'd when
``[audit] fsync`` is on: a cheap way to fill the disk or to bury the record of an
attack under its own noise. Those lines now pass through a token bucket per client
address: BURST failed requests at once, then RATE per second. What the bucket
holds back is not lost: the first one held back starts a window of SUMMARY_AFTER
seconds (the time the bucket takes to fill up again), and at its end ONE
``auth_failure`` line with outcome ``suppressed`` says how many lines were left
out, of which types, from which address and over what time.

A ``reuse_attempt`` (a revoked or expired token's use) is never held back: it names
the token that leaked (broker/api/common.py ``authenticate``). The answers do not
change (still 403 or 400), and nothing done with a valid token is ever held back:
issue, renew, revoke, policy denials and every other authenticated action are
audited line by line, as before.

IPv6 clients are counted per /64 (one host usually owns a whole /64, and would
otherwise get a fresh bucket from each of its 2^64 addresses). Behind a proxy
every client shares the proxy's address, and so its bucket: the summary still
counts every failure.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.audit import AuditLog, event
from broker.timefmt import rfc3339

if TYPE_CHECKING:  # broker.state makes the limiter: no import at run time
    from broker.state import BrokerState

__all__ = ["BURST", "RATE", "SUMMARY_AFTER", "FailureAuditLimiter", "client_key",
           "close_limiter", "limiter_for"]

log = logging.getLogger(__name__)

#: failed requests of one client audited line by line at once, before the limit bites.
BURST = 100
#: then this many per second (the bucket's refill rate).
RATE = 20.0
#: seconds from the first held-back line to the summary of the held-back ones: the
#: time an empty bucket takes to fill up again.
SUMMARY_AFTER = BURST / RATE
#: buckets kept at most; full ones (idle clients) are dropped first, and a flood from
#: more addresses than this shares one bucket ("other clients").
MAX_CLIENTS = 10_000
OVERFLOW_KEY = "other clients"


def client_key(remote: str | None) -> str:
    """The bucket of a client address: itself, its /64 for IPv6 (an IPv4-mapped
    address as the IPv4 one), "unknown" when the transport has none (a Unix socket)."""
    if not remote:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return remote
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass
class _Bucket:
    tokens: float
    stamp: float  # monotonic time of the last refill
    held: Counter[str] = field(default_factory=Counter)  # held-back lines by event type
    first: float = 0.0  # wall-clock time of the first held-back one
    last: float = 0.0
    timer: asyncio.TimerHandle | None = None


class FailureAuditLimiter:
    """Token buckets per client for one audit log; see the module doc."""

    def __init__(self, audit: AuditLog, *, burst: int = BURST, rate: float = RATE,
                 summary_after: float = SUMMARY_AFTER) -> None:
        self._audit = audit
        self._burst = burst
        self._rate = rate
        self._summary_after = summary_after
        self._buckets: dict[str, _Bucket] = {}
        self._writes: set[asyncio.Task[None]] = set()

    def admit(self, key: str) -> bool:
        """Whether client ``key`` may have one more request's lines audited (one token
        of its bucket taken); False: :meth:`hold` its failure instead."""
        now = time.monotonic()
        _, bucket = self._bucket(key, now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
        bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        return False

    def hold(self, key: str, type_: str) -> None:
        """Count a failure (an event of ``type_``) of ``key`` that is not audited now, for
        the summary line written SUMMARY_AFTER seconds after the first one held."""
        key, bucket = self._bucket(key, time.monotonic())  # (key: maybe the overflow's)
        bucket.held[type_] += 1
        bucket.last = time.time()
        bucket.first = bucket.first or bucket.last
        if bucket.timer is None:
            bucket.timer = asyncio.get_running_loop().call_later(
                self._summary_after, self._summary_due, key)

    def _bucket(self, key: str, now: float) -> tuple[str, _Bucket]:
        """The bucket of ``key`` (made full if new) and the key it is kept under:
        OVERFLOW_KEY when MAX_CLIENTS others are in use."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            return key, bucket
        if len(self._buckets) >= MAX_CLIENTS:
            self._drop_idle(now)
            if len(self._buckets) >= MAX_CLIENTS:
                key = OVERFLOW_KEY
                if key in self._buckets:
                    return key, self._buckets[key]
        bucket = self._buckets[key] = _Bucket(tokens=self._burst, stamp=now)
        return key, bucket

    def _drop_idle(self, now: float) -> None:
        # A bucket full again with nothing held back is the same as no bucket.
        idle = [key for key, b in self._buckets.items()
                if not b.held and b.tokens + (now - b.stamp) * self._rate >= self._burst]
        for key in idle:
            del self._buckets[key]

    def _summary_due(self, key: str) -> None:
        task = asyncio.ensure_future(self.write_summary(key))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def write_summary(self, key: str) -> None:
        """Write the summary line of what ``key``'s bucket held back, if anything."""
        bucket = self._buckets.get(key)
        if bucket is None or not bucket.held:
            return
        summary = self._summary(key, bucket)
        if bucket.timer is not None:
            bucket.timer.cancel()
        bucket.held, bucket.first, bucket.last, bucket.timer = Counter(), 0.0, 0.0, None
        try:
            await self._audit.write(summary)
        except Exception as exc:  # in a timer's task: nobody else would see it
            # The audit log is down (health says so); the count is at least logged.
            log.warning("could not audit %d suppressed failure line(s) from %s: %s",
                        summary["count"], key, exc)

    def _summary(self, key: str, bucket: _Bucket) -> dict[str, Any]:
        return event(
            "auth_failure", outcome="suppressed", count=sum(bucket.held.values()),
            types=dict(sorted(bucket.held.items())), request={"remote_addr": key},
            window={"from": rfc3339(bucket.first), "to": rfc3339(bucket.last),
                    "seconds": round(bucket.last - bucket.first, 3)},
            limit={"burst": self._burst, "per_second": self._rate},
        )

    async def close(self) -> None:
        """Write every pending summary now (shutdown): held-back failures stay on record."""
        for key in [k for k, b in self._buckets.items() if b.held]:
            await self.write_summary(key)
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


def limiter_for(state: BrokerState) -> FailureAuditLimiter:
    """The limiter of a running broker: its state's, made with it (one per audit log;
    a reload keeps both, and so the buckets)."""
    return state.audit_limiter


async def close_limiter(state: BrokerState) -> None:
    """At shutdown, before the state's audit log closes: write the summaries still
    pending."""
    await state.audit_limiter.close()
