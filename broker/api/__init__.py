"""The HTTP API: Vault's paths and shapes, plus documented extensions."""

from __future__ import annotations

from aiohttp import http_parser, web, web_protocol

from broker.api import creds, leases, login, mounts, system, tokens
from broker.api.common import STATE, error_middleware
from broker.state import BrokerState

__all__ = ["STATE", "create_app"]

# Vault clients (hvac, the vault CLI) send the non-standard LIST method. aiohttp's
# C request parser rejects methods outside its built-in table with "400 Invalid
# method"; the pure-Python parser accepts any RFC 9110 token. Use it for the
# broker's server (requests here are small; the cost is negligible).
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
