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
from broker.api.audit_limit import Held, RateBuckets, client_key
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

#: malformed requests of one client logged line by line at once (INFO)...
LOG_BURST = 10
#: ...then this many a second; the rest are counted, and said in one line.
LOG_RATE = 1.0
#: client addresses tracked at most (a scan from more shares one count).
LOG_MAX_CLIENTS = 1_000


class RefusalLog(RateBuckets):
    """The log lines of malformed requests, per client address (as the audit limit
    counts them, broker/api/audit_limit.py): ``burst`` at once, then ``rate`` a
    second. Past that they are counted, and ``burst / rate`` seconds after the first
    one left out (the time the bucket takes to fill up again) one line says how
    many, of which kinds: a scanner or a client speaking another protocol writes a
    few lines, not one per request.
    """

    def __init__(self, *, burst: int = LOG_BURST, rate: float = LOG_RATE) -> None:
        super().__init__(burst=burst, rate=rate, summary_after=burst / rate,
                         max_keys=LOG_MAX_CLIENTS)

    def refused(self, remote: str | None, text: str, kind: str) -> None:
        """Log (or count) that the request of client ``remote`` was refused: ``text``."""
        key = client_key(remote)
        if self.admit(key):
            log.info("refused a request from %s: %s (%s)", remote, text, kind)
        else:
            self.hold(key, text)

    def _due(self, key: str) -> None:
        if (held := self.take(key)) is not None:
            self._say(key, held)

    def flush(self) -> None:
        """Say every count still pending (the app stops)."""
        for key in self.pending():
            self._due(key)

    def _say(self, key: str, held: Held) -> None:
        kinds = ", ".join(f"{n} {text}" for text, n in sorted(held.types.items()))
        log.info("refused %d more malformed request(s) from %s in %.1fs (%s); not logged "
                 "one by one past %d at once and %g a second", held.count, key,
                 held.last - held.first, kinds, self.limit["burst"],
                 self.limit["per_second"])


#: the broker's one refusal log (a process serves one app; the loop is the caller's).
_REFUSALS = RefusalLog()


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
        _REFUSALS.refused(request.remote, text,
                          type(exc).__name__ if exc is not None else str(status))
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


async def _flush_refusals(app: web.Application) -> None:
    _REFUSALS.flush()  # counts of malformed requests not said yet: said as the app stops


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
    app.on_cleanup.append(_flush_refusals)
    for table in ROUTE_TABLES:
        app.add_routes(table)
    return app
