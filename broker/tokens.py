"""Tokens: created random, returned once, stored only as a SHA-256 hash.

A token is looked up by the hash of what the client presents; the hash is an
index key, so no secret is ever compared byte by byte in Python. Where two
secrets are compared in memory (the dev root token id) it is constant-time.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from broker.durations import format_duration
from broker.errors import BadRequest, PermissionDenied, ReuseAttempt
from broker.lease import Token, TokenState
from broker.store.base import LeaseStore

__all__ = [
    "DeadToken",
    "LoginRole",
    "SpentToken",
    "TokenIdTaken",
    "TokenManager",
    "check_token_id",
    "hash_token",
    "new_accessor",
    "with_default_policy",
]

TOKEN_PREFIX = "brk."  # noqa: S105 - a prefix, not a secret
#: Shortest token id an operator may choose (``--dev-root-token-id``); "root" is allowed.
MIN_TOKEN_ID_LEN = 8


def hash_token(token: str) -> str:
    """The store's key for ``token``; never raises, whatever the client sent.

    aiohttp decodes a header's non-UTF-8 bytes to lone surrogates
    (surrogateescape), and a JSON body may spell one (``"\\ud800"``); plain
    ``encode()`` raised on both, and every authenticated endpoint answered 500.
    surrogatepass maps every str to bytes, the same str always to the same
    bytes; a value no token has simply matches nothing (403 invalid token).
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def with_default_policy(policies: Iterable[str]) -> list[str]:
    """A token's policies as Vault records and shows them: sorted, ``default`` included.

    Vault adds ``default`` to every token it creates unless the token has
    ``root`` (policyutil.SanitizePolicies); the policy engine here has always
    evaluated every token as holding it (``PolicySet.capabilities``), so
    naming it grants nothing new. Rows stored before it was named get it added
    when shown.
    """
    names = set(policies)
    if "root" not in names:
        names.add("default")
    return sorted(names)


def check_token_id(token_id: str) -> None:
    """BadRequest unless ``token_id`` may be chosen as a token's value.

    Never repeats the value: it is a secret, and this message is logged and audited.
    """
    if len(token_id) < MIN_TOKEN_ID_LEN and token_id != "root":  # noqa: S105
        raise BadRequest(
            f"a chosen token id must be at least {MIN_TOKEN_ID_LEN} characters (or 'root')")
    if not all(c.isprintable() and not c.isspace() for c in token_id):
        # It could never be sent back: HTTP strips a header value's outer
        # spaces and refuses control characters.
        raise BadRequest("a chosen token id must not contain spaces or control characters")


@dataclass(frozen=True)
class LoginRole:
    """A login token's role as the running config has it, for a renewal: what its
    auth method would give a login now."""

    #: "JWT role 'deploy' of auth/github", for messages.
    label: str
    #: its ``token_period`` (0: not periodic).
    period: int
    #: its hard limit on a token's life from creation (``token_cap``); None: none.
    cap: int | None


class TokenIdTaken(BadRequest):
    """A chosen token id that another token (live or ended) already has: 400."""

    def __init__(self) -> None:
        super().__init__("a token with this id already exists; choose another id "
                         "(or send none for a random one)")


class DeadToken(ReuseAttempt):
    """A revoked or expired token was presented: 403, audited as a reuse attempt."""

    status = 403

    def __init__(self, token: Token, message: str | None = None) -> None:
        super().__init__(message or f"permission denied: token is {token.state.value}")
        self.token = token


class SpentToken(DeadToken):
    """A use-limited token with no use left: 403, audited as a reuse attempt.

    Shown as revoked: it is, or is about to be (the request that took its last use
    revokes it as it ends), and a later use finds it so.
    """

    def __init__(self, token: Token) -> None:
        token.state = TokenState.REVOKED
        super().__init__(token, "permission denied: the token has no uses left (num_uses)")


def new_accessor() -> str:
    """A new token's accessor: random, not derived from the token."""
    return secrets.token_urlsafe(18)


class TokenManager:
    def __init__(self, store: LeaseStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    async def create(
        self,
        *,
        policies: Sequence[str],
        ttl: int | None,
        max_ttl: int | None = None,
        display_name: str = "",
        metadata: Mapping[str, str] | None = None,
        parent: Token | None = None,
        renewable: bool = True,
        token_id: str | None = None,
        accessor: str | None = None,
        path: str = "",
        num_uses: int = 0,
        period: int = 0,
    ) -> tuple[str, Token]:
        """Create a token; returns (the token itself, its record). The token is shown once.

        ``num_uses``: how many requests it may make (0: no limit), as Vault's.
        ``period``: a periodic token's period (0: not periodic), as Vault's: its TTL is
        the period (``ttl`` is not used), every renewal sets it back to the period,
        and it has no max expiry but ``max_ttl`` (its explicit_max_ttl), if given.
        """
        if token_id is not None:
            check_token_id(token_id)
            # Not an overwrite, nor a second row: the existing token stays as it was.
            if await self.store.token_by_hash(hash_token(token_id)) is not None:
                raise TokenIdTaken()
        token = token_id or TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        life = period or ttl  # a periodic token's TTL is its period, as in Vault
        expire = now + life if life else None
        cap = now + max_ttl if max_ttl else None
        if parent is not None and parent.expire_time is not None:
            # A child never outlives its parent: revoking or expiring the
            # parent ends the child and, with it, every lease it owns.
            expire = min(expire or parent.expire_time, parent.expire_time)
            # The cap stays the child's own (lookup shows it as explicit_max_ttl,
            # as Vault shows the one asked for): renewals are held to the
            # parent's current expiry where they happen (renew: _parent_expiry).
            # Only a token with no cap of its own (a root token created without
            # a ttl by an expiring root token) takes the parent's, so it is never
            # renewable without end once revoke-orphan freed it. A periodic token
            # keeps none but its own: renewed without end is what it is for, and
            # while the parent lives, renewals are held to its current expiry.
            cap = cap if cap is not None or period else parent.expire_time
        if cap is not None:
            # An explicit max TTL without a TTL: the token lives that long, not forever.
            expire = cap if expire is None else min(expire, cap)
        record = Token(
            accessor=accessor or new_accessor(),
            token_hash=hash_token(token),
            policies=with_default_policy(policies),
            created=now,
            expire_time=expire,
            display_name=display_name,
            metadata=dict(metadata or {}),
            parent=parent.accessor if parent else None,
            max_expire_time=cap,
            renewable=renewable and expire is not None,
            creation_ttl=_granted(now, expire),
            path=path,
            num_uses=num_uses,
            period=period,
        )
        try:
            await self.store.insert_token(record)
        except Exception:
            # Two creates with the same chosen id at once: the store's unique
            # token_hash refuses the second (sqlite3.IntegrityError, asyncpg's
            # UniqueViolationError), and the first token is untouched. That is
            # the caller's 400, not a 500; anything else goes on up.
            if token_id is not None:
                other = await self.store.token_by_hash(record.token_hash)
                if other is not None and other.accessor != record.accessor:
                    raise TokenIdTaken() from None
            raise
        return token, record

    async def resolve(self, token: str | None, *, consume: bool = True) -> Token:
        """The live token for ``token``, one of its uses taken if it has a use limit;
        PermissionDenied if missing/unknown, DeadToken if dead (SpentToken: used up).

        A token without a use limit (nearly all) costs the one read, as before.
        """
        if not token:
            raise PermissionDenied("permission denied: missing token (X-Vault-Token header)")
        record = await self.store.token_by_hash(hash_token(token))
        if record is None:
            raise PermissionDenied("permission denied: invalid token")
        if record.state is TokenState.ACTIVE and record.expire_time is not None:
            if record.expire_time <= self.clock():
                # Refused as expired, but not ended here: the token-expiry job ends
                # it together with queueing its leases, in one store write.
                record.state = TokenState.EXPIRED
        if record.state is not TokenState.ACTIVE:
            raise DeadToken(record)
        if record.num_uses:
            if consume:
                await self._use(record)
            elif record.num_uses < 0:  # its last use taken: as good as revoked
                raise SpentToken(record)
        return record

    async def _use(self, record: Token) -> None:
        """Take one of ``record``'s uses in the store (one conditional write, so concurrent
        requests on any worker or replica never get more than it had); SpentToken if none
        is left. ``record.num_uses`` becomes what is left, -1 after the last one."""
        left = None if record.num_uses < 0 else await self.store.use_token(record.accessor)
        if left is None:
            raise SpentToken(record)
        record.num_uses = left

    async def descendants(self, accessor: str) -> list[str]:
        """``accessor`` and every active token below it, parents first."""
        order, todo = [], [accessor]
        while todo:
            current = todo.pop()
            order.append(current)
            todo.extend(await self.store.child_tokens(current))
        return order

    async def renew(self, token: Token, increment: int | None, *,
                    warnings: list[str] | None = None,
                    system_max_ttl: int | None = None,
                    role: LoginRole | None = None) -> tuple[Token, int]:
        """Extend ``token`` by ``increment`` (else the TTL it was created with) from now,
        capped at its max expiry and at its parent's expiry. Returns the token and the
        TTL granted, in seconds. A periodic token is extended by its period, whatever
        the increment, as Vault does (its docs: the increment is not honoured).

        ``system_max_ttl``: the system max TTL now (``[tokens] max_ttl``), applied at
        every renewal as Vault's ``CalculateTTL`` does, so a reload that lowered it
        shortens the next renewal: a periodic token's period is capped at it (the
        stored period is kept: lookups show it, as Vault's, and a later raise gives it
        back); any other token is capped at its creation plus it.

        ``role``: a login token's role as the running config has it (Vault's auth
        method re-reads its role at every renewal): its ``token_period`` caps the
        period, its max TTLs cap the token's life from its creation. Only lower: a
        raised limit does not lengthen a token beyond what it was given.

        A limit already passed is a 400, Vault's "past the max TTL, cannot renew". A
        capped renewal appends Vault's warning to ``warnings`` ("TTL of ... exceeded
        the effective max_ttl of ...; TTL value is capped accordingly"), naming the
        limit that applied (a capped period: "period of ... exceeded ...").
        """
        if not token.renewable or token.expire_time is None:
            raise BadRequest("token is not renewable")
        now = self.clock()
        period = token.period
        ceilings = [(system_max_ttl, "[tokens] max_ttl, lowered since the token was created")]
        if role is not None:
            ceilings.append((role.period, f"the token_period of {role.label} now"))
        for ceiling, why in ceilings:
            if period and ceiling and period > ceiling:
                if warnings is not None:
                    warnings.append(
                        f'period of "{format_duration(period)}" exceeded the effective '
                        f'max_ttl of "{format_duration(ceiling)}"; period value is capped '
                        f"accordingly (the limit is {why})")
                period = ceiling
        parent_end = await self._parent_expiry(token)
        if parent_end is not None and parent_end <= now:
            raise BadRequest("token cannot be renewed: its parent token has expired, "
                             "and a token ends with its parent")
        # (end, what it is), in the order a tie names them.
        limits: list[tuple[float, str]] = []
        if parent_end is not None:
            limits.append((parent_end, f"its parent token's expiry ({_when(parent_end)}): "
                                       "a token never outlives its parent"))
        if token.max_expire_time is not None:
            limits.append((token.max_expire_time, _max_ttl_reason(token)))
        if system_max_ttl and not token.period:
            # Unchanged, never before the token's own max expiry.
            end = token.created + system_max_ttl
            limits.append((end, _from_creation("[tokens] max_ttl", system_max_ttl, end,
                                               "lowered since the token was created")))
        if role is not None and role.cap:
            end = token.created + role.cap
            limits.append((end, _from_creation(f"the max TTL of {role.label}", role.cap, end,
                                               "as the running config has it")))
        for end, why in limits:
            if end <= now:
                raise BadRequest(f"past the max TTL, cannot renew (the limit is {why})")
        ttl = period or increment or _base_ttl(token)
        wanted = now + ttl
        expire = wanted
        if limits:
            limit = min(end for end, _ in limits)
            reason = next(why for end, why in limits if end <= limit + 0.5)
            if wanted > limit + 0.5:  # half a second of clock slack, as lease renewals
                expire = limit
                if warnings is not None:
                    warnings.append(
                        f'TTL of "{format_duration(ttl)}" exceeded the effective max_ttl of '
                        f'"{format_duration(_granted(now, limit))}"; TTL value is capped '
                        f"accordingly (the limit is {reason})")
            else:
                expire = min(wanted, limit)
        await self.store.renew_token(token.accessor, expire_time=expire)
        token.expire_time = expire
        return token, _granted(now, expire)

    async def _parent_expiry(self, token: Token) -> float | None:
        """When ``token``'s parent expires, if it has a live parent that expires.

        Revoking or expiring the parent ends the child, so a renewal past it
        would only be a promise the broker does not keep. A parent that
        revoke-orphan ended no longer limits the child.
        """
        if token.parent is None:
            return None
        parent = await self.store.token_by_accessor(token.parent)
        if parent is None or parent.state is not TokenState.ACTIVE:
            return None
        return parent.expire_time


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _max_ttl_reason(token: Token) -> str:
    """The limit a token's ``max_expire_time`` stands for, as an error message names it."""
    assert token.max_expire_time is not None
    life = format_duration(max(round(token.max_expire_time - token.created), 0))
    return (f"the token's max TTL ({life} from its creation, "
            f"until {_when(token.max_expire_time)})")


def _from_creation(what: str, seconds: int, end: float, why: str) -> str:
    """A limit of ``seconds`` from a token's creation (ending at ``end``), as a message
    names it."""
    return (f"{what} ({format_duration(seconds)} from the token's creation, "
            f"until {_when(end)}), {why}")


def _granted(now: float, expire: float | None) -> int:
    """The TTL a token gets at ``now``, in whole seconds; 0 if it never expires.

    Computed from the grant's own clock read, not from a later one: measuring
    ``expire - clock()`` a moment after the grant reported 3599 for a 1h token.
    (The rounding absorbs float noise in ``(now + ttl) - now``.)
    """
    if expire is None:
        return 0  # Vault shows a TTL of 0 for a token that never expires
    return max(int(round(expire - now, 3)), 0)


def _base_ttl(token: Token) -> int:
    """What a renewal without an increment extends by: the token's creation TTL."""
    if token.creation_ttl:
        return token.creation_ttl
    # A row from before the store kept the creation TTL (NULL). For a token never
    # renewed, expire_time - created is exactly that TTL; after renewals it is
    # longer (the old growth), but still bounded by max_expire_time, and only
    # tokens from before the upgrade are affected. Nothing closer is stored.
    assert token.expire_time is not None
    return max(round(token.expire_time - token.created), 1)
