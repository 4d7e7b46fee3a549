"""What ``broker exec`` holds for the command and how it keeps it alive: the leases
(:class:`Held`), its own token (:class:`LoginToken`), the TTLs asked for, and the
:class:`Heartbeat` that renews them (the token first: a lease never outlives it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from broker.client import Client, ClientError
from broker.durations import format_duration
from broker.exec_process import _say, _when

__all__ = [
    "Heartbeat",
    "Held",
    "LoginToken",
    "first_ttl",
    "keep_token",
    "login_token_ttl",
    "renew_increment",
    "shorten_token",
]

#: how long one revocation may take before exec gives up on it (the server waits 30 s).
_REVOKE_TIMEOUT = 40.0
#: the least a JWT login's token is cut down to (login_token_ttl): the credentials are
#: issued before the heartbeat starts, and some backends take seconds per credential.
_LOGIN_TOKEN_FLOOR = 60


# --------------------------------------------------------------------------- TTL math


def first_ttl(heartbeat: int, budget: int | None) -> int | None:
    """TTL to ask for on issue: two heartbeats, or the budget when shorter.

    None asks for the role's default (heartbeat off and no ``--ttl``).
    """
    if heartbeat == 0:
        return budget
    return min(2 * heartbeat, budget) if budget else 2 * heartbeat


def renew_increment(now: float, end: float | None, heartbeat: int) -> int | None:
    """Increment for the next renewal: two heartbeats, cut so the lease ends by ``end``.

    None: renewing would not extend it any more (less than a second left).
    """
    if end is None:
        return 2 * heartbeat
    left = int(end - now)
    if left < 1:
        return None
    return min(2 * heartbeat, left)


def login_token_ttl(heartbeat: int) -> int:
    """The TTL a JWT login's token is cut down to (``renew-self``) right after the login.

    What the leases get (two heartbeats) plus one heartbeat of slack: the same
    lifetime the heartbeat renews the token to before each lease renewal
    (:meth:`Heartbeat.beat`), so a SIGKILLed exec leaves the token alive about one
    heartbeat longer than its leases instead of its whole ``token_ttl``. At least
    ``_LOGIN_TOKEN_FLOOR`` (a minute): the credentials are issued before the
    heartbeat starts, and the token must outlive that.
    """
    return max(3 * heartbeat, _LOGIN_TOKEN_FLOOR)



# --------------------------------------------------------------------------- credentials


@dataclass
class Held:
    """One credential exec holds for the command."""

    mount: str
    role: str
    plugin: str
    lease_id: str
    #: the credential itself: goes into the child's environment, never printed.
    data: dict[str, Any] = field(repr=False)
    renewable: bool = True
    #: wall-clock time the lease expires at, as far as we know.
    expire_at: float = 0.0
    #: renewals must not pass this (start + --ttl, the lease's max expiry); None: unknown.
    end: float | None = None
    #: the last renewal is done (budget reached), or renewing is pointless.
    final: bool = False
    dead: bool = False
    failing: bool = False

    @property
    def spec(self) -> str:
        return f"{self.mount}/{self.role}"


def _rfc3339(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class LoginToken:
    """What exec knows of its own broker token: its leases are capped at its expiry.

    Times are on exec's clock (from the TTLs the broker answers, which err early),
    except ``server_expire``, the broker's own, to compare with a lease's max expiry.
    """

    #: wall-clock time the token expires at, as far as we know.
    expire_at: float
    #: the latest it can be renewed to (its max TTL, or its parent token's expiry when
    #: sooner); None: no cap, or not known.
    max_expire_at: float | None = None
    renewable: bool = True
    #: renewing it failed for good (not renewable, revoked): leave it be.
    stuck: bool = False
    failing: bool = False
    #: how messages name it: exec's own login, or the token it was given.
    name: str = "login token"
    #: its expire_time as the broker wrote it (the broker's clock); None: not looked up.
    server_expire: float | None = None
    #: what sets ``max_expire_at``, as the warnings name it: "parent" (the parent
    #: token's expiry) or the setting ("token_max_ttl", ...); "": not looked up.
    limit: str = ""

    @classmethod
    def from_lookup(cls, data: Mapping[str, Any], now: float, name: str = "login token"
                    ) -> LoginToken | None:
        """From ``auth/token/lookup-self`` data asked for at ``now``; None for a token
        that never expires (root).

        How far renewals can take it: the broker's ``max_expire_time`` (its own max
        TTL, or its parent's expiry when that comes first: a token never outlives
        its parent); from Vault (no such field), ``creation_time`` + ``explicit_max_ttl``.
        """
        ttl = data.get("ttl")
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
            return None  # root, or a token without expiry: it caps nothing
        expire = now + ttl
        server_expire = _rfc3339(data.get("expire_time"))
        own = _own_max_expire(data)
        limit = _rfc3339(data.get("max_expire_time"))
        if limit is None:
            limit = own  # Vault, or a broker from before the field
        max_expire = None
        if limit is not None and server_expire is not None:
            # The max as a distance from the expiry: no clock skew. (creation_time is
            # whole seconds: a max from it errs early, never late.)
            max_expire = expire + (limit - server_expire)
        return cls(expire_at=expire, max_expire_at=max_expire,
                   renewable=bool(data.get("renewable")), name=name,
                   server_expire=server_expire, limit=_limit_name(data, name, limit, own))

    @property
    def reach(self) -> float | None:
        """The latest the token (and so any lease it caps) can live; None: unbounded."""
        return self.max_expire_at if self.renewable else self.expire_at

    def expired(self, now: float) -> bool:
        return now >= self.expire_at


def _own_max_expire(data: Mapping[str, Any]) -> float | None:
    """The token's own max expiry from lookup data, creation_time + explicit_max_ttl
    (the broker's clock); None: none shown."""
    explicit = data.get("explicit_max_ttl")
    created = data.get("creation_time")
    if (isinstance(explicit, int) and not isinstance(explicit, bool) and explicit > 0
            and isinstance(created, int | float) and not isinstance(created, bool)):
        return float(created) + explicit
    return None


def _limit_name(data: Mapping[str, Any], name: str, limit: float | None,
                own: float | None) -> str:
    """What holds the token's renewals back to ``limit``, as the warnings name it.

    A child whose limit comes well before its own max TTL is held back by its
    parent's expiry. A JWT login's own cap is its role's token_explicit_max_ttl
    when that is the one lookup shows and it is the limit, else token_max_ttl.
    """
    if limit is None:
        return ""
    # Within 1.5 s: creation_time is whole seconds.
    at_own = own is not None and abs(limit - own) < 1.5
    if data.get("orphan") is False and not at_own:
        return "parent"
    path = data.get("path")
    if name == "login token" or (isinstance(path, str) and path.startswith("auth/")
                                 and path.endswith("/login")):
        return "token_explicit_max_ttl" if at_own else "token_max_ttl"
    return "explicit_max_ttl"


def _token_cap_warning(spec: str, token: LoginToken, reach: float, *,
                       renewed: bool = True) -> str:
    at_max = token.max_expire_at is not None and reach >= token.max_expire_at - 1
    if token.renewable and not renewed and not at_max:
        return (f"warning: {spec}: the {token.name} expires at {_when(reach)} and "
                "--heartbeat 0 does not renew it, ending the lease before --ttl: the broker "
                "caps a lease at its token's expiry")
    if token.renewable and token.limit == "parent":
        return (f"warning: {spec}: the {token.name}'s parent token expires at {_when(reach)}, "
                "ending the lease before --ttl: a token never outlives its parent, and the "
                "broker caps a lease at its token's expiry")
    if token.renewable:
        setting = token.limit or ("token_max_ttl" if token.name == "login token"
                                  else "explicit_max_ttl")
        return (f"warning: {spec}: the {token.name}'s max TTL ({setting}) "
                f"ends the lease at {_when(reach)}, before --ttl: the broker caps a lease at "
                "its token's expiry")
    return (f"warning: {spec}: the {token.name} is not renewable and expires at "
            f"{_when(reach)}, ending the lease before --ttl: the broker caps a lease at its "
            "token's expiry")


# --------------------------------------------------------------------------- heartbeat


class Heartbeat:
    """Renews the leases every ``heartbeat`` seconds in a background thread.

    A thread, because the client is synchronous and the main thread must stay
    free to forward signals and wait for the command.
    """

    def __init__(self, client: Client, held: Sequence[Held], heartbeat: int,
                 token: LoginToken | None = None) -> None:
        self.client, self.held, self.heartbeat = client, held, heartbeat
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is None:
            return  # never started (a signal right before start()): nothing to wait for
        self._thread.join(self.heartbeat + _REVOKE_TIMEOUT)

    def _run(self) -> None:
        next_at = time.monotonic() + min(self.heartbeat, self._soon())
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self.beat()
            # A slow round must not make the next ones come in a burst.
            next_at = max(next_at + self.heartbeat, time.monotonic())
            next_at = min(next_at, time.monotonic() + self._soon())

    def _soon(self) -> float:
        """Seconds until a lease must be renewed before the next heartbeat would come.

        A lease capped at a token's expiry can end sooner than two heartbeats
        (a token_ttl of 4s under the default 30s heartbeat): then the next round
        comes halfway to that end, when the token and the lease can be renewed.
        """
        now = time.time()
        ends = [c.expire_at for c in self.held
                if c.renewable and not c.final and not c.dead and not c.failing]
        if not ends:
            return float(self.heartbeat)
        return max(0.5, (min(ends) - now) / 2)

    def beat(self) -> None:
        live = [c for c in self.held if c.renewable and not c.final and not c.dead]
        if live and self.token is not None:
            # First the token: a lease renewal may not pass its token's expiry.
            now = time.time()
            reach = now + 2 * self.heartbeat
            ends = [c.end for c in live]
            if all(e is not None for e in ends):
                reach = min(reach, max(e for e in ends if e is not None))
            # One heartbeat of slack: the leases are renewed a moment after the token.
            keep_token(self.client, self.token, reach + self.heartbeat,
                       timeout=max(1.0, float(self.heartbeat)))
        for cred in live:
            if self._stop.is_set():
                return
            self._renew(cred)

    def _renew(self, cred: Held) -> None:
        now = time.time()
        increment = renew_increment(now, cred.end, self.heartbeat)
        if increment is None:
            cred.final = True
            return
        try:
            resp = self.client.request(
                "PUT", "sys/leases/renew", json={"lease_id": cred.lease_id, "increment": increment},
                timeout=max(1.0, float(self.heartbeat)))
        except ClientError as exc:
            self._failed(cred, exc, now)
            return
        cred.expire_at = now + int((resp or {}).get("lease_duration") or increment)
        if cred.failing:
            _say(f"renewing {cred.lease_id} works again")
            cred.failing = False
        if increment < 2 * self.heartbeat:
            cred.final = True
            _say(f"{cred.spec}: lease reaches the end of its budget; it expires at "
                 f"{_when(cred.expire_at)}")

    def _failed(self, cred: Held, exc: ClientError, now: float) -> None:
        text = str(exc)
        if exc.status == 400 and "max TTL" in text:
            cred.final = True
            _say(f"warning: {cred.spec}: {cred.lease_id} cannot be renewed past its max TTL; "
                 f"it expires at {_when(cred.expire_at)}")
        elif exc.status == 400:
            # Revoked, expired or unknown: the command's credential no longer works.
            cred.dead = True
            _say(f"WARNING: lease {cred.lease_id} ({cred.spec}) is DEAD: {text}. "
                 "The command's credential no longer works.")
        else:
            cred.failing = True
            left = max(0, int(cred.expire_at - now))
            _say(f"warning: cannot renew {cred.lease_id}: {text}; retrying every "
                 f"{format_duration(self.heartbeat)}; it expires in {left}s unless a renewal "
                 "gets through")


def keep_token(client: Client, token: LoginToken, until: float, *,
               timeout: float = _REVOKE_TIMEOUT) -> None:
    """Renew ``token`` (``renew-self``) if it would expire before ``until``.

    As far as its max TTL allows: the leases it caps then follow it (the broker
    moves a token-capped lease's max expiry on its next renewal). A token that
    cannot be renewed is left alone; the leases end with it, as warned at start-up.
    """
    now = time.time()
    # Past the expiry we know of, the token is gone, unless a renewal failed
    # without an answer (a timeout): the broker may have renewed it, so keep
    # trying until it answers either way.
    if token.stuck or token.expire_at >= until or (token.expired(now) and not token.failing):
        return
    if not token.renewable or (token.max_expire_at is not None
                               and token.expire_at >= token.max_expire_at - 1):
        return
    increment = max(1, int(until - now) + 1)
    try:
        resp = client.request("PUT", "auth/token/renew-self", json={"increment": increment},
                              timeout=timeout)
    except ClientError as exc:
        if exc.status in {400, 403}:
            # Not renewable, revoked or expired: retrying will not change it.
            token.stuck = True
            _say(f"warning: cannot renew the {token.name}: {exc}; the leases end with it at "
                 f"{_when(token.expire_at)}")
        elif not token.failing:
            token.failing = True
            _say(f"warning: cannot renew the {token.name}: {exc}; retrying; it and the leases "
                 f"it caps expire at {_when(token.expire_at)} unless a renewal gets through")
        return
    granted = ((resp or {}).get("auth") or {}).get("lease_duration")
    if isinstance(granted, int) and not isinstance(granted, bool) and granted > 0:
        token.expire_at = now + granted
    if token.failing:
        _say(f"renewing the {token.name} works again")
        token.failing = False


def shorten_token(client: Client, token: LoginToken, ttl: int) -> None:
    """Cut ``token`` down to ``ttl`` seconds from now (``renew-self`` with a small
    increment: the broker sets the expiry to now + increment, even when sooner).

    Only ever shortens: a token that expires sooner already, or that cannot be
    renewed (the heartbeat could not keep it alive), is left as it is. If the
    broker refuses, exec goes on with the token's whole TTL, and says so.
    """
    now = time.time()
    if not token.renewable or token.expire_at - now <= ttl + 1:
        return
    try:
        resp = client.request("PUT", "auth/token/renew-self", json={"increment": ttl})
    except ClientError as exc:
        _say(f"warning: could not shorten the {token.name} to {format_duration(ttl)}: {exc}; "
             f"if exec is killed it stays valid until {_when(token.expire_at)}")
        return
    granted = ((resp or {}).get("auth") or {}).get("lease_duration")
    if isinstance(granted, int) and not isinstance(granted, bool) and granted > 0:
        token.expire_at = now + granted
