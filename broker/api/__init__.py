"""The HTTP API: Vault's paths and shapes, plus documented extensions."""

from __future__ import annotations

from aiohttp import http_parser, web, web_protocol

from broker.api import creds, leases, login, mounts, system, tokens
from broker.api.common import STATE, error_middleware
from broker.api.httpparser import ListAwareRequestParser
from broker.state import BrokerState

__all__ = ["STATE", "create_app"]

# Vault clients (hvac, the vault CLI) send the non-standard LIST method, which
# aiohttp's C request parser rejects. The broker's server parses with the C
# parser and moves a connection to the (slower) pure-Python one at its first
# LIST: see broker/api/httpparser.py.
# Without aiohttp's C extensions (AIOHTTP_NO_EXTENSIONS, an exotic platform)
# there is no C parser to wrap: the Python one then parses everything.
if hasattr(http_parser, "HttpRequestParserC"):
    web_protocol.HttpRequestParser = ListAwareRequestParser  # type: ignore[attr-defined,assignment]
else:  # pragma: no cover - CI has the C extensions
    web_protocol.HttpRequestParser = http_parser.HttpRequestParserPy  # type: ignore[attr-defined]


def create_app(state: BrokerState) -> web.Application:
    """The aiohttp application for ``state``; handlers reach it via ``app[STATE]``."""
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=state.config.server.max_request_size,
    )
    app[STATE] = state
    # Specific routes first: /v1/{mount}/creds/{role} must not shadow /v1/sys/...
    app.add_routes(system.routes)
    app.add_routes(leases.routes)
    app.add_routes(tokens.routes)
    app.add_routes(login.routes)
    app.add_routes(mounts.routes)
    app.add_routes(creds.routes)
    return app
