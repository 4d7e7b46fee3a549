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
  the broker revokes them) within about two heartbeats.
- ``--ttl`` is the overall budget: renewals stop so that no lease outlives it.

Variable names: each credential's fields get the names its backend's tools
read (``PGUSER``/``PGPASSWORD``, ``MYSQL_USER``/``MYSQL_PWD``, ``AWS_*``). When
a later credential would set a name an earlier one already set (two postgres
mounts), all its names get ``NAME_<MOUNT>_<ROLE>`` instead (``PGUSER_PG2_READONLY``):
the first credential listed keeps the plain names the tools read. Every lease
id is in ``BROKER_LEASE_IDS``, comma-separated, in the order given.

The rest of exec's environment is inherited, except the ``--jwt-env`` variable
(the JWT logs in as the whole job), the broker token variables
(``BROKER_TOKEN``, ``VAULT_TOKEN``: the command gets its leases, not the power
to issue more, and a token would outlive the leases exec revokes; unless
``--pass-token``) and a plain name the credential leaves empty (an IAM user's
``AWS_SESSION_TOKEN``: a stale one would break its key).
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
    remember_env_names,
    resolve_settings,
)
from broker.client import Client, ClientError
from broker.durations import format_duration, parse_duration

__all__ = [
    "LEASE_IDS_ENV",
    "TOKEN_VARIABLES",
    "ExecOptions",
    "Held",
    "build_env",
    "cmd_exec",
    "configure_parser",
    "exit_code",
    "first_ttl",
    "options_from_args",
    "renew_increment",
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


#: where the CLI reads a broker token from (broker/cli/common.py): kept from the command.
TOKEN_VARIABLES = ("BROKER_TOKEN", "VAULT_TOKEN")


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
                   "soon after exec is killed (default 30s; 0: off, leases get the whole --ttl)")
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
                   help="pass BROKER_TOKEN and VAULT_TOKEN on to the command (by default "
                   "it gets its credentials, not the token)")
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


# --------------------------------------------------------------------------- output

_out_lock = threading.Lock()


def _say(message: str) -> None:
    with _out_lock:
        sys.stderr.write(f"broker: {message}\n")
        sys.stderr.flush()


def _when(ts: float) -> str:
    # UTC: CI logs and the broker's audit log both are.
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%SZ")


# --------------------------------------------------------------------------- heartbeat


class Heartbeat:
    """Renews the leases every ``heartbeat`` seconds in a background thread.

    A thread, because the client is synchronous and the main thread must stay
    free to forward signals and wait for the command.
    """

    def __init__(self, client: Client, held: Sequence[Held], heartbeat: int) -> None:
        self.client, self.held, self.heartbeat = client, held, heartbeat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.heartbeat + _REVOKE_TIMEOUT)

    def _run(self) -> None:
        next_at = time.monotonic() + self.heartbeat
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self.beat()
            # A slow round must not make the next ones come in a burst.
            next_at = max(next_at + self.heartbeat, time.monotonic())

    def beat(self) -> None:
        for cred in self.held:
            if self._stop.is_set():
                return
            if cred.renewable and not cred.final and not cred.dead:
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
        self.held: list[Held] = []
        self.heartbeat: Heartbeat | None = None

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
            inherited = {k: v for k, v in os.environ.items() if k not in drop}
            env = {**inherited, **build_env(self.held)}
            if self.opts.heartbeat and any(c.renewable for c in self.held):
                self.heartbeat = Heartbeat(self.make_client(self.client.token), self.held,
                                           self.opts.heartbeat)
                self.heartbeat.start()
        except _Signalled as sig:
            _say(f"interrupted ({sig}) before the command ran")
            return 128 + sig.signum
        except (ClientError, OperationError) as exc:
            # Before the command ran: one line; run() cleans up what was issued.
            _say(f"error: {' '.join(str(exc).split())}")
            return 1
        return self._run_command(env, fwd)

    # -- before the command -----------------------------------------------------
    def _setup(self) -> None:
        if self.opts.jwt is not None:
            self._login()
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
        hb = self.opts.heartbeat
        _say(f"{len(self.held)} lease(s) for the command: "
             + ", ".join(c.lease_id for c in self.held)
             + (f"; renewed every {format_duration(hb)}" if hb else "; no heartbeat"))

    def _login(self) -> None:
        path = f"auth/{self.opts.auth_path}/login"
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

    def _plugins(self) -> dict[str, str]:
        """mount -> plugin type, for the variable names; {} if we may not read sys/mounts."""
        try:
            resp = self.client.request("GET", "sys/mounts")
        except ClientError as exc:
            if exc.status in {403, 404, 405}:
                _say(f"warning: cannot read sys/mounts ({exc}); using BROKER_* variable names")
                return {}
            raise
        data = (resp or {}).get("data") or {}
        remember_env_names(data)
        return {str(k).rstrip("/"): str(v.get("type", "")) for k, v in data.items()
                if isinstance(v, dict)}

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
        max_expire = _rfc3339(((resp or {}).get("data") or {}).get("max_expire_time"))
        if max_expire is not None and (cred.end is None or max_expire < cred.end):
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
        for cred in self.held:
            if cred.dead or (cred.final and time.time() >= cred.expire_at):
                # Ended already: revoking it again would be audited as a reuse attempt.
                continue
            try:
                resp = self.client.request("PUT", "sys/leases/revoke",
                                           json={"lease_id": cred.lease_id},
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
        if self.logged_in:
            try:
                # Cascades to anything the token still owns.
                self.client.request("POST", "auth/token/revoke-self")
            except ClientError as exc:
                _say(f"warning: could not revoke the login token: {exc}")

    def _leave_alive(self) -> None:
        """--no-revoke: one last renewal to the end of the --ttl budget (without --ttl:
        the role's default TTL from now), then let them be."""
        for cred in self.held:
            if not cred.renewable or cred.final or cred.dead:
                continue
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


def cmd_exec(args: argparse.Namespace) -> int:
    """``broker exec``: see the module doc. Returns the command's exit code."""
    opts = options_from_args(args, os.environ)
    settings = resolve_settings(args, os.environ)
    if settings.ca_file and not os.path.isfile(settings.ca_file):
        raise UsageError(f"CA file not found: {settings.ca_file}")

    def make_client(token: str | None) -> Client:
        return Client(settings.address, token, ca_file=settings.ca_file,
                      skip_verify=settings.skip_verify)

    if opts.jwt is None and not settings.token:
        raise UsageError("no token: pass --token TOKEN, set BROKER_TOKEN, "
                         "or log in with --jwt-file/--jwt-env and --auth-role")
    try:
        # Logging in starts without a token: the login answers with one.
        client = make_client(settings.token if opts.jwt is None else None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return Exec(opts, client, make_client).run()
