"""The HTTP API: Vault's paths and shapes, plus documented extensions."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from aiohttp import http_exceptions, http_parser, web, web_protocol, web_response

from broker.api import (
    audit_devices,
    audit_hash,
    auth_roles,
    capabilities,
    creds,
    db_config,
    leases,
    login,
    mount_info,
    mounts,
    policies,
    roles,
    system,
    tokens,
)
from broker.api.common import STATE, error_middleware, error_response
from broker.api.httpparser import ListAwareRequestParser
from broker.state import BrokerState

__all__ = ["ROUTE_TABLES", "STATE", "create_app"]

#: Every module's routes, in the order the app adds them. Specific routes first:
#: /v1/{mount}/creds/{role} must not shadow /v1/sys/... aiohttp tries the routes
#: with the longest fixed prefix first (/v1/auth/{method}/login before
#: /v1/{mount}/roles/{role}), then in this order: the roles routes come last.
ROUTE_TABLES: tuple[web.RouteTableDef, ...] = (
    system.routes,
    audit_hash.routes,  # sys/audit-hash/{device}
    audit_devices.routes,  # sys/audit (read-only: the one audit log as Vault's file device)
    mount_info.routes,
    capabilities.routes,
    policies.routes,
    leases.routes,
    tokens.routes,
    login.routes,
    auth_roles.routes,  # auth/NAME/role, auth/NAME/config (read-only)
    # Before mounts: {mount}/rotate-root/{connection} checks the connection's name first.
    db_config.rotate_routes,
    mounts.routes,
    # {mount}/config/{name} after mounts: a POST to {mount}/config/rotate-root is rotate-root.
    db_config.routes,  # {mount}/config, {mount}/reset/{name} (read-only)
    creds.routes,
    roles.routes,
)

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


# A request the HTTP parser rejects (a header over 8 KiB, a verb outside its
# table, a broken chunk) never reaches a handler or the error middleware:
# aiohttp answers it itself, in plain text, and logs the parser's message with
# a traceback at ERROR. Every answer of the API is {"errors": [...]}
# (DESIGN.md), so that one is too; and the parser's message is neither echoed
# nor logged: it quotes the refused bytes, which may be a header's value (a
# token), and any port scanner would fill the log with tracebacks.
log = logging.getLogger(__name__)


def _protocol_error_reason(exc: BaseException | None) -> str:
    if isinstance(exc, http_exceptions.LineTooLong):
        return "malformed HTTP request: request line or header too long"
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return "malformed HTTP request: unknown method"
    return "malformed HTTP request"


def _json_handle_error(self: web_protocol.RequestHandler, request: Any, status: int = 500,
                       exc: BaseException | None = None,
                       message: str | None = None) -> web.StreamResponse:
    if request.writer.output_size > 0:  # as aiohttp's: half an answer is out, the line is lost
        raise ConnectionError("Response is sent already, cannot send another response "
                              "with the error message")
    if status == 500:
        log.error("internal error on a request from %s", request.remote, exc_info=exc)
        text = "internal error; see the broker log"
    else:
        text = (_protocol_error_reason(exc) if status == 400
                else message or HTTPStatus(status).phrase)
        log.info("refused a request from %s: %s (%s)", request.remote, text,
                 type(exc).__name__ if exc is not None else status)
    response = error_response(status, text)
    response.headers[CACHE_CONTROL] = NO_STORE
    response.force_close()
    return response


web_protocol.RequestHandler.handle_error = _json_handle_error  # type: ignore[method-assign]

# aiohttp names itself and Python, with versions, in every answer's Server
# header: a free hint for anyone matching versions to known bugs.
web_response.SERVER_SOFTWARE = "broker"  # type: ignore[attr-defined]


#: Every answer says no cache may keep it, as Vault's do (http/handler.go,
#: wrapGenericHandler): credentials, tokens and lease ids must not stay in a proxy's
#: or a client library's cache.
CACHE_CONTROL = "Cache-Control"
NO_STORE = "no-store"


async def _no_store(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[CACHE_CONTROL] = NO_STORE


def create_app(state: BrokerState) -> web.Application:
    """The aiohttp application for ``state``; handlers reach it via ``app[STATE]``."""
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=state.config.server.max_request_size,
    )
    app[STATE] = state
    # on_response_prepare reaches every answer of the app: the handlers', the error
    # middleware's and aiohttp's own (a 404, a HEAD).
    app.on_response_prepare.append(_no_store)
    for table in ROUTE_TABLES:
        app.add_routes(table)
    return app
