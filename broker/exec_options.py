"""``broker exec``'s command line: its options, checked, and the command after ``--``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.cli.common import OperationError, UsageError
from broker.durations import parse_duration

__all__ = [
    "DEFAULT_HEARTBEAT",
    "TOKEN_VARIABLES",
    "ExecOptions",
    "configure_parser",
    "options_from_args",
    "split_command",
]

DEFAULT_HEARTBEAT = 30


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
