"""Shared parts of the command line: settings, errors, output formats, argument types."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from broker.audit import scrub
from broker.client import DEFAULT_ADDRESS, Client
from broker.durations import format_duration, parse_duration

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
        # argparse quotes what it could not parse ("unrecognized arguments: TOKEN",
        # "invalid duration: 'TOKEN'"): a token in the wrong place must not be echoed.
        raise UsageError(f"{scrub(message)} (see '{self.prog} --help')")


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


def _read_token_file(path: str, source: str) -> str:
    """The token in ``path`` without surrounding whitespace; OperationError naming the
    file (never its content) if it cannot be read or holds nothing."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read().strip()
    except OSError as exc:
        raise OperationError(f"cannot read {source} {path}: {exc.strerror or exc}") from None
    except ValueError:  # not UTF-8: not a token either
        raise OperationError(f"cannot read {source} {path}: not a text file") from None
    if not text:
        raise OperationError(f"{source} {path} is empty")
    return text


#: what an argument that takes a secret is given to read it from stdin instead (as vault's CLI).
STDIN_ARG = "-"


def read_stdin_secret(args: argparse.Namespace, what: str) -> str:
    """One line of stdin for the argument ``what`` that was given as ``-``: the secret
    stays out of the process list and shell history. Without echo at a terminal.

    Stdin holds one value: a second ``-`` on the same command line is a UsageError.
    """
    if getattr(args, "_stdin_taken_by", None):
        raise UsageError(f"{what} and {args._stdin_taken_by} both read stdin (-): "
                         "only one argument can")
    args._stdin_taken_by = what
    if sys.stdin is None:  # started with stdin closed
        raise UsageError(f"{what} is - (read stdin), but there is no stdin")
    if sys.stdin.isatty():
        import getpass

        line = getpass.getpass(f"{what}: ")
    else:
        try:
            fd = sys.stdin.fileno()
        except (OSError, ValueError):  # a stand-in without a descriptor (io.StringIO)
            line = sys.stdin.readline()
        else:
            line = _first_line(fd)
    value = line.strip()
    if not value:
        raise UsageError(f"{what} is - but stdin holds no value on its first line")
    return value


#: the longest first line read for a ``-`` argument: a token is far shorter.
_MAX_STDIN_LINE = 64 * 1024


def _first_line(fd: int) -> str:
    """The first line of ``fd``, read a byte at a time so that nothing after it is
    taken (``broker exec --token -``: the rest of stdin is the command's)."""
    data = bytearray()
    while len(data) < _MAX_STDIN_LINE:
        byte = os.read(fd, 1)
        if not byte or byte == b"\n":
            break
        data += byte
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("the first line of stdin is not UTF-8 text") from None


def secret_arg(args: argparse.Namespace, value: str, what: str) -> str:
    """``value`` of the secret argument ``what``: read from stdin if it is ``-``; else
    as given, with a one-line warning that the command line is not a place for it."""
    if value == STDIN_ARG:
        return read_stdin_secret(args, what)
    warn_secret_on_command_line(what)
    return value


def warn_secret_on_command_line(what: str, hint: str = "give - instead to read it from "
                                                      "stdin") -> None:
    """One warning line: ``what`` (never its value) can be read by others where it is."""
    _warn(f"{what} on the command line is visible in the process list (ps) and kept in "
          f"shell history; {hint}")


def _token(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """``--token``, ``--token-file``, then ``BROKER_TOKEN``, ``BROKER_TOKEN_FILE``,
    then ``VAULT_TOKEN``. A token file keeps the token out of the process list, and so
    does ``--token -`` (one line of stdin)."""
    flag: str | None = getattr(args, "token", None)
    flag_file: str | None = getattr(args, "token_file", None)
    if flag is not None and flag_file is not None:
        raise UsageError("--token and --token-file cannot be used together: give one")
    if flag_file is not None:
        return _read_token_file(flag_file, "--token-file")
    if flag == STDIN_ARG:
        # Read once: resolve_settings may be called again for the same args.
        if getattr(args, "_token_from_stdin", None) is None:
            args._token_from_stdin = read_stdin_secret(args, "--token")
        token: str = args._token_from_stdin
        return token
    # Stripped so that a token of only whitespace (an empty token file with a
    # CR LF) counts as unset; Client refuses what is left inside.
    if flag and flag.strip():
        return flag.strip()
    env_token = (environ.get("BROKER_TOKEN") or "").strip()
    env_file = environ.get("BROKER_TOKEN_FILE")
    if env_token and env_file:
        raise UsageError("BROKER_TOKEN and BROKER_TOKEN_FILE are both set: unset one")
    if env_token:
        return env_token
    if env_file:
        return _read_token_file(env_file, "BROKER_TOKEN_FILE")
    return _first((environ.get("VAULT_TOKEN") or "").strip())


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Flags win, then ``BROKER_*``, then ``VAULT_*`` (so existing Vault setups work)."""
    return Settings(
        address=_first(
            getattr(args, "address", None), environ.get("BROKER_ADDR"), environ.get("VAULT_ADDR")
        )
        or DEFAULT_ADDRESS,
        token=_token(args, environ),
        ca_file=_first(
            getattr(args, "tls_ca", None), environ.get("BROKER_CACERT"), environ.get("VAULT_CACERT")
        ),
        skip_verify=bool(getattr(args, "tls_skip_verify", False)),
    )


def warn_token_flag(args: argparse.Namespace) -> None:
    """The command-line warning for ``--token VALUE``, as for a TOKEN argument: once per
    command. Not for ``--token -`` (stdin), a token file, nor ``BROKER_TOKEN`` /
    ``VAULT_TOKEN``, none of which puts the token in ps or shell history."""
    flag = getattr(args, "token", None)
    if flag is None or flag == STDIN_ARG or not flag.strip() \
            or getattr(args, "_token_flag_warned", False):
        return
    args._token_flag_warned = True
    warn_secret_on_command_line("--token TOKEN",
                                "use --token - to read it from stdin, or --token-file FILE")


def _client(args: argparse.Namespace, *, need_token: bool = True) -> Client:
    settings = resolve_settings(args, os.environ)
    warn_token_flag(args)
    if need_token and not settings.token:
        raise UsageError("no token: pass --token-file FILE or --token TOKEN, "
                         "or set BROKER_TOKEN or BROKER_TOKEN_FILE")
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


#: env names the server declared per plugin type (``sys/mounts`` answers carry each
#: backend's ``capabilities.env_names``): third-party plugins get their own names.
SERVER_ENV_NAMES: dict[str, Mapping[str, str]] = {}


def remember_env_names(mounts: Mapping[str, Any]) -> None:
    """Record the ``env_names`` of every mount in a ``sys/mounts`` ``data`` block."""
    for entry in mounts.values():
        if isinstance(entry, dict) and isinstance(entry.get("env_names"), dict) \
                and entry["env_names"]:
            SERVER_ENV_NAMES[str(entry.get("type", ""))] = {
                str(k): str(v) for k, v in entry["env_names"].items()}


def env_for(plugin: str, data: Mapping[str, Any]) -> dict[str, str]:
    """Map a credential's ``data`` to environment variables for ``plugin``.

    Known fields get the names the backend's tools read (``PGPASSWORD``);
    anything else becomes ``BROKER_<KEY>``. Empty (None) fields are left out.
    """
    names = SERVER_ENV_NAMES.get(plugin) or ENV_NAMES.get(plugin, {})
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


def creds_unset(plugin: str, response: Mapping[str, Any]) -> list[str]:
    """The known names of fields the credential has but leaves empty (None).

    An AWS IAM user's key has no ``security_token``: a shell that already holds
    an ``AWS_SESSION_TOKEN`` (its own role) would pair it with the new key, and
    every AWS call would fail. ``--format env`` unsets such names.
    """
    names = SERVER_ENV_NAMES.get(plugin) or ENV_NAMES.get(plugin, {})
    data = response.get("data") or {}
    return [names[key] for key, value in data.items() if value is None and key in names]


def format_env(env: Mapping[str, str], unset: Iterable[str] = ()) -> str:
    """``export NAME=VALUE`` lines, each value quoted for a POSIX shell, then
    ``unset NAME`` for each of ``unset``."""
    return ("".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
            + "".join(f"unset {name}\n" for name in unset))


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


#: what a negative duration starts with (``-5m``, ``-1.5h``, `` -30``).
_NEGATIVE = re.compile(r"\s*-\s*[0-9.]")


def _duration(text: str) -> int:
    if _NEGATIVE.match(text):
        raise argparse.ArgumentTypeError("duration must not be negative")
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    """A count such as ``--leases N`` or ``--limit N``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _creds_path(text: str) -> tuple[str, str, str]:
    """``MOUNT/ROLE``, ``MOUNT/creds/ROLE`` or ``MOUNT/sts/ROLE``: (mount, path kind, role).

    The API path itself (docs/aws.md's ``aws/sts/ROLE``) used to be read as
    mount ``aws/sts`` and fail with the server's "unsupported path". Otherwise
    the role is the last segment and the mount the rest.
    """
    mount, _, role = text.strip("/").rpartition("/")
    base, _, kind = mount.rpartition("/")
    if base and kind in {"creds", "sts"}:
        mount = base
    else:
        kind = "creds"
    if not mount or not role:
        raise argparse.ArgumentTypeError(
            f"expected MOUNT/ROLE or MOUNT/sts/ROLE (e.g. pg/readonly, aws/sts/deploy), "
            f"got {text!r}")
    return mount, kind, role


def _mount_role(text: str) -> tuple[str, str]:
    """``MOUNT/ROLE`` (or ``MOUNT/creds/ROLE``) of ``broker exec``, which issues on
    ``MOUNT/creds/ROLE``: (mount, role)."""
    try:
        mount, kind, role = _creds_path(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected MOUNT/ROLE (e.g. pg/readonly), got {text!r}") from None
    if kind == "sts":
        # exec asks MOUNT/creds/ROLE, which issues the same STS credentials.
        raise argparse.ArgumentTypeError(
            f"{text!r}: exec issues on MOUNT/creds/ROLE, which gives the same STS "
            f"credentials: give {mount}/{role}")
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
