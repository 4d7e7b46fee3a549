"""``broker exec``: run a command with fresh credentials in its environment, then revoke them.

    broker exec [--ttl 15m] [--heartbeat 30s] pg/readonly [aws/deploy ...] -- ./migrate.sh

The guarantee CI pipelines rely on: the credentials die with the command,
however the command (or ``broker exec`` itself) ends.

- Normal exit, failure, or a SIGINT/SIGTERM/SIGHUP/SIGQUIT to ``broker exec``
  (forwarded to the command; exec waits for it): every lease is revoked, and
  the login token too when exec logged in itself. SIGUSR1/SIGUSR2 are
  forwarded too; the command decides whether they end it.
- ``broker exec`` SIGKILLed, or its machine gone: the leases were issued with a
  TTL of only two heartbeats and renewed every heartbeat, so they expire (and
  the broker revokes them) within about two heartbeats. A JWT login's token is
  cut down right after the login to what the leases get plus one heartbeat
  (:func:`login_token_ttl`: three heartbeats, at least a minute) and renewed
  by the heartbeat, so it does not outlive them by its whole ``token_ttl``
  either (not with ``--heartbeat 0`` or ``--no-revoke``, nor a token exec was given).
- ``--ttl`` is the overall budget: renewals stop so that no lease outlives it.
- A lease never outlives the token that issued it (the broker caps it at the
  token's expiry), so the heartbeat renews exec's token too (``renew-self``,
  the JWT login's or a ``BROKER_TOKEN``) whenever it would otherwise end the
  leases before the budget; it cannot go past the token's own max TTL
  (``token_max_ttl``) nor, for a child token, its parent token's expiry (lookup's
  ``max_expire_time`` says which comes first), and exec warns at start-up when
  that comes before the budget.

Variable names: each credential's fields get the names its backend's tools
read (``PGUSER``/``PGPASSWORD``, ``MYSQL_USER``/``MYSQL_PWD``, ``AWS_*``). When
a later credential would set a name an earlier one already set (two postgres
mounts), all its names get ``NAME_<MOUNT>_<ROLE>`` instead (``PGUSER_PG2_READONLY``):
the first credential listed keeps the plain names the tools read. Every lease
id is in ``BROKER_LEASE_IDS``, comma-separated, in the order given.

The rest of exec's environment is inherited, except the ``--jwt-env`` variable
(the JWT logs in as the whole job), the broker token variables
(``BROKER_TOKEN``, ``BROKER_TOKEN_FILE``, ``VAULT_TOKEN``: the command gets its
leases, not the power to issue more, and a token would outlive the leases exec revokes; unless
``--pass-token``) and a plain name the credential leaves empty (an IAM user's
``AWS_SESSION_TOKEN``: a stale one would break its key). exec is not dumpable, so
the command cannot read what it keeps from it in ``/proc/$PPID/environ`` either.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from broker.cli.common import (
    ENV_NAMES,
    SERVER_ENV_NAMES,
    OperationError,
    UsageError,
    _env_key,
    env_for,
    resolve_settings,
)
from broker.cli.mount_info import mount_plugins
from broker.client import Client, ClientError
from broker.durations import format_duration, parse_duration

__all__ = [
    "LEASE_IDS_ENV",
    "TOKEN_VARIABLES",
    "ExecOptions",
    "Held",
    "LoginToken",
    "build_env",
    "cmd_exec",
    "configure_parser",
    "exit_code",
    "first_ttl",
    "login_token_ttl",
    "options_from_args",
    "renew_increment",
    "shorten_token",
    "split_command",
    "stale_names",
]

LEASE_IDS_ENV = "BROKER_LEASE_IDS"
DEFAULT_HEARTBEAT = 30
#: signals forwarded to the command. SIGUSR1/SIGUSR2 too: commands use them
#: (reopen logs, dump state), and their default action would kill exec without
#: revoking anything.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)
#: signals a terminal sends to its whole foreground process group (Ctrl-C, Ctrl-\).
_TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGQUIT)
#: how long one revocation may take before exec gives up on it (the server waits 30 s).
_REVOKE_TIMEOUT = 40.0
#: the least a JWT login's token is cut down to (login_token_ttl): the credentials are
#: issued before the heartbeat starts, and some backends take seconds per credential.
_LOGIN_TOKEN_FLOOR = 60


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ExecOptions:
    """What ``broker exec`` was asked to do, validated."""

    specs: tuple[tuple[str, str], ...]
    command: tuple[str, ...]
    #: overall budget in seconds; None: as long as each role's max TTL allows.
    ttl: int | None = None
    #: seconds between renewals; 0 turns the heartbeat off.
    heartbeat: int = DEFAULT_HEARTBEAT
    revoke: bool = True
    #: the identity token to log in with (never printed).
    jwt: str | None = field(default=None, repr=False)
    #: the variable --jwt-env read the JWT from: kept out of the command's environment.
    jwt_env: str | None = None
    auth_role: str | None = None
    auth_path: str = "jwt"
    #: pass BROKER_TOKEN / VAULT_TOKEN on to the command (off: least privilege).
    pass_token: bool = False


#: where the CLI reads a broker token from (broker/cli/common.py): kept from the command
#: (BROKER_TOKEN_FILE names a file the command, running as the same user, could read).
TOKEN_VARIABLES = ("BROKER_TOKEN", "BROKER_TOKEN_FILE", "VAULT_TOKEN")


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """``[..., "--", CMD...]`` -> (the part before, the command); no ``--``: (argv, None).

    argparse forgets where ``--`` was, and ``broker exec pg/ro -- ./x pg/rw`` must
    not read ``pg/rw`` as a second credential.
    """
    argv = list(argv)
    if "--" not in argv:
        return argv, None
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def _heartbeat(text: str) -> int:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value == 0 and text.strip().lower() not in {"0", "0s"}:
        raise argparse.ArgumentTypeError("heartbeat must be at least 1s (or 0 to turn it off)")
    return value


def configure_parser(p: argparse.ArgumentParser, mount_role: Callable[[str], Any],
                     duration: Callable[[str], int]) -> None:
    """The ``broker exec`` options (the command itself comes after ``--``)."""
    p.add_argument("specs", metavar="MOUNT/ROLE", nargs="+", type=mount_role,
                   help="credential(s) to put in the command's environment")
    p.add_argument("--ttl", type=duration,
                   help="overall lifetime budget, e.g. 15m (default: the role's max TTL)")
    p.add_argument("--heartbeat", type=_heartbeat, default=DEFAULT_HEARTBEAT, metavar="DURATION",
                   help="renew every DURATION; leases live 2x that unless renewed, so they die "
                   "soon after exec is killed, and a JWT login's token 3x (at least 60s) "
                   "(default 30s; 0: off, leases get the whole --ttl)")
    p.add_argument("--no-revoke", action="store_true",
                   help="leave the leases (and a login token) alive when the command ends: "
                   "each lives on until the end of --ttl (without --ttl: the role's default "
                   "TTL)")
    jwt = p.add_mutually_exclusive_group()
    jwt.add_argument("--jwt-file", metavar="FILE", help="log in with the JWT in FILE")
    jwt.add_argument("--jwt-env", metavar="VAR", help="log in with the JWT in variable VAR")
    p.add_argument("--auth-role", metavar="ROLE", help="role to log in as (with --jwt-*)")
    p.add_argument("--auth-path", metavar="PATH", default="jwt",
                   help="auth mount to log in at: POST /v1/auth/PATH/login (default jwt)")
    p.add_argument("--pass-token", action="store_true",
                   help="pass BROKER_TOKEN, BROKER_TOKEN_FILE and VAULT_TOKEN on to the "
                   "command (by default "
                   "it gets its credentials, not the token); never a JWT login's token")
    p.set_defaults(command_argv=None)


def options_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> ExecOptions:
    """Check the combination of flags and read the JWT; UsageError/OperationError if wrong."""
    command = tuple(args.command_argv or ())
    if not command:
        raise UsageError("put the command after '--', e.g. broker exec pg/readonly -- ./migrate.sh")
    specs = tuple(args.specs)
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        if spec in seen:
            raise UsageError(f"{spec[0]}/{spec[1]} is given twice")
        seen.add(spec)
    if args.ttl is not None and args.ttl < 1:
        raise UsageError("--ttl must be at least 1s")
    jwt: str | None = None
    if args.jwt_file or args.jwt_env:
        if not args.auth_role:
            raise UsageError("--jwt-file/--jwt-env need --auth-role ROLE")
        jwt = _read_jwt(args.jwt_file, args.jwt_env, environ)
    elif args.auth_role:
        raise UsageError("--auth-role only applies with --jwt-file or --jwt-env")
    auth_path = args.auth_path.strip("/")
    if not auth_path:
        raise UsageError("--auth-path must not be empty")
    return ExecOptions(specs=specs, command=command, ttl=args.ttl, heartbeat=args.heartbeat,
                       revoke=not args.no_revoke, jwt=jwt,
                       jwt_env=args.jwt_env if jwt is not None else None,
                       auth_role=args.auth_role, auth_path=auth_path,
                       pass_token=args.pass_token)


def _read_jwt(path: str | None, var: str | None, environ: Mapping[str, str]) -> str:
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read().strip()
        except OSError as exc:
            raise OperationError(f"cannot read --jwt-file {path}: {exc.strerror or exc}") from None
        if not text:
            raise OperationError(f"--jwt-file {path} is empty")
        return text
    text = environ.get(var or "", "").strip()
    if not text:
        raise OperationError(f"environment variable {var} is empty or unset (--jwt-env)")
    return text


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


def exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it: 128+N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


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


def build_env(held: Sequence[Held]) -> dict[str, str]:
    """Variables for the command: each credential's fields plus ``BROKER_LEASE_IDS``.

    The first credential that sets a name keeps its plain names; a later one
    that would set any name already taken gets ``NAME_<MOUNT>_<ROLE>`` for all
    its fields (see the module doc), so the plain names always form one
    credential: never one IAM user's key with another lease's session token.
    Raises OperationError if even that collides.
    """
    return _plan_env(held)[0]


def stale_names(held: Sequence[Held]) -> set[str]:
    """Inherited variables the command must not see: the plain names of fields a
    credential has but leaves empty (null), which nothing else sets.

    An IAM user's key has no ``security_token``: an ``AWS_SESSION_TOKEN`` the job
    already had (a runner's own role) would pair with the new key and make every
    AWS call fail with "the security token included in the request is invalid".
    """
    return _plan_env(held)[1]


def _plan_env(held: Sequence[Held]) -> tuple[dict[str, str], set[str]]:
    env: dict[str, str] = {}
    #: plain names a credential that kept its plain names leaves empty.
    empty: set[str] = set()
    for cred in held:
        own = env_for(cred.plugin, cred.data)
        table = SERVER_ENV_NAMES.get(cred.plugin) or ENV_NAMES.get(cred.plugin, {})
        unset = {name for key, name in table.items()
                 if key in cred.data and cred.data[key] is None}
        if not (set(own) | unset) & (set(env) | empty):
            env.update(own)
            empty |= unset
            continue
        for name, value in own.items():
            name = f"{name}_{_env_key(cred.mount)}_{_env_key(cred.role)}".replace("__", "_")
            if name in env:
                raise OperationError(
                    f"{cred.spec}: two credentials would both set {name}; "
                    "rename a mount or run two broker exec")
            env[name] = value
    env[LEASE_IDS_ENV] = ",".join(c.lease_id for c in held)
    return env, empty - set(env)


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


# --------------------------------------------------------------------------- output

#: Re-entrant: the signal handler says something during the cleanup, and it runs in
#: the main thread, which may be inside _say already (blocked on a full stderr pipe).
_out_lock = threading.RLock()


def _say(message: str) -> None:
    """One line on stderr. Never raises: a log reader that went away (``2>&1 | head``,
    a closed CI log stream) must not stop exec from running the command, renewing
    its leases and revoking them; the message is lost, the run goes on."""
    with _out_lock:
        try:
            sys.stderr.write(f"broker: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _when(ts: float) -> str:
    # UTC: CI logs and the broker's audit log both are.
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%SZ")


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


# --------------------------------------------------------------------------- signals


class _Signalled(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminal_sent_it() -> bool:
    """True when we run in the foreground of a terminal: a Ctrl-C there reached the
    whole process group, the command included, and must not be sent twice."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
        except OSError:
            continue
    return False


class _Forwarder:
    """The signal handler, by phase.

    setup: interrupt (``_Signalled``): nothing runs yet; issued leases are revoked.
    running: forward the signal to the command; exec keeps waiting for it.
    cleanup: the first signal is noted and ignored (it is often the same one that
    just ended the command, sent to the whole process group); a second one
    interrupts the cleanup.
    """

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.phase = "setup"
        self.pending: list[int] = []
        self._noted = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in FORWARDED:
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.phase == "running":
            if self.child is None:  # between "running" and Popen returning
                self.pending.append(signum)
            else:
                self.forward(signum)
        elif self.phase == "cleanup" and not self._noted:
            self._noted = True
            _say(f"got {signal.Signals(signum).name} while revoking the leases; "
                 "send it again to stop revoking")
        else:
            raise _Signalled(signum)

    def forward(self, signum: int) -> None:
        assert self.child is not None
        if signum in _TERMINAL_SIGNALS and _terminal_sent_it():
            return
        try:
            self.child.send_signal(signum)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- the run


class Exec:
    """One ``broker exec`` run: log in, issue, run, renew, revoke."""

    def __init__(self, opts: ExecOptions, client: Client,
                 make_client: Callable[[str | None], Client]) -> None:
        self.opts = opts
        self.client = client
        self.make_client = make_client
        self.logged_in = False
        #: exec's own token, when it expires (it caps the leases); None: unknown or never.
        self.token: LoginToken | None = None
        self._token_looked_up = False
        self.held: list[Held] = []
        self.heartbeat: Heartbeat | None = None
        #: why some variable names are BROKER_*: said once the credentials are issued.
        self._mounts_warnings: list[str] = []

    def run(self) -> int:
        fwd = _Forwarder()
        fwd.install()
        code = 1
        try:
            code = self._main(fwd)
        except _Signalled as sig:  # in the instant between setup and starting the command
            code = 128 + sig.signum
        finally:
            # Whatever happened (a bug included), nothing issued is left running.
            fwd.phase = "cleanup"
            try:
                if self.heartbeat is not None:
                    self.heartbeat.stop()
                self._cleanup()
            except _Signalled as sig:
                _say(f"cleanup interrupted ({sig}); leases not revoked expire on their own "
                     f"within {self._expiry_hint()}")
                code = 128 + sig.signum
            finally:
                fwd.restore()
        return code

    def _main(self, fwd: _Forwarder) -> int:
        try:
            self._setup()
            # The JWT logs in as the whole CI job, and a broker token may issue more
            # (and outlives the leases revoked below): the command gets its leases.
            drop = stale_names(self.held) | {self.opts.jwt_env}
            if not self.opts.pass_token:
                drop |= set(TOKEN_VARIABLES)
            elif self.opts.jwt is not None:
                # By design: the login token dies with exec, so it is never passed on.
                given = [v for v in TOKEN_VARIABLES if os.environ.get(v)]
                _say("warning: --pass-token has no effect with a JWT login: the login token "
                     "never reaches the command" if not given else
                     f"warning: --pass-token with a JWT login passes on {' and '.join(given)} "
                     "from the environment, not the login token")
            inherited = {k: v for k, v in os.environ.items() if k not in drop}
            env = {**inherited, **build_env(self.held)}
            if self.opts.heartbeat and any(c.renewable for c in self.held):
                self.heartbeat = Heartbeat(self.make_client(self.client.token), self.held,
                                           self.opts.heartbeat, self.token)
                self.heartbeat.start()
        except _Signalled as sig:
            _say(f"interrupted ({sig}) before the command ran")
            return 128 + sig.signum
        except (ClientError, OperationError) as exc:
            # Before the command ran: one line; run() cleans up what was issued.
            _say(f"error: {' '.join(str(exc).split())}")
            return EXEC_FAILED
        return self._run_command(env, fwd)

    # -- before the command -----------------------------------------------------
    def _setup(self) -> None:
        if self.opts.jwt is not None:
            self._login()
            if not self.opts.heartbeat and self.opts.ttl and self.token is not None:
                # No heartbeat renews the login token later, and a lease may not
                # outlive it: make it last the budget now (as far as its max TTL allows).
                # (Two seconds of slack: the leases are issued a moment after.)
                keep_token(self.client, self.token, time.time() + self.opts.ttl + 2)
        plugins = self._plugins()
        ttl = first_ttl(self.opts.heartbeat, self.opts.ttl)
        for mount, role in self.opts.specs:
            started = time.time()
            try:
                resp = self.client.request("GET", f"{mount}/creds/{role}",
                                           params={"ttl": ttl} if ttl else None)
            except ClientError as exc:
                raise OperationError(f"{mount}/{role}: {exc}") from None
            if not resp or not resp.get("lease_id"):
                raise OperationError(f"{mount}/{role}: the broker answered without a lease")
            cred = Held(mount=mount, role=role, plugin=plugins.get(mount, ""),
                        lease_id=str(resp["lease_id"]), data=dict(resp.get("data") or {}),
                        renewable=bool(resp.get("renewable")),
                        expire_at=started + int(resp.get("lease_duration") or 0))
            self.held.append(cred)
            for warning in resp.get("warnings") or []:
                _say(f"warning: {cred.spec}: {' '.join(str(warning).split())}")
            self._plan(cred, started)
        if (self.opts.jwt is not None and self.opts.heartbeat and self.opts.revoke
                and self.token is not None and all(c.renewable for c in self.held)):
            # Nobody else holds the token: if exec is killed, it should die about when
            # the leases do, not live on for the role's whole token_ttl. The heartbeat
            # renews it before the leases each time, and they follow it. Only when the
            # heartbeat covers every lease: a lease never outlives its token, and one
            # that cannot be renewed (AWS STS) must keep the token alive as long as it.
            shorten_token(self.client, self.token, login_token_ttl(self.opts.heartbeat))
        for warning in self._mounts_warnings:
            # Said only now: a token the broker refuses altogether fails on the first
            # credential with one error line, not a warning about the mounts first.
            _say(warning)
        hb = self.opts.heartbeat
        _say(f"{len(self.held)} lease(s) for the command: "
             + ", ".join(c.lease_id for c in self.held)
             + (f"; renewed every {format_duration(hb)}" if hb else "; no heartbeat"))

    def _login(self) -> None:
        path = f"auth/{self.opts.auth_path}/login"
        started = time.time()
        try:
            resp = self.client.request("POST", path,
                                       json={"role": self.opts.auth_role, "jwt": self.opts.jwt})
        except ClientError as exc:
            raise OperationError(f"login at {path} as role {self.opts.auth_role!r}: {exc}"
                                 ) from None
        token = ((resp or {}).get("auth") or {}).get("client_token")
        if not token:
            raise OperationError(f"login at {path} answered without a client token")
        self.client.token = str(token)
        self.logged_in = True
        auth = (resp or {}).get("auth") or {}
        ttl = auth.get("lease_duration")
        if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl > 0:
            # Exact once looked up, when a lease turns out to be capped by it (_plan).
            self.token = LoginToken(expire_at=started + ttl,
                                    renewable=bool(auth.get("renewable")))

    def _lookup_token(self) -> None:
        """Exec's own token's expiry and max TTL (``lookup-self``), once; asked only when
        a lease's max expiry may be the token's. If we may not ask, a login keeps what
        its answer said, and leases are renewed as far as the broker lets them."""
        if self._token_looked_up:
            return
        self._token_looked_up = True
        now = time.time()
        try:
            resp = self.client.request("GET", "auth/token/lookup-self")
        except ClientError:
            return
        found = LoginToken.from_lookup((resp or {}).get("data") or {}, now,
                                       "login token" if self.logged_in else "broker token")
        if found is not None or not self.logged_in:
            self.token = found

    def _capping_token(self, data: Mapping[str, Any], started: float) -> LoginToken | None:
        """Exec's token if it is what capped this lease's max expiry (lease lookup ``data``)."""
        max_expire = _rfc3339(data.get("max_expire_time"))
        if max_expire is None:
            return None
        if self.logged_in:
            issued = _rfc3339(data.get("issue_time"))
            if self.token is None or issued is None:
                return None
            # Compared as durations (the broker's clock may not be ours): what the lease
            # may live vs what the token had left when the lease was issued.
            if abs((max_expire - issued) - (self.token.expire_at - started)) > 3:
                return None  # the role's max TTL, well before the token's expiry
        self._lookup_token()
        token = self.token
        if token is None or token.server_expire is None:
            return None
        return token if abs(max_expire - token.server_expire) < 1.5 else None

    def _plugins(self) -> dict[str, str]:
        """mount -> plugin type of each mount in the specs, for the variable names; a mount
        we may not read is left out (its variables are BROKER_*), with a warning."""
        found = mount_plugins(self.client, [mount for mount, _ in self.opts.specs])
        self._mounts_warnings = [f"warning: {w}" for w in found.warnings]
        return found.plugins

    def _plan(self, cred: Held, started: float) -> None:
        """Where renewals must stop: the --ttl budget, and the lease's own max expiry."""
        if self.opts.ttl:
            cred.end = started + self.opts.ttl
        if not cred.renewable:
            if self.opts.heartbeat:
                _say(f"warning: {cred.spec} is not renewable: it lives its issued TTL "
                     f"({format_duration(max(0, int(cred.expire_at - started)))}) and the "
                     "heartbeat does not cover it")
            return
        try:
            resp = self.client.request("PUT", "sys/leases/lookup",
                                       json={"lease_id": cred.lease_id})
        except ClientError:
            return  # renewals past the max TTL answer 400 and stop there
        data = (resp or {}).get("data") or {}
        max_expire = _rfc3339(data.get("max_expire_time"))
        if max_expire is None:
            return
        if cred.end is not None and max_expire >= cred.end:
            return  # past the budget, whatever capped it
        token = self._capping_token(data, started)
        if token is not None:
            # Capped at the token's expiry, not the role's max TTL: the lease follows
            # the token as the heartbeat renews it, up to the token's own limit.
            # (The role's max TTL, if it comes first, stops renewals with a 400.)
            # Without a heartbeat nothing renews the token: it ends the lease at its expiry.
            reach = token.reach if self.opts.heartbeat else token.expire_at
            if reach is not None and (cred.end is None or reach < cred.end):
                if cred.end is not None:
                    _say(_token_cap_warning(cred.spec, token, reach,
                                            renewed=bool(self.opts.heartbeat)))
                cred.end = reach
            return
        if cred.end is None or max_expire < cred.end:
            if cred.end is not None:
                _say(f"warning: {cred.spec}: the role's max TTL ends the lease at "
                     f"{_when(max_expire)}, before --ttl")
            cred.end = max_expire

    # -- the command --------------------------------------------------------------
    def _run_command(self, env: dict[str, str], fwd: _Forwarder) -> int:
        fwd.phase = "running"
        try:
            proc = subprocess.Popen(list(self.opts.command), env=env)  # noqa: S603 - the user's
        except OSError as exc:
            fwd.phase = "cleanup"
            _say(f"error: cannot run {self.opts.command[0]}: {exc.strerror or exc}")
            return 127 if isinstance(exc, FileNotFoundError) else 126
        fwd.child = proc
        for signum in fwd.pending:
            fwd.forward(signum)
        return exit_code(proc.wait())

    # -- after the command --------------------------------------------------------
    def _cleanup(self) -> None:
        if not self.opts.revoke:
            self._leave_alive()
            return
        # Only exec holds its login token, so only exec renews it: once past the
        # expiry exec knows of, the token is gone, and every lease with it (a lease
        # never outlives its token). Revoking them would be audited as reuse attempts.
        # A renewal whose outcome is unknown (failing) may have gone through: then
        # the leases may be live, and revoking is the safe side.
        token_gone = (self.logged_in and self.token is not None
                      and self.token.expired(time.time()) and not self.token.failing)
        if token_gone and self.token is not None and any(not c.dead for c in self.held):
            _say(f"the login token expired at {_when(self.token.expire_at)}; the leases "
                 "ended with it")
        for cred in self.held:
            if token_gone or cred.dead or (cred.final and time.time() >= cred.expire_at):
                # Ended already: revoking it again would be audited as a reuse attempt.
                continue
            try:
                # strict: an ended lease answers 400, saying so (Vault clients get 204).
                resp = self.client.request("PUT", "sys/leases/revoke",
                                           json={"lease_id": cred.lease_id, "strict": True},
                                           timeout=_REVOKE_TIMEOUT)
            except ClientError as exc:
                if exc.status == 400:
                    _say(f"{cred.lease_id} had ended already: {exc}")
                    continue
                _say(f"warning: could not revoke {cred.lease_id}: {exc}; it expires on its "
                     f"own at {_when(cred.expire_at)}")
                continue
            if resp and resp.get("warnings"):
                _say(f"warning: {cred.lease_id}: revocation queued, the broker retries it")
        if self.logged_in and not token_gone:
            try:
                # Cascades to anything the token still owns.
                self.client.request("POST", "auth/token/revoke-self")
            except ClientError as exc:
                _say(f"warning: could not revoke the login token: {exc}")

    def _leave_alive(self) -> None:
        """--no-revoke: one last renewal to the end of the --ttl budget (without --ttl:
        the role's default TTL from now), then let them be."""
        live = [c for c in self.held if c.renewable and not c.final and not c.dead]
        ends = [c.end for c in live if c.end is not None]
        if self.token is not None and self.opts.ttl and ends:
            # The leases may not outlive the token: it must last to the end of the budget.
            keep_token(self.client, self.token, max(ends))
        for cred in live:
            now = time.time()
            increment = int(cred.end - now) if self.opts.ttl and cred.end is not None else None
            if increment is not None and increment < 1:
                continue
            try:
                resp = self.client.request("PUT", "sys/leases/renew",
                                           json={"lease_id": cred.lease_id,
                                                 "increment": increment})
                cred.expire_at = now + int((resp or {}).get("lease_duration") or 0)
            except ClientError as exc:
                _say(f"warning: could not extend {cred.lease_id}: {exc}")
        if self.held:
            _say("leases left alive (--no-revoke): " + ", ".join(
                f"{c.lease_id} until {_when(c.expire_at)}" for c in self.held))

    def _expiry_hint(self) -> str:
        hb = self.opts.heartbeat
        return f"{format_duration(2 * hb)}" if hb else "their TTL"


# --------------------------------------------------------------------------- entry point


#: prctl(2) option: whether the process may be core-dumped, ptrace-attached, and its
#: /proc/PID/environ and /proc/PID/mem read by other processes of the same user.
_PR_SET_DUMPABLE = 4


def _hide_from_the_command() -> None:
    """Make exec's own memory and environment unreadable to the command it runs.

    The command runs as the same user: without this it can read the JWT and a
    ``BROKER_TOKEN`` exec keeps from its environment in ``/proc/$PPID/environ``
    (and the login token from ``/proc/$PPID/mem`` where ptrace is not restricted).
    A process that is not dumpable has its ``/proc`` entries owned by root; the
    flag is reset by execve, so the command itself is unaffected. It also keeps
    the secrets out of core dumps. Linux only; elsewhere (or if it fails) a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


#: exec's own exit code when it fails before the command runs (broker unreachable,
#: login or a credential refused, a JWT file missing), as ``env``, ``timeout`` and
#: ``docker run`` use 125: a CI step can tell "no credentials" from the command
#: failing (1, most often). A wrong command line stays 2.
EXEC_FAILED = 125


def cmd_exec(args: argparse.Namespace) -> int:
    """``broker exec``: see the module doc. Returns the command's exit code."""
    _hide_from_the_command()
    try:
        opts = options_from_args(args, os.environ)
        settings = resolve_settings(args, os.environ)
    except OperationError as exc:  # e.g. the JWT file or the token file is missing
        _say(f"error: {' '.join(str(exc).split())}")
        return EXEC_FAILED
    if getattr(args, "token", None) not in (None, "", "-"):  # "-": read from stdin
        _say("warning: --token puts the token in the process list for the whole run, "
             "where the command and other users can read it (ps); use --token-file FILE "
             "or set BROKER_TOKEN instead")
    if settings.ca_file and not os.path.isfile(settings.ca_file):
        raise UsageError(f"CA file not found: {settings.ca_file}")

    def make_client(token: str | None) -> Client:
        return Client(settings.address, token, ca_file=settings.ca_file,
                      skip_verify=settings.skip_verify)

    if opts.jwt is None and not settings.token:
        raise UsageError("no token: pass --token-file FILE, set BROKER_TOKEN, "
                         "or log in with --jwt-file/--jwt-env and --auth-role")
    try:
        # Logging in starts without a token: the login answers with one.
        client = make_client(settings.token if opts.jwt is None else None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return Exec(opts, client, make_client).run()
