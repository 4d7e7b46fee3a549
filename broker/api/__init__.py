"""The HTTP API: Vault's paths and shapes, plus documented extensions."""

from __future__ import annotations

from aiohttp import web

from broker.api import creds, leases, system, tokens
from broker.api.common import STATE, error_middleware
from broker.state import BrokerState

__all__ = ["STATE", "create_app"]


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
    app.add_routes(creds.routes)
    return app
