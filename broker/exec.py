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
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
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
from broker.durations import format_duration
from broker.exec_leases import (
    _REVOKE_TIMEOUT,
    Heartbeat,
    Held,
    LoginToken,
    _rfc3339,
    _token_cap_warning,
    first_ttl,
    keep_token,
    login_token_ttl,
    renew_increment,
    shorten_token,
)
from broker.exec_options import (
    DEFAULT_HEARTBEAT,
    TOKEN_VARIABLES,
    ExecOptions,
    configure_parser,
    options_from_args,
    split_command,
)
from broker.exec_process import (
    FORWARDED,
    _Forwarder,
    _hide_from_the_command,
    _say,
    _Signalled,
    _when,
    exit_code,
)

# Every name tests and the CLI import from here, kept here (the parts moved out).
__all__ = [
    "DEFAULT_HEARTBEAT",
    "EXEC_FAILED",
    "FORWARDED",
    "LEASE_IDS_ENV",
    "TOKEN_VARIABLES",
    "ExecOptions",
    "Heartbeat",
    "Held",
    "LoginToken",
    "build_env",
    "cmd_exec",
    "configure_parser",
    "exit_code",
    "first_ttl",
    "keep_token",
    "login_token_ttl",
    "options_from_args",
    "renew_increment",
    "shorten_token",
    "split_command",
    "stale_names",
]

LEASE_IDS_ENV = "BROKER_LEASE_IDS"


# --------------------------------------------------------------------------- credentials



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
