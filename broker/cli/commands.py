"""``broker server|bench|operator|creds|token|audit``: the commands that are not about leases."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from broker.audit import looks_like_credential, scrub
from broker.cli.common import (
    STDIN_ARG,
    OperationError,
    UsageError,
    _client,
    _need,
    _output_format,
    _print_json,
    _show_warnings,
    _warn,
    creds_env,
    creds_unset,
    format_env,
    format_table,
    read_stdin_secret,
    secret_arg,
    warn_secret_on_command_line,
)
from broker.cli.leases import (
    _print_record,
)
from broker.cli.mount_info import mount_plugins
from broker.client import Client

# --------------------------------------------------------------------------- commands: daemon


def cmd_server(args: argparse.Namespace) -> int:
    if not args.config and not args.dev:
        raise UsageError("pass --config FILE, or --dev for a local development server")
    if args.dev_root_token_id and not args.dev:
        raise UsageError("--dev-root-token-id only applies with --dev")
    if args.dev_root_token_id == STDIN_ARG:
        args.dev_root_token_id = read_stdin_secret(args, "--dev-root-token-id")
        _check_dev_root_token_id(args.dev_root_token_id)
    elif args.dev_root_token_id:
        _check_dev_root_token_id(args.dev_root_token_id)
        # In ps for the server's whole run (said after the check: a bad id stays one line).
        warn_secret_on_command_line("--dev-root-token-id ID",
                                    "use --dev-root-token-id - to read it from stdin")
    if args.check:
        if args.dev or not args.config:
            raise UsageError("--check takes --config FILE (not --dev)")
        from broker.server import check_server_config

        return check_server_config(args.config, listen=args.listen)
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


def _check_dev_root_token_id(token_id: str) -> None:
    """Refuse an id the server would refuse, before it starts: a usage error, not a traceback."""
    from broker.errors import BadRequest
    from broker.tokens import check_token_id

    try:
        check_token_id(token_id)
    except BadRequest as exc:
        raise UsageError(f"--dev-root-token-id: {exc}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    # Imported here: the bench pulls in the server, asyncpg and the scenarios.
    from broker.bench import main as bench_main

    return bench_main(args)


def cmd_operator_init(args: argparse.Namespace) -> int:
    if not args.config:
        raise UsageError("pass --config FILE (the config of the broker to initialise)")
    from broker.config import ConfigError

    try:
        from broker.server import InitError, operator_init
    except ImportError as exc:
        raise OperationError(f"the server is not available in this installation: {exc}") from None
    try:
        token = operator_init(args.config)
    except ConfigError as exc:
        # Exit 2, as `broker server` with the same file.
        sys.stderr.write(f"broker: error: {exc}\n")
        return 2
    except InitError as exc:
        raise OperationError(str(exc)) from None
    # The warning goes to stderr so `TOKEN=$(broker operator init ...)` captures only the token.
    sys.stderr.write(
        "Root token below. It is shown ONCE and grants every permission: store it in a\n"
        "password manager or secret store now, and use it only to create less powerful tokens.\n"
    )
    sys.stdout.write(token + "\n")
    return 0


# --------------------------------------------------------------------------- commands: creds


def _mount_plugin(client: Client, mount: str) -> tuple[str | None, list[str]]:
    """The plugin type of ``mount`` (None if we may not read it) and the warnings to show
    once the credential is issued; OperationError if an older broker says it has no such
    mount (``sys/internal/ui/mounts`` answers a missing mount as one we may not use)."""
    found = mount_plugins(client, [mount])
    if mount in found.missing:
        raise OperationError(f"no mount named {mount!r} (see GET /v1/sys/mounts)")
    return found.plugins.get(mount), found.warnings


def cmd_creds(args: argparse.Namespace) -> int:
    mount, kind, role = args.path
    fmt = _output_format(args)
    if args.role_arn is not None and not args.role_arn.strip():
        raise UsageError("--role-arn must not be empty")
    client = _client(args)
    # Ask for the plugin type BEFORE issuing, so a failure here does not leave
    # an unused credential behind.
    plugin, warnings = _mount_plugin(client, mount) if fmt == "env" else (None, [])
    params: dict[str, Any] = {}
    if args.ttl is not None:
        params["ttl"] = args.ttl
    if args.role_arn is not None:
        # Vault's request parameter (docs/aws.md); the server checks it against the role.
        params["role_arn"] = args.role_arn.strip()
    resp = _need(client.request("GET", f"{mount}/{kind}/{role}", params=params or None),
                 "creds")
    # Said only now: a token refused altogether (or a mount that does not exist) fails
    # the issue with one error line, not a warning about the variable names first.
    for warning in warnings:
        _warn(warning)
    _show_warnings(resp)
    if fmt == "json":
        _print_json(resp)
    elif fmt == "env":
        sys.stdout.write(format_env(creds_env(plugin or "", resp),
                                    creds_unset(plugin or "", resp)))
    else:
        rows = [
            ("lease_id", resp.get("lease_id")),
            ("lease_duration", resp.get("lease_duration")),
            ("lease_renewable", resp.get("renewable")),
            *(resp.get("data") or {}).items(),
        ]
        sys.stdout.write(format_table(rows))
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
    # Vault's orphan path: its policy decides (no_parent on create needs root or sudo).
    path = "auth/token/create-orphan" if args.orphan else "auth/token/create"
    resp = _need(_client(args).request("POST", path, json=body), "token create")
    _show_warnings(resp)
    _print_record(args, resp, _auth_rows(resp.get("auth") or {}))
    return 0


def cmd_token_lookup(args: argparse.Namespace) -> int:
    token = secret_arg(args, args.token_arg, "TOKEN") if args.token_arg else None
    client = _client(args)
    if token:
        resp = client.request("POST", "auth/token/lookup", json={"token": token})
    else:
        resp = client.request("GET", "auth/token/lookup-self")
    resp = _need(resp, "token lookup")
    _print_record(args, resp, sorted((resp.get("data") or {}).items()))
    return 0


def cmd_token_capabilities(args: argparse.Namespace) -> int:
    """``vault token capabilities [TOKEN] PATH``: what a token may do on a path."""
    values = args.args
    if len(values) not in (1, 2):
        raise UsageError("give PATH, or TOKEN PATH (with --accessor: ACCESSOR PATH)")
    if args.accessor and len(values) != 2:
        raise UsageError("--accessor needs the ACCESSOR and the PATH")
    *who, path = values
    _check_capabilities_path(path, alone=not who)
    if args.accessor:
        # An accessor is no secret: no warning, but - still reads it from stdin.
        who = [read_stdin_secret(args, "ACCESSOR") if who[0] == STDIN_ARG else who[0]]
    elif who:
        who = [secret_arg(args, who[0], "TOKEN")]
    client = _client(args)
    if args.accessor:
        resp = client.request("POST", "sys/capabilities-accessor",
                              json={"accessor": who[0], "paths": [path]})
    elif who:
        resp = client.request("POST", "sys/capabilities", json={"token": who[0], "paths": [path]})
    else:
        resp = client.request("POST", "sys/capabilities-self", json={"paths": [path]})
    caps = (_need(resp, "token capabilities").get("data") or {}).get(path, [])
    if _output_format(args) == "json":
        _print_json({path: caps})
    else:
        sys.stdout.write(", ".join(caps) + "\n")  # as the vault CLI prints them
    return 0


def _check_capabilities_path(path: str, *, alone: bool) -> None:
    """UsageError, which never repeats it, unless ``path`` can be the PATH of ``token
    capabilities``. One argument is the PATH (Vault's form, for the token in use): a
    token given alone (``broker token capabilities "$TOKEN"``) would otherwise be sent
    to the server as a path and printed back as the key of the answer."""
    if path == STDIN_ARG:
        raise UsageError("- (read the TOKEN from stdin) comes before the PATH: give - PATH"
                         if alone else "PATH is -: give the path itself")
    # A path has a "/" (brk.app/creds/x: a mount may be named so): refused only when a
    # whole token is inside it; a value without one is refused when it is shaped like one.
    if scrub(path) != path or ("/" not in path and looks_like_credential(path)):
        raise UsageError(
            "the PATH argument looks like (or holds) a token: give TOKEN PATH (or - PATH "
            "to read the token from stdin), or PATH alone for the token in use" if alone else
            "the PATH argument looks like (or holds) a token: the TOKEN comes first, then "
            "the PATH")


def cmd_token_revoke(args: argparse.Namespace) -> int:
    # The token in use only when asked by name (--self), as vault's -self: an
    # empty "$VAR" must not revoke the caller, its children and all their leases.
    if args.self_:
        if args.token_arg is not None or args.accessor:
            raise UsageError("--self takes no TOKEN and no --accessor")
    elif args.token_arg is None:
        raise UsageError("name the TOKEN to revoke (or --accessor ACCESSOR), "
                         "or --self for the token in use")
    elif not args.token_arg.strip():
        raise UsageError("the TOKEN argument is empty")
    target: str = args.token_arg or ""  # (--self: none)
    if args.accessor:
        # An accessor is no secret: no warning, but - still reads it from stdin.
        target = read_stdin_secret(args, "ACCESSOR") if target == STDIN_ARG else target
    elif not args.self_:
        target = secret_arg(args, target, "TOKEN")
    client = _client(args)
    if args.self_:
        client.request("POST", "auth/token/revoke-self")
        sys.stdout.write("revoked this token (and its children)\n")
    elif args.accessor:
        client.request("POST", "auth/token/revoke-accessor", json={"accessor": target})
        sys.stdout.write("revoked the token with that accessor\n")
    else:
        client.request("POST", "auth/token/revoke", json={"token": target})
        sys.stdout.write("revoked the token and its children\n")
    return 0


# --------------------------------------------------------------------------- commands: audit


def _audit_key(path: str) -> bytes:
    """The audit HMAC key in ``path``; a one-line OperationError if it cannot be used."""
    from broker import audit

    try:
        return audit.load_key(path)
    except OSError as exc:
        raise OperationError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise OperationError(f"{path}: {exc}") from None


def _audit_key_file(config_path: str) -> str:
    """``[audit] hmac_key_file`` of the config at ``config_path`` (only that table is read)."""
    from broker.config import ConfigError, load_audit_config

    try:
        return load_audit_config(config_path).hmac_key_file
    except ConfigError as exc:
        raise OperationError(str(exc)) from None


def cmd_audit_hash(args: argparse.Namespace) -> int:
    """``broker audit hash``: the HMAC a secret is written as, to search the log by it."""
    from broker import audit

    key = _audit_key(args.key_file or _audit_key_file(args.config))
    # From stdin by default (or given as -): a token on the command line lands in shell
    # history and ps; still taken there, with a warning.
    if args.values and args.values != [STDIN_ARG]:
        if STDIN_ARG in args.values:
            raise UsageError("give VALUEs or - (one per line on stdin), not both")
        warn_secret_on_command_line("VALUE", "give none (or -) to read them from stdin, "
                                             "one per line")
    values = [v for v in args.values if v != STDIN_ARG] or \
        [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    for value in values:
        sys.stdout.write(audit.hash_value(key, value) + "\n")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    try:
        from broker import audit_verify
    except ImportError as exc:
        raise OperationError(
            f"audit verification is not available in this installation: {exc}"
        ) from None
    key = _audit_key(args.key_file) if args.key_file else None
    try:
        if len(args.files) == 1:
            results = [(args.files[0], audit_verify.verify_file(args.files[0], key))]
        else:
            # Rotated files, oldest first: each must link to the previous one's last line.
            results = audit_verify.verify_files(args.files, key)
    except OSError as exc:
        raise OperationError(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
    code = 0
    for path, result in results:
        if result.ok:
            prefix = f"{path}: " if len(results) > 1 else ""
            sys.stdout.write(f"{prefix}ok: {result.lines} lines\n")
            if result.note:
                sys.stderr.write(f"note: {prefix}{result.note}\n")
            continue
        code = 1
        where = f"{path}:{result.first_bad_line}" if result.first_bad_line else path
        sys.stdout.write(f"{where}: {' '.join(str(result.reason).split())}\n")
    if key is None and code == 0:
        # Without the key an edit of the last line cannot be seen: say so.
        sys.stderr.write("note: hash chain checked; pass --key-file to check every HMAC too\n")
    return code
