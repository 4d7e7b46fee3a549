"""The ``broker`` command line: run the daemon, and talk to a running one over HTTP.

Every expected failure (bad usage, connection refused, a 4xx/5xx answer) ends
in ONE line on stderr, ``broker: error: ...``, exit code 2 for usage and 1 for
a failed operation. A traceback means a bug.

Modules: ``common`` (settings, errors, output, argument types), ``leases``
(``broker lease ...``), ``commands`` (server, operator, creds, token, audit,
bench), ``mount_info`` (a mount's plugin and variable names, for ``creds
--format env`` and ``exec``), ``app`` (the parser and ``main``); ``broker
exec`` lives in ``broker.exec``.
"""

from __future__ import annotations

from broker.cli.app import build_parser, main
from broker.cli.common import (
    ENV_NAMES,
    OperationError,
    Settings,
    UsageError,
    creds_env,
    creds_unset,
    env_for,
    format_env,
    format_table,
    resolve_settings,
)

__all__ = [
    "ENV_NAMES",
    "OperationError",
    "Settings",
    "UsageError",
    "build_parser",
    "creds_env",
    "creds_unset",
    "env_for",
    "format_env",
    "format_table",
    "main",
    "resolve_settings",
]
