"""The parser and the entry point: one ``broker: error: ...`` line for every expected failure."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from broker import __version__
from broker.cli.commands import (
    cmd_audit_hash,
    cmd_audit_verify,
    cmd_bench,
    cmd_creds,
    cmd_operator_init,
    cmd_server,
    cmd_token_capabilities,
    cmd_token_create,
    cmd_token_lookup,
    cmd_token_revoke,
)
from broker.cli.common import (
    OperationError,
    UsageError,
    _creds_path,
    _duration,
    _key_value,
    _listen,
    _mount_role,
    _Parser,
    _positive_int,
    _prefix,
)
from broker.cli.leases import (
    cmd_lease_irrevocable,
    cmd_lease_list,
    cmd_lease_lookup,
    cmd_lease_renew,
    cmd_lease_revoke,
)
from broker.client import DEFAULT_ADDRESS, ClientError

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
        help="token to send (env BROKER_TOKEN, VAULT_TOKEN); - reads it from stdin; a "
        "value here is visible in ps and shell history (warned about): prefer -, or "
        "--token-file",
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        default=default,
        help="read the token to send from FILE (env BROKER_TOKEN_FILE)",
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


#: the help of a TOKEN argument (token lookup, capabilities, revoke).
_FROM_STDIN_HELP = ("- reads the TOKEN from stdin (one line); a token given here is visible in "
                    "ps and shell history (warned about)")


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
        help="local development server on embedded defaults, loopback only; its store "
        "persists under $XDG_STATE_HOME/broker/dev and each start revokes the previous "
        "run's root token",
    )
    p.add_argument("--dev-root-token-id", metavar="ID",
                   help="root token value in --dev mode (- reads it from stdin: an ID "
                        "given here is visible in ps)")
    p.add_argument("--listen", metavar="HOST:PORT", type=_listen, help="override server.listen")
    p.add_argument("--check", action="store_true",
                   help="check the config as the server would, then exit (0 ok, 2 bad)")

    operator = commands.add_parser("operator", help="operator actions on a broker's store")
    ops = operator.add_subparsers(dest="operator_command", metavar="COMMAND", required=True)
    p = leaf(ops, "init", cmd_operator_init, "create the root token (once)", remote=False)
    p.add_argument("--config", metavar="FILE", help="TOML config file of the broker")

    p = leaf(commands, "creds", cmd_creds,
             "issue a credential: GET /v1/MOUNT/creds/ROLE (or /v1/MOUNT/sts/ROLE)")
    p.add_argument("path", metavar="MOUNT/ROLE", type=_creds_path,
                   help="MOUNT/ROLE, or MOUNT/sts/ROLE for an aws mount's STS path")
    p.add_argument("--ttl", type=_duration, help="requested lifetime, e.g. 15m (capped at max_ttl)")
    p.add_argument("--role-arn", metavar="ARN",
                   help="aws assumed_role roles: which of the role's role_arns to assume "
                   "(needed when it has several)")
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
    p.add_argument("--limit", type=_positive_int, default=None, help="at most this many")
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
    p.add_argument("token_arg", metavar="TOKEN", nargs="?", help=_FROM_STDIN_HELP)
    _format_option(p, ["json", "table"])
    p = leaf(tokens, "capabilities", cmd_token_capabilities,
             "what a token (this one if none given) may do on a path")
    p.add_argument("args", metavar="[TOKEN] PATH", nargs="+", help=_FROM_STDIN_HELP)
    # argparse would show "[TOKEN] PATH [[TOKEN] PATH ...]": one path only.
    p.usage = ("%(prog)s [-h] [connection options] [--accessor] [--format {json,table}] "
               "[TOKEN] PATH")
    p.add_argument("--accessor", action="store_true", help="the first argument is an accessor")
    _format_option(p, ["json", "table"])
    p = leaf(tokens, "revoke", cmd_token_revoke, "revoke a token, its children and their leases")
    p.add_argument("token_arg", metavar="TOKEN", nargs="?", help=_FROM_STDIN_HELP)
    p.add_argument("--accessor", action="store_true", help="the argument is an accessor")
    p.add_argument("--self", dest="self_", action="store_true",
                   help="revoke the token in use (as vault token revoke -self)")

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
    p = leaf(audits, "hash", cmd_audit_hash,
             "print the HMAC a token, secret or accessor is written as in the audit log "
             "(to grep for; as sys/audit-hash)",
             remote=False)
    p.add_argument("values", metavar="VALUE", nargs="*",
                   help="values to hash; default (or -): one per line on stdin (keeps them "
                        "out of ps and shell history)")
    # Offline: the key is read from the file the broker's config names (or given).
    key_from = p.add_mutually_exclusive_group(required=True)
    key_from.add_argument("--config", metavar="FILE",
                          help="the broker's config: its [audit] hmac_key_file is used")
    key_from.add_argument("--key-file", metavar="K", help="HMAC key file of the broker")

    p = leaf(commands, "bench", cmd_bench, "measure speed and scale (docs/performance.md)",
             remote=False)
    p.add_argument("--scenario", action="append", metavar="NAME",
                   help="pg-issue, overhead, expiry, startup, revoke-prefix, ha (repeatable)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the bench runs")
    p.add_argument("--postgres-dsn", metavar="DSN", help="admin DSN of a PostgreSQL server")
    p.add_argument("--leases", type=_positive_int, metavar="N",
                   help="leases expiring at once (10000)")
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


#: an option's value that argparse would take for an option: "-5m", "-1.5h" (a plain
#: "-5" it reads as a negative number, since no option of ours looks like one).
_DASH_VALUE = re.compile(r"-[0-9.]")


def _value_options(parser: argparse.ArgumentParser) -> set[str]:
    """The long options, of ``parser`` and every sub-parser, that take one value."""
    names: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= _value_options(sub)
        elif action.nargs is None and action.option_strings:
            names |= {o for o in action.option_strings if o.startswith("--")}
    return names


def _join_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--increment -5m`` as ``--increment=-5m``: argparse takes "-5m" for an unknown
    option and says only "expected one argument"; joined, the value reaches its type,
    which says what is wrong with it. Nothing after ``--`` is touched."""
    options = _value_options(parser)
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return out + argv[i:]
        if arg in options and i + 1 < len(argv) and _DASH_VALUE.match(argv[i + 1]):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, except that ``broker exec ... -- CMD ARGS`` keeps CMD ARGS apart."""
    from broker.exec import split_command

    argv = _join_dash_values(parser, argv)
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
