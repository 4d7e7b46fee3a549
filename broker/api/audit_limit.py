"""Limits on the audit lines anyone can cause: unauthenticated failures, and the
uses of a token that has ended.

Anyone who can reach the port can send a bad token or a bad JWT login, and each
such request wrote its ``request`` and ``auth_failure`` lines, fsync'd when
``[audit] fsync`` is on: a cheap way to fill the disk or to bury the record of an
attack under its own noise. Those lines now pass through a token bucket per client
address: BURST failed requests at once, then RATE per second. What the bucket
holds back is not lost: the first one held back starts a window of SUMMARY_AFTER
seconds (the time the bucket takes to fill up again), and at its end ONE
``auth_failure`` line with outcome ``suppressed`` says how many lines were left
out, of which types, from which address and over what time. A request refused
before any handler looks at it (a path or method the broker does not have, a
response-wrapping header, a NUL in the URL) writes its ``request`` and ``response``
lines through the same bucket.

A ``reuse_attempt`` (a revoked or expired token's use) is not counted in its
client's bucket: it names the token that leaked (broker/api/common.py
``authenticate``), and a flood of bad tokens from the same address must not hide
it. It has a bucket of its own per token accessor (:class:`ReuseAuditFold`): the
first REUSE_BURST uses of one ended token are audited line by line, then
REUSE_BURST per REUSE_WINDOW; what that holds back is written as ONE
``reuse_attempt`` line with outcome ``suppressed`` at the end of the window, with
the accessor (as its HMAC, as every line writes it), the count, the time span and
the client addresses seen. So whoever holds an ended token cannot write unlimited
lines with it, and the first use of every ended token is always on record in full,
even past MAX_ACCESSORS ended tokens tried at once (:class:`ReuseAuditFold`).

The answers do not change (still 403, 400, 404, 405), and nothing done with a
valid token is ever held back: issue, renew, revoke, policy denials and every other
authenticated action are audited line by line, as before.

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

__all__ = [
    "BURST",
    "RATE",
    "REUSE_BURST",
    "REUSE_WINDOW",
    "SUMMARY_AFTER",
    "FailureAuditLimiter",
    "RateBuckets",
    "ReuseAuditFold",
    "client_key",
    "close_limiter",
    "limiter_for",
]

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

#: uses of one ended token audited line by line at once; then as many per REUSE_WINDOW.
REUSE_BURST = 20
#: seconds: the refill time of an accessor's bucket, and from the first use it held
#: back to the summary line.
REUSE_WINDOW = 60.0
#: accessors tracked at most (as MAX_CLIENTS); past that, one shared bucket.
MAX_ACCESSORS = 1_000
#: accessors the shared bucket of the tokens past MAX_ACCESSORS remembers having let
#: through (a set of short strings: a few MB at most).
MAX_SEEN = 50_000
OTHER_TOKENS = "other tokens"
#: client addresses a summary lists at most (``remote_addrs_capped`` says if more).
MAX_REMOTES = 10


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
class Held:
    """What a bucket held back since its last summary."""

    types: Counter[str] = field(default_factory=Counter)  # held-back events by type
    first: float = 0.0  # wall-clock time of the first held-back one
    last: float = 0.0
    #: client addresses of the held-back ones, the first MAX_REMOTES (if asked for)
    remotes: list[str] = field(default_factory=list)
    remotes_capped: bool = False
    #: fields of the last held-back event that its summary repeats (a token's state)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(self.types.values())

    def window(self) -> dict[str, Any]:
        return {"from": rfc3339(self.first), "to": rfc3339(self.last),
                "seconds": round(self.last - self.first, 3)}


@dataclass
class _Bucket:
    tokens: float
    stamp: float  # monotonic time of the last refill
    held: Held = field(default_factory=Held)
    timer: asyncio.TimerHandle | None = None


class RateBuckets:
    """Token buckets by key (a client address, a token accessor): ``burst`` at once,
    then ``rate`` a second. What a bucket holds back is counted, and handed to
    :meth:`_due` ``summary_after`` seconds after the first one held back.

    At most ``max_keys`` buckets (MAX_CLIENTS unless given): full ones (idle keys)
    are dropped first, and past that new keys share the ``overflow_key`` bucket.
    """

    def __init__(self, *, burst: int, rate: float, summary_after: float,
                 max_keys: int | None = None, overflow_key: str = OVERFLOW_KEY) -> None:
        self._burst = burst
        self._rate = rate
        self._summary_after = summary_after
        self._max_keys = max_keys
        self._overflow_key = overflow_key
        self._buckets: dict[str, _Bucket] = {}

    @property
    def limit(self) -> dict[str, Any]:
        """The limit, as a summary line states it."""
        return {"burst": self._burst, "per_second": round(self._rate, 3)}

    def admit(self, key: str) -> bool:
        """Whether ``key`` may have one more event audited (one token of its bucket
        taken); False: :meth:`hold` it instead."""
        now = time.monotonic()
        _, bucket = self._bucket(key, now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
        bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        return False

    def hold(self, key: str, type_: str, *, remote: str | None = None,
             **details: Any) -> None:
        """Count an event (of ``type_``, from client address ``remote``) of ``key`` that
        is not audited now, for the summary due ``summary_after`` seconds after the
        first one held."""
        key, bucket = self._bucket(key, time.monotonic())  # (key: maybe the overflow's)
        held = bucket.held
        held.types[type_] += 1
        held.last = time.time()
        held.first = held.first or held.last
        if remote is not None and remote not in held.remotes:
            if len(held.remotes) < MAX_REMOTES:
                held.remotes.append(remote)
            else:
                held.remotes_capped = True
        held.details.update(details)
        if bucket.timer is None:
            bucket.timer = asyncio.get_running_loop().call_later(
                self._summary_after, self._due, key)

    def take(self, key: str) -> Held | None:
        """What ``key``'s bucket held back (None if nothing), its count then reset."""
        bucket = self._buckets.get(key)
        if bucket is None or not bucket.held.types:
            return None
        held, bucket.held = bucket.held, Held()
        if bucket.timer is not None:
            bucket.timer.cancel()
            bucket.timer = None
        return held

    def pending(self) -> list[str]:
        """The keys whose buckets hold something back."""
        return [key for key, bucket in self._buckets.items() if bucket.held.types]

    def _due(self, key: str) -> None:
        """The summary of ``key`` is due (a timer's callback): write it."""
        raise NotImplementedError

    def _bucket(self, key: str, now: float) -> tuple[str, _Bucket]:
        """The bucket of ``key`` (made full if new) and the key it is kept under: the
        overflow key when the others are all in use."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            return key, bucket
        max_keys = MAX_CLIENTS if self._max_keys is None else self._max_keys
        if len(self._buckets) >= max_keys:
            self._drop_idle(now)
            if len(self._buckets) >= max_keys:
                key = self._overflow_key
                if key in self._buckets:
                    return key, self._buckets[key]
        bucket = self._buckets[key] = _Bucket(tokens=self._burst, stamp=now)
        return key, bucket

    def _drop_idle(self, now: float) -> None:
        # A bucket full again with nothing held back is the same as no bucket.
        idle = [key for key, b in self._buckets.items()
                if not b.held.types and b.tokens + (now - b.stamp) * self._rate >= self._burst]
        for key in idle:
            del self._buckets[key]


class _AuditSummaries(RateBuckets):
    """Token buckets whose summaries are audit lines (:meth:`_summary`)."""

    def __init__(self, audit: AuditLog, **limits: Any) -> None:
        super().__init__(**limits)
        self._audit = audit
        self._writes: set[asyncio.Task[None]] = set()

    def _due(self, key: str) -> None:
        task = asyncio.ensure_future(self.write_summary(key))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def write_summary(self, key: str) -> None:
        """Write the summary line of what ``key``'s bucket held back, if anything."""
        held = self.take(key)
        if held is None:
            return
        try:
            await self._audit.write(self._summary(key, held))
        except Exception as exc:  # in a timer's task: nobody else would see it
            # The audit log is down (health says so); the count is at least logged.
            log.warning("could not audit %d suppressed line(s) of %s: %s", held.count,
                        self._shown(key), exc)

    def _summary(self, key: str, held: Held) -> dict[str, Any]:
        raise NotImplementedError

    def _shown(self, key: str) -> str:
        """``key`` as the broker's log may show it."""
        return key

    async def close(self) -> None:
        """Write every pending summary now (shutdown): held-back lines stay on record."""
        for key in self.pending():
            await self.write_summary(key)
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


class ReuseAuditFold(_AuditSummaries):
    """The uses of ended tokens, by token accessor: REUSE_BURST audited line by line
    (each ``request`` and ``reuse_attempt`` pair), then REUSE_BURST per REUSE_WINDOW;
    the rest summed up in one ``reuse_attempt`` / ``suppressed`` line per window.

    MAX_ACCESSORS bounds the memory: past that many accessors with a bucket in use
    (a token tried in the last REUSE_WINDOW), new ones share one bucket. That bucket
    holds back only uses of tokens it has let through already: the first use of
    every token is written in full all the same, or whoever held MAX_ACCESSORS ended
    tokens (each made and ended by an audited action) could hide a leaked token's
    use among them. The accessors it has let through are remembered up to
    MAX_SEEN, then forgotten all at once (forgetting only writes a line more).
    """

    def __init__(self, audit: AuditLog) -> None:
        # The module's figures as they are now (tests shorten the window).
        super().__init__(audit, burst=REUSE_BURST, rate=REUSE_BURST / REUSE_WINDOW,
                         summary_after=REUSE_WINDOW, max_keys=MAX_ACCESSORS,
                         overflow_key=OTHER_TOKENS)
        #: accessors the shared bucket has let through (their first use written).
        self._seen: set[str] = set()

    def admit(self, key: str) -> bool:
        own = key in self._buckets
        if super().admit(key):
            if not own and key not in self._buckets:  # through the shared bucket
                self._remember(key)
            return True
        if key in self._buckets or key in self._seen:
            return False  # its own bucket, or a token the shared one let through: held
        self._remember(key)  # a first use: written, whatever the shared bucket holds
        return True

    def _remember(self, key: str) -> None:
        if len(self._seen) >= MAX_SEEN:
            self._seen.clear()
        self._seen.add(key)

    def _summary(self, key: str, held: Held) -> dict[str, Any]:
        # token_accessor: the writer writes it as its HMAC, as on every reuse_attempt line.
        # The shared bucket's held uses are of several tokens, in several states: no
        # one token's state (details) is theirs.
        who: dict[str, Any] = ({"other_tokens": True} if key == OTHER_TOKENS
                               else {"token_accessor": key, **held.details})
        return event(
            "reuse_attempt", outcome="suppressed", count=held.count,
            types=dict(sorted(held.types.items())), **who,
            remote_addrs=held.remotes, remote_addrs_capped=held.remotes_capped,
            window=held.window(), limit=self.limit,
        )

    def _shown(self, key: str) -> str:
        # Never an accessor in the broker's log: it lets its holder look the token up.
        return OTHER_TOKENS if key == OTHER_TOKENS else "an ended token"


class FailureAuditLimiter(_AuditSummaries):
    """Token buckets per client for one audit log; see the module doc. Its ``reuse``
    fold limits the lines of ended tokens' uses, per accessor."""

    def __init__(self, audit: AuditLog, *, burst: int = BURST, rate: float = RATE,
                 summary_after: float = SUMMARY_AFTER) -> None:
        super().__init__(audit, burst=burst, rate=rate, summary_after=summary_after)
        self.reuse = ReuseAuditFold(audit)

    def _summary(self, key: str, held: Held) -> dict[str, Any]:
        return event(
            "auth_failure", outcome="suppressed", count=held.count,
            types=dict(sorted(held.types.items())), request={"remote_addr": key},
            window=held.window(), limit=self.limit,
        )

    async def close(self) -> None:
        await super().close()
        await self.reuse.close()


def limiter_for(state: BrokerState) -> FailureAuditLimiter:
    """The limiter of a running broker: its state's, made with it (one per audit log;
    a reload keeps both, and so the buckets)."""
    return state.audit_limiter


async def close_limiter(state: BrokerState) -> None:
    """At shutdown, before the state's audit log closes: write the summaries still
    pending."""
    await state.audit_limiter.close()
