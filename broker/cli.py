"""The ``broker`` command line: run the daemon, and talk to a running one over HTTP.

Every expected failure (bad usage, connection refused, a 4xx/5xx answer) ends
in ONE line on stderr, ``broker: error: ...``, exit code 2 for usage and 1 for
a failed operation. A traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

from broker import __version__
from broker.client import DEFAULT_ADDRESS, Client, ClientError
from broker.durations import format_duration, parse_duration

__all__ = [
    "ENV_NAMES",
    "OperationError",
    "Settings",
    "UsageError",
    "build_parser",
    "creds_env",
    "env_for",
    "format_env",
    "format_table",
    "main",
    "resolve_settings",
]

#: the variable names each backend's own tools read, so ``eval "$(broker creds
#: pg/ro --format env)"; psql`` works. Keyed by plugin type (``sys/mounts``).
ENV_NAMES: Mapping[str, Mapping[str, str]] = {
    "postgres": {"username": "PGUSER", "password": "PGPASSWORD"},
    "mysql": {"username": "MYSQL_USER", "password": "MYSQL_PWD"},
    "aws": {
        "access_key": "AWS_ACCESS_KEY_ID",
        "secret_key": "AWS_SECRET_ACCESS_KEY",
        "security_token": "AWS_SESSION_TOKEN",
    },
}
LEASE_ID_ENV = "BROKER_LEASE_ID"
#: fields shown as durations ("1h") rather than seconds in tables.
_DURATION_FIELDS = {"lease_duration", "ttl", "token_duration", "creation_ttl", "explicit_max_ttl"}
_POLL_INTERVAL = 0.5
#: how long revocation may sit with nothing in flight and no progress before we stop waiting.
_STALL_POLLS = 4
_SYNC_TIMEOUT = 3600.0


class UsageError(Exception):
    """The command line is wrong: exit 2."""


class OperationError(Exception):
    """The command ran but failed: exit 1."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block and names the sub-parser
    # ("broker creds: error:"); we want one line, always "broker: error:".
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Where the server is and who we are, after flags and environment are merged."""

    address: str
    token: str | None
    ca_file: str | None
    skip_verify: bool


def _first(*values: str | None) -> str | None:
    # An exported-but-empty variable counts as unset, as in the vault CLI.
    return next((v for v in values if v), None)


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Flags win, then ``BROKER_*``, then ``VAULT_*`` (so existing Vault setups work)."""
    return Settings(
        address=_first(
            getattr(args, "address", None), environ.get("BROKER_ADDR"), environ.get("VAULT_ADDR")
        )
        or DEFAULT_ADDRESS,
        token=_first(
            getattr(args, "token", None), environ.get("BROKER_TOKEN"), environ.get("VAULT_TOKEN")
        ),
        ca_file=_first(
            getattr(args, "tls_ca", None), environ.get("BROKER_CACERT"), environ.get("VAULT_CACERT")
        ),
        skip_verify=bool(getattr(args, "tls_skip_verify", False)),
    )


def _client(args: argparse.Namespace, *, need_token: bool = True) -> Client:
    settings = resolve_settings(args, os.environ)
    if need_token and not settings.token:
        raise UsageError("no token: pass --token TOKEN or set BROKER_TOKEN")
    if settings.ca_file and not os.path.isfile(settings.ca_file):
        raise UsageError(f"CA file not found: {settings.ca_file}")
    try:
        return Client(
            settings.address,
            settings.token,
            ca_file=settings.ca_file,
            skip_verify=settings.skip_verify,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# --------------------------------------------------------------------------- formatting


def env_for(plugin: str, data: Mapping[str, Any]) -> dict[str, str]:
    """Map a credential's ``data`` to environment variables for ``plugin``.

    Known fields get the names the backend's tools read (``PGPASSWORD``);
    anything else becomes ``BROKER_<KEY>``. Empty (None) fields are left out.
    """
    names = ENV_NAMES.get(plugin, {})
    env: dict[str, str] = {}
    for key, value in data.items():
        if value is None:
            continue
        name = names.get(key) or "BROKER_" + _env_key(key)
        env[name] = value if isinstance(value, str) else json.dumps(value)
    return env


def _env_key(key: str) -> str:
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper())
    return name if name and not name[0].isdigit() else "_" + name


def creds_env(plugin: str, response: Mapping[str, Any]) -> dict[str, str]:
    """``env_for`` of a creds answer, plus ``BROKER_LEASE_ID`` for a later renew/revoke."""
    env = env_for(plugin, response.get("data") or {})
    if response.get("lease_id"):
        env[LEASE_ID_ENV] = str(response["lease_id"])
    return env


def format_env(env: Mapping[str, str]) -> str:
    """``export NAME=VALUE`` lines, each value quoted for a POSIX shell."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if key in _DURATION_FIELDS and isinstance(value, int):
        return format_duration(value)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True) if value else "-"
    return str(value)


def format_table(
    rows: Iterable[tuple[str, Any]], header: tuple[str, str] = ("Key", "Value")
) -> str:
    """A two-column key/value table, as the vault CLI prints it."""
    cells = [(k, _cell(k, v)) for k, v in rows]
    width = max([len(header[0]), *(len(k) for k, _ in cells)])
    lines = [f"{header[0]:<{width}}    {header[1]}", f"{'-' * len(header[0]):<{width}}    -----"]
    lines += [f"{k:<{width}}    {v}" for k, v in cells]
    return "\n".join(lines) + "\n"


def _columns(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(out) + "\n"


def _output_format(args: argparse.Namespace) -> str:
    chosen: str | None = getattr(args, "format", None)
    # A human at a terminal reads a table; a pipe or a script gets JSON.
    return chosen or ("table" if sys.stdout.isatty() else "json")


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def _warn(message: str) -> None:
    sys.stderr.write(f"broker: warning: {message}\n")


def _show_warnings(resp: Mapping[str, Any] | None) -> None:
    for warning in (resp or {}).get("warnings") or []:
        _warn(" ".join(str(warning).split()))


def _need(resp: dict[str, Any] | None, what: str) -> dict[str, Any]:
    if not isinstance(resp, dict):
        raise OperationError(f"the server sent an empty answer to {what}")
    return resp


# --------------------------------------------------------------------------- argument types


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _mount_role(text: str) -> tuple[str, str]:
    mount, _, role = text.strip("/").rpartition("/")
    if not mount or not role:
        raise argparse.ArgumentTypeError(f"expected MOUNT/ROLE (e.g. pg/readonly), got {text!r}")
    return mount, role


def _listen(text: str) -> str:
    from broker.config import parse_listen

    try:
        parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _prefix(text: str) -> str:
    text = text.lstrip("/")
    if not text:
        raise argparse.ArgumentTypeError(
            "the prefix must not be empty (e.g. pg/ or pg/creds/readonly/)"
        )
    return text


# --------------------------------------------------------------------------- commands: daemon


def cmd_server(args: argparse.Namespace) -> int:
    if not args.config and not args.dev:
        raise UsageError("pass --config FILE, or --dev for a throw-away local server")
    if args.dev_root_token_id and not args.dev:
        raise UsageError("--dev-root-token-id only applies with --dev")
    from broker.config import ConfigError

    try:
        from broker.server import run_server
    except ImportError as exc:
        raise OperationError(f"the server is not available in this installation: {exc}") from None
    try:
        code: int = run_server(
            args.config, dev=args.dev, dev_root_token_id=args.dev_root_token_id, listen=args.listen
        )
        return code
    except ConfigError as exc:
        raise OperationError(str(exc)) from None
    except KeyboardInterrupt:
        return 130


def cmd_bench(args: argparse.Namespace) -> int:
    # Imported here: the bench pulls in the server, asyncpg and the scenarios.
    from broker.bench import main as bench_main

    return bench_main(args)


def cmd_operator_init(args: argparse.Namespace) -> int:
    if not args.config:
        raise UsageError("pass --config FILE (the config of the broker to initialise)")
    from broker.config import ConfigError

    try:
        from broker.server import operator_init
    except ImportError as exc:
        raise OperationError(f"the server is not available in this installation: {exc}") from None
    try:
        token = operator_init(args.config)
    except (ConfigError, RuntimeError) as exc:
        raise OperationError(str(exc)) from None
    # The warning goes to stderr so `TOKEN=$(broker operator init ...)` captures only the token.
    sys.stderr.write(
        "Root token below. It is shown ONCE and grants every permission: store it in a\n"
        "password manager or secret store now, and use it only to create less powerful tokens.\n"
    )
    sys.stdout.write(token + "\n")
    return 0


# --------------------------------------------------------------------------- commands: creds


def _mount_plugin(client: Client, mount: str) -> str | None:
    """The plugin type of ``mount`` from ``sys/mounts``, or None if we may not read it."""
    try:
        resp = client.request("GET", "sys/mounts")
    except ClientError as exc:
        if exc.status in {403, 404, 405}:
            _warn(f"cannot read sys/mounts ({exc}); using BROKER_* variable names")
            return None
        raise
    entry = ((resp or {}).get("data") or {}).get(mount.rstrip("/") + "/")
    if not isinstance(entry, dict) or "type" not in entry:
        raise OperationError(f"no mount named {mount!r} (see GET /v1/sys/mounts)")
    return str(entry["type"])


def cmd_creds(args: argparse.Namespace) -> int:
    mount, role = args.path
    fmt = _output_format(args)
    client = _client(args)
    # Ask for the plugin type BEFORE issuing, so a failure here does not leave
    # an unused credential behind.
    plugin = _mount_plugin(client, mount) if fmt == "env" else None
    params = {"ttl": args.ttl} if args.ttl is not None else None
    resp = _need(client.request("GET", f"{mount}/creds/{role}", params=params), "creds")
    _show_warnings(resp)
    if fmt == "json":
        _print_json(resp)
    elif fmt == "env":
        sys.stdout.write(format_env(creds_env(plugin or "", resp)))
    else:
        rows = [
            ("lease_id", resp.get("lease_id")),
            ("lease_duration", resp.get("lease_duration")),
            ("lease_renewable", resp.get("renewable")),
            *(resp.get("data") or {}).items(),
        ]
        sys.stdout.write(format_table(rows))
    return 0


# --------------------------------------------------------------------------- commands: leases


def _print_record(
    args: argparse.Namespace, resp: dict[str, Any], rows: Iterable[tuple[str, Any]]
) -> None:
    if _output_format(args) == "json":
        _print_json(resp)
    else:
        sys.stdout.write(format_table(rows))


def cmd_lease_lookup(args: argparse.Namespace) -> int:
    client = _client(args)
    resp = _need(
        client.request("PUT", "sys/leases/lookup", json={"lease_id": args.lease_id}), "lookup"
    )
    _print_record(args, resp, (resp.get("data") or {}).items())
    return 0


def cmd_lease_renew(args: argparse.Namespace) -> int:
    client = _client(args)
    body: dict[str, Any] = {"lease_id": args.lease_id}
    if args.increment is not None:
        body["increment"] = args.increment
    resp = _need(client.request("PUT", "sys/leases/renew", json=body), "renew")
    _show_warnings(resp)
    rows = [(k, resp.get(k)) for k in ("lease_id", "lease_duration", "renewable")]
    _print_record(args, resp, rows)
    return 0


def cmd_lease_revoke(args: argparse.Namespace) -> int:
    if args.meta:
        if args.lease_id:
            raise UsageError("give a LEASE_ID or --meta KEY=VALUE, not both")
        return _revoke_by_meta(_client(args), args)
    if args.prefix is not None:
        if args.lease_id:
            raise UsageError("give a LEASE_ID or --prefix PREFIX, not both")
        return _revoke_prefix(
            _client(args), args.prefix, force=args.force, sync=args.sync, wait=not args.no_wait
        )
    if not args.lease_id:
        raise UsageError("give the LEASE_ID to revoke (or --prefix PREFIX)")
    for flag, given in (
        ("--force", args.force),
        ("--sync", args.sync),
        ("--no-wait", args.no_wait),
    ):
        if given:
            raise UsageError(f"{flag} only applies with --prefix or --meta")
    _client(args).request("PUT", "sys/leases/revoke", json={"lease_id": args.lease_id})
    sys.stdout.write(f"revoked {args.lease_id}\n")
    return 0


def _list(client: Client, prefix: str) -> list[str]:
    try:
        # GET ?list=true rather than the LIST verb: same answer, and it passes
        # proxies and HTTP parsers that only accept the standard methods.
        resp = client.request("GET", f"sys/leases/lookup/{prefix}", params={"list": True})
    except ClientError as exc:
        if exc.status == 404:  # Vault's answer to an empty listing
            return []
        raise
    keys = ((resp or {}).get("data") or {}).get("keys") or []
    return [str(k) for k in keys]


def _walk(client: Client, prefix: str) -> Iterable[str]:
    for key in _list(client, prefix):
        if key.endswith("/"):
            yield from _walk(client, prefix + key)
        else:
            yield prefix + key


def _search(client: Client, params: Mapping[str, str]) -> Iterable[dict[str, Any]]:
    after = ""
    while True:
        resp = client.request("GET", "sys/leases/search", params={**params, "after": after or None})
        data = (resp or {}).get("data") or {}
        yield from data.get("leases") or []
        after = data.get("next_after") or ""
        if not after:
            return


def _list_by_meta(client: Client, args: argparse.Namespace) -> int:
    _, params, _ = _meta_selector(args.meta, args.prefix)
    if not args.all:
        params["state"] = "active,revoking,irrevocable"
    rows = list(_search(client, params))
    if args.format == "json":
        _print_json(rows)
    elif args.format == "table":
        if rows:
            cells = [[str(r.get(k) or "-") for k in ("lease_id", "state", "expire_time")]
                     + [_cell("metadata", r.get("metadata"))] for r in rows]
            sys.stdout.write(_columns(["LEASE_ID", "STATE", "EXPIRE_TIME", "METADATA"], cells))
    else:
        sys.stdout.writelines(f"{r.get('lease_id')}\n" for r in rows)
    return 0


def cmd_lease_list(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.meta:
        return _list_by_meta(client, args)
    if args.format or args.all:
        raise UsageError("--format and --all only apply with --meta")
    if not args.prefix:
        raise UsageError("give the PREFIX to list (or --meta KEY=VALUE)")
    prefix = args.prefix if args.prefix.endswith("/") else args.prefix + "/"
    keys = _walk(client, prefix) if args.recursive else _list(client, prefix)
    for key in keys:
        sys.stdout.write(key + "\n")
    return 0


def cmd_lease_irrevocable(args: argparse.Namespace) -> int:
    client = _client(args)
    params = {"prefix": args.prefix or None, "limit": args.limit}
    resp = _need(client.request("GET", "sys/leases/irrevocable", params=params), "irrevocable")
    leases = (resp.get("data") or {}).get("leases") or []
    if _output_format(args) == "json":
        _print_json(resp)
        return 0
    if not leases:
        sys.stderr.write("no irrevocable leases\n")
        return 0
    rows = [
        [
            str(x.get("lease_id", "")),
            str(x.get("revoke_attempts", "")),
            str(x.get("expire_time", "")),
            " ".join(str(x.get("last_error") or "-").split()),
        ]
        for x in leases
    ]
    sys.stdout.write(_columns(["LEASE_ID", "ATTEMPTS", "EXPIRE_TIME", "LAST_ERROR"], rows))
    return 0


# --------------------------------------------------------------------------- revoke by prefix


@dataclass(frozen=True)
class _Stats:
    active: int = 0
    revoking: int = 0
    revoked: int = 0
    expired: int = 0
    irrevocable: int = 0

    @classmethod
    def from_answer(cls, resp: Mapping[str, Any] | None) -> _Stats:
        data = (resp or {}).get("data") or {}
        return cls(**{k: int(data.get(k) or 0) for k in cls.__dataclass_fields__})


def _stats(client: Client, params: Mapping[str, str]) -> _Stats:
    return _Stats.from_answer(client.request("GET", "sys/leases/stats", params=params))


class _Progress:
    """``[#####.....] 512/1000`` redrawn in place on a TTY; a line now and then otherwise."""

    WIDTH = 30
    LINE_EVERY = 2.0

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self.shown: int | None = None
        self.last_line = 0.0

    def update(self, done: int) -> None:
        if self.tty:
            filled = self.WIDTH * done // self.total if self.total else self.WIDTH
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self.stream.write(f"\r[{bar}] {done}/{self.total}")
            self.stream.flush()
        elif (
            done != self.shown
            and done < self.total  # the summary line says it when all are done
            and time.monotonic() - self.last_line >= self.LINE_EVERY
        ):
            self.stream.write(f"revoking: {done}/{self.total}\n")
            self.stream.flush()
            self.last_line = time.monotonic()
        self.shown = done

    def close(self) -> None:
        if self.tty and self.shown is not None:
            self.stream.write("\n")
            self.stream.flush()


def _revoke_prefix(
    client: Client,
    prefix: str,
    *,
    force: bool,
    sync: bool,
    wait: bool,
    poll: float = _POLL_INTERVAL,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    kind = "revoke-force" if force else "revoke-prefix"
    return _revoke_selected(
        client, f"sys/leases/{kind}/{prefix}", {"sync": sync}, {"prefix": prefix},
        where=f"under {prefix}", hint=prefix, sync=sync, wait=wait, poll=poll, sleep=sleep,
    )


def _meta_selector(meta: Sequence[tuple[str, str]], prefix: str | None) -> tuple[
        dict[str, str], dict[str, str], str]:
    """(metadata, query params for stats/search, words for messages) of ``--meta`` flags."""
    selected: dict[str, str] = {}
    for key, value in meta:
        if selected.get(key, value) != value:
            raise UsageError(f"--meta {key}= given twice with different values")
        selected[key] = value
    params = {f"meta.{k}": v for k, v in selected.items()} | ({"prefix": prefix} if prefix else {})
    where = "matching " + " ".join(f"{k}={v}" for k, v in selected.items())
    return selected, params, where + (f" under {prefix}" if prefix else "")


def _revoke_by_meta(client: Client, args: argparse.Namespace) -> int:
    meta, params, where = _meta_selector(args.meta, args.prefix)
    body: dict[str, Any] = {"metadata": meta, "sync": args.sync, "force": args.force}
    if args.prefix:
        body["prefix"] = args.prefix
    return _revoke_selected(client, "sys/leases/revoke-by", body, params, where=where,
                            hint=args.prefix or "", sync=args.sync, wait=not args.no_wait)


def _revoke_selected(
    client: Client,
    path: str,
    body: Mapping[str, Any],
    stats_params: Mapping[str, str],
    *,
    where: str,
    hint: str,
    sync: bool,
    wait: bool,
    poll: float = _POLL_INTERVAL,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Queue a revocation of many leases; show progress from stats with the same selector."""
    before: _Stats | None = None
    if wait:
        try:
            before = _stats(client, stats_params)
        except ClientError as exc:
            if exc.status not in {403, 404, 405}:
                raise
            _warn(f"cannot read sys/leases/stats ({exc}); not waiting for the revocations")
    started = time.monotonic()
    resp = client.request("PUT", path, json=body, timeout=_SYNC_TIMEOUT if sync else None)
    _show_warnings(resp)
    queued = int(((resp or {}).get("data") or {}).get("queued") or 0)
    if before is None:
        state = "revoked or irrevocable" if sync else "queued for revocation"
        sys.stdout.write(f"{queued} lease(s) {where} {state}\n")
        return 0
    progress = None if sync else _Progress(queued, sys.stderr)
    previous: _Stats | None = None
    still = revoked = irrevocable = 0
    try:
        while True:
            now = _stats(client, stats_params)
            revoked = max(0, now.revoked - before.revoked)
            irrevocable = max(0, now.irrevocable - before.irrevocable)
            done = min(queued, revoked + irrevocable + max(0, now.expired - before.expired))
            if progress is not None:
                progress.update(done)
            still = still + 1 if now == previous else 0
            # Done when nothing is in flight and every queued lease has ended; or
            # when nothing is in flight and nothing moves (counts can differ from
            # `queued` when tombstones are purged or other leases expire meanwhile).
            if sync or (now.revoking == 0 and (done >= queued or still >= _STALL_POLLS)):
                break
            previous = now
            sleep(poll)
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        sys.stderr.write(f"broker: stopped waiting; the server keeps revoking {where}\n")
        return 130
    if progress is not None:
        progress.close()
    elapsed = time.monotonic() - started
    sys.stdout.write(f"revoked {revoked}, irrevocable {irrevocable}, in {elapsed:.1f} s\n")
    if irrevocable:
        raise OperationError(
            f"{irrevocable} lease(s) could not be revoked; see 'broker lease irrevocable {hint}'"
        )
    return 0


# --------------------------------------------------------------------------- commands: tokens


def _auth_rows(auth: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("token", auth.get("client_token")),
        ("token_accessor", auth.get("accessor")),
        ("token_duration", auth.get("lease_duration")),
        ("token_renewable", auth.get("renewable")),
        ("token_policies", auth.get("token_policies")),
        ("policies", auth.get("policies")),
        ("token_meta", auth.get("metadata")),
    ]


def cmd_token_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.policy:
        body["policies"] = args.policy
    if args.ttl is not None:
        body["ttl"] = args.ttl
    if args.explicit_max_ttl is not None:
        body["explicit_max_ttl"] = args.explicit_max_ttl
    if args.display_name:
        body["display_name"] = args.display_name
    if args.meta:
        body["meta"] = dict(args.meta)
    if args.orphan:
        body["no_parent"] = True
    resp = _need(_client(args).request("POST", "auth/token/create", json=body), "token create")
    _show_warnings(resp)
    _print_record(args, resp, _auth_rows(resp.get("auth") or {}))
    return 0


def cmd_token_lookup(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.token_arg:
        resp = client.request("POST", "auth/token/lookup", json={"token": args.token_arg})
    else:
        resp = client.request("GET", "auth/token/lookup-self")
    resp = _need(resp, "token lookup")
    _print_record(args, resp, sorted((resp.get("data") or {}).items()))
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.accessor:
        if not args.token_arg:
            raise UsageError("--accessor needs the ACCESSOR as argument")
        client.request("POST", "auth/token/revoke-accessor", json={"accessor": args.token_arg})
        sys.stdout.write("revoked the token with that accessor\n")
    elif args.token_arg:
        client.request("POST", "auth/token/revoke", json={"token": args.token_arg})
        sys.stdout.write("revoked the token and its children\n")
    else:
        client.request("POST", "auth/token/revoke-self")
        sys.stdout.write("revoked this token (and its children)\n")
    return 0


# --------------------------------------------------------------------------- commands: audit


def cmd_audit_verify(args: argparse.Namespace) -> int:
    try:
        from broker import audit
    except ImportError as exc:
        raise OperationError(
            f"audit verification is not available in this installation: {exc}"
        ) from None
    try:
        key = audit.load_key(args.key_file) if args.key_file else None
    except OSError as exc:
        raise OperationError(
            f"cannot read key file {args.key_file}: {exc.strerror or exc}"
        ) from None
    except ValueError as exc:
        raise OperationError(f"{args.key_file}: {exc}") from None
    try:
        if len(args.files) == 1:
            results = [(args.files[0], audit.verify_file(args.files[0], key))]
        else:
            # Rotated files, oldest first: each must link to the previous one's last line.
            results = audit.verify_files(args.files, key)
    except OSError as exc:
        raise OperationError(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
    code = 0
    for path, result in results:
        if result.ok:
            prefix = f"{path}: " if len(results) > 1 else ""
            sys.stdout.write(f"{prefix}ok: {result.lines} lines\n")
            continue
        code = 1
        where = f"{path}:{result.first_bad_line}" if result.first_bad_line else path
        sys.stdout.write(f"{where}: {' '.join(str(result.reason).split())}\n")
    if key is None and code == 0:
        # Without the key an edit of the last line cannot be seen: say so.
        sys.stderr.write("note: hash chain checked; pass --key-file to check every HMAC too\n")
    return code


# --------------------------------------------------------------------------- parser


def _connection_options(parser: argparse.ArgumentParser, default: Any) -> None:
    # Added to the top parser (defaults None) AND to every leaf with SUPPRESS,
    # so `broker --token T creds ...` and `broker creds ... --token T` both work.
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--address",
        metavar="URL",
        default=default,
        help=f"broker address (env BROKER_ADDR, VAULT_ADDR; default {DEFAULT_ADDRESS})",
    )
    group.add_argument(
        "--token",
        metavar="TOKEN",
        default=default,
        help="token to send (env BROKER_TOKEN, VAULT_TOKEN)",
    )
    group.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=default,
        help="CA bundle to trust for https (env BROKER_CACERT)",
    )
    group.add_argument(
        "--tls-skip-verify",
        action="store_true",
        default=default,
        help="do not verify the server's TLS certificate (insecure)",
    )


def _format_option(parser: argparse.ArgumentParser, choices: Sequence[str]) -> None:
    parser.add_argument(
        "--format",
        choices=choices,
        default=None,
        help="output format (default: table on a terminal, json otherwise)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; each leaf sets ``func``."""
    parser = _Parser(prog="broker", description="Short-lived database and cloud credentials.")
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    _connection_options(parser, None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def leaf(
        group: Any,
        name: str,
        func: Callable[[argparse.Namespace], int],
        help_: str,
        *,
        remote: bool = True,
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=help_, description=help_)
        if remote:
            _connection_options(sub, argparse.SUPPRESS)
        sub.set_defaults(func=func)
        return sub

    p = leaf(commands, "server", cmd_server, "run the broker daemon", remote=False)
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument(
        "--dev",
        action="store_true",
        help="throw-away local server: in-memory root token, loopback only",
    )
    p.add_argument("--dev-root-token-id", metavar="ID", help="root token value in --dev mode")
    p.add_argument("--listen", metavar="HOST:PORT", type=_listen, help="override server.listen")

    operator = commands.add_parser("operator", help="operator actions on a broker's store")
    ops = operator.add_subparsers(dest="operator_command", metavar="COMMAND", required=True)
    p = leaf(ops, "init", cmd_operator_init, "create the root token (once)", remote=False)
    p.add_argument("--config", metavar="FILE", help="TOML config file of the broker")

    p = leaf(commands, "creds", cmd_creds, "issue a credential: GET /v1/MOUNT/creds/ROLE")
    p.add_argument("path", metavar="MOUNT/ROLE", type=_mount_role)
    p.add_argument("--ttl", type=_duration, help="requested lifetime, e.g. 15m (capped at max_ttl)")
    _format_option(p, ["json", "env", "table"])

    from broker import exec as exec_cmd  # imports this module: load it only once we are loaded

    p = leaf(commands, "exec", exec_cmd.cmd_exec,
             "run a command with fresh credentials in its environment; revoke them after")
    p.usage = "broker exec [OPTIONS] MOUNT/ROLE [MOUNT/ROLE ...] -- COMMAND [ARG ...]"
    exec_cmd.configure_parser(p, _mount_role, _duration)

    lease = commands.add_parser("lease", help="look up, renew, list and revoke leases")
    leases = lease.add_subparsers(dest="lease_command", metavar="COMMAND", required=True)
    p = leaf(leases, "lookup", cmd_lease_lookup, "show a lease")
    p.add_argument("lease_id", metavar="LEASE_ID")
    _format_option(p, ["json", "table"])
    p = leaf(leases, "renew", cmd_lease_renew, "extend a lease")
    p.add_argument("lease_id", metavar="LEASE_ID")
    p.add_argument("--increment", type=_duration, help="new lifetime counted from now, e.g. 1h")
    _format_option(p, ["json", "table"])
    p = leaf(leases, "revoke", cmd_lease_revoke, "revoke one lease, or every lease under a prefix")
    p.add_argument("lease_id", metavar="LEASE_ID", nargs="?")
    p.add_argument(
        "--prefix",
        metavar="PREFIX",
        type=_prefix,
        help="revoke every lease whose id starts with PREFIX (e.g. pg/creds/readonly/)",
    )
    p.add_argument(
        "--meta",
        action="append",
        type=_key_value,
        metavar="K=V",
        default=[],
        help="revoke every lease whose metadata has K=V, e.g. run_id=1234 (repeatable; "
        "all must match; --prefix narrows it further)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --prefix/--meta: break-glass, mark revoked whatever the backend answers",
    )
    p.add_argument(
        "--sync", action="store_true", help="with --prefix/--meta: the server answers when done"
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="with --prefix/--meta: return once queued, without progress or summary",
    )
    p = leaf(leases, "list", cmd_lease_list,
             "list lease ids one level below PREFIX, or every lease with --meta K=V")
    p.add_argument("prefix", metavar="PREFIX", type=_prefix, nargs="?")
    p.add_argument("--recursive", "-r", action="store_true", help="walk down to full lease ids")
    p.add_argument("--meta", action="append", type=_key_value, metavar="K=V", default=[],
                   help="leases whose metadata has K=V (repeatable; all must match)")
    p.add_argument("--all", action="store_true", help="with --meta: dead leases (tombstones) too")
    p.add_argument("--format", choices=["ids", "table", "json"], default=None,
                   help="with --meta: output (default ids, one per line)")
    p = leaf(leases, "irrevocable", cmd_lease_irrevocable, "list leases that could not be revoked")
    p.add_argument("prefix", metavar="PREFIX", nargs="?", default="")
    p.add_argument("--limit", type=int, default=None, help="at most this many")
    _format_option(p, ["json", "table"])

    token = commands.add_parser("token", help="create, look up and revoke tokens")
    tokens = token.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    p = leaf(tokens, "create", cmd_token_create, "create a child token")
    p.add_argument("--policy", action="append", metavar="P", help="policy (repeatable)")
    p.add_argument("--ttl", type=_duration, help="token lifetime, e.g. 8h")
    p.add_argument("--explicit-max-ttl", type=_duration, help="hard limit, renewals included")
    p.add_argument("--display-name", metavar="NAME")
    p.add_argument(
        "--meta", action="append", type=_key_value, metavar="K=V", help="metadata (repeatable)"
    )
    p.add_argument(
        "--orphan", action="store_true", help="no parent: survives the parent's revocation"
    )
    _format_option(p, ["json", "table"])
    p = leaf(tokens, "lookup", cmd_token_lookup, "show a token (this one if none given)")
    p.add_argument("token_arg", metavar="TOKEN", nargs="?")
    _format_option(p, ["json", "table"])
    p = leaf(tokens, "revoke", cmd_token_revoke, "revoke a token, its children and their leases")
    p.add_argument("token_arg", metavar="TOKEN", nargs="?", help="default: the token in use")
    p.add_argument("--accessor", action="store_true", help="the argument is an accessor")

    audit = commands.add_parser("audit", help="audit log tools")
    audits = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    p = leaf(
        audits,
        "verify",
        cmd_audit_verify,
        "check the hash chain (and HMACs) of an audit log",
        remote=False,
    )
    p.add_argument(
        "files", metavar="FILE", nargs="+", help="audit log(s); rotated ones oldest first"
    )
    p.add_argument("--key-file", metavar="K", help="HMAC key file of the broker")

    p = leaf(commands, "bench", cmd_bench, "measure speed and scale (docs/performance.md)",
             remote=False)
    p.add_argument("--scenario", action="append", metavar="NAME",
                   help="pg-issue, overhead, expiry, startup, revoke-prefix, ha (repeatable)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the bench runs")
    p.add_argument("--postgres-dsn", metavar="DSN", help="admin DSN of a PostgreSQL server")
    p.add_argument("--leases", type=int, metavar="N", help="leases expiring at once (10000)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser


# --------------------------------------------------------------------------- entry point


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"broker: error: {' '.join(message.split())}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    parser = build_parser()  # sub-parsers inherit _Parser (argparse uses type(parent))
    try:
        args = _parse(parser, list(sys.argv[1:] if argv is None else argv))
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except (ClientError, OperationError) as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `broker lease list pg/ -r | head`: the reader left; not an error.
        _silence_stdout()
        return 0
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, except that ``broker exec ... -- CMD ARGS`` keeps CMD ARGS apart."""
    from broker.exec import split_command

    head, command = split_command(argv)
    if command is not None and "exec" in head:
        args = parser.parse_args(head)
        if args.command == "exec":
            args.command_argv = command
            return args
    return parser.parse_args(argv)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    # `python -m broker.cli`: run the importable module, not this __main__ copy, so
    # modules that import broker.cli (broker.exec) share its exception classes.
    from broker.cli import main as _main

    sys.exit(_main())
