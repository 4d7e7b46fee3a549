"""Request plumbing shared by the handlers: auth, policy checks, bodies, audit, errors.

Every authenticated request writes a ``request`` audit line before anything
happens and a response line (typed by what happened) before the answer
leaves. If either cannot be written, the client gets 503: no audit, no action.
One that fails (an error answer) after its ``request`` line with no line of its
own since gets a ``response`` line with ``outcome: "error"``, the status and the
message (error_middleware): a failed request's line never stands alone.
A request refused before it is authenticated (bad token, failed login, a token
lookup the store did not answer) writes the same two lines, within a
per-client rate limit (broker/api/audit_limit.py); so does one refused before
any handler looks at it or by its handler before any token check (a path or
method the broker does not have, a response-wrapping header, a NUL in the
URL): ``request``, then ``response`` with ``outcome: "error"``. The uses of an
ended token (``reuse_attempt``) are folded per token accessor instead.

Every 503 carries ``Retry-After`` (:func:`error_response`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from aiohttp import web

from broker.api.audit_limit import FailureAuditLimiter, client_key, limiter_for
from broker.audit import event, is_secret_name
from broker.durations import parse_duration
from broker.errors import BadRequest, BrokerError, PermissionDenied, RequestTimeout
from broker.lease import Token, TokenState
from broker.state import BrokerState
from broker.store.deadline import apart, request_budget
from broker.tokens import DeadToken

__all__ = [
    "STATE",
    "Call",
    "error_middleware",
    "identity_of",
    "is_list_request",
    "json_response",
    "method_capability",
    "vault_response",
]

log = logging.getLogger(__name__)

STATE = web.AppKey("broker_state", BrokerState)
CALL: web.RequestKey[Call] = web.RequestKey("broker_call")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Mapping[str, Any] | None, status: int = 200) -> web.Response:
    if body is None:
        return web.Response(status=204)
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, default=str))


def vault_response(call: Call, data: Mapping[str, Any] | None = None, *,
                   auth: Mapping[str, Any] | None = None,
                   warnings: Sequence[str] | None = None,
                   lease_id: str = "", renewable: bool = False, lease_duration: int = 0,
                   top_level: bool = False, status: int = 200) -> web.Response:
    """An answer in Vault's envelope, every field present.

    Vault writes all of them on every answer (sdk/logical/translate_response.go,
    none omitempty), and strict clients need them: vaultrs' ``EndpointResult``
    requires ``lease_id``, ``lease_duration`` and ``renewable``. ``top_level``
    also puts ``data``'s keys beside the envelope, as Vault still does for its
    oldest paths (``sys/mounts``, ``sys/auth``, capabilities); the envelope is
    written last, so a key named ``request_id`` in ``data`` stays under ``data``.
    """
    body: dict[str, Any] = dict(data) if top_level and data else {}
    body.update({
        "request_id": call.request_id,
        "lease_id": lease_id,
        "renewable": renewable,
        "lease_duration": lease_duration,
        "data": data,
        "wrap_info": None,
        "warnings": list(warnings) if warnings else None,
        "auth": auth,
    })
    return json_response(body, status)


#: Seconds a 503 asks the client to wait (``Retry-After``): what it waits for is tried
#: again about every second: the audit log (broker/audit.py PROBE_INTERVAL), the lease
#: store (its probe, broker/store/pg_guard.py), an unhealthy mount (broker/middleware.py
#: RETRY_SPACING). For load balancers, proxies and HTTP clients that honour it (hvac
#: does not retry by itself). (sys/health's 503 is Vault's sealed code, answered
#: without it, as Vault does: not made here.)
RETRY_AFTER = "1"


def error_response(status: int, *messages: str) -> web.Response:
    response = web.json_response({"errors": list(messages)}, status=status)
    if status == 503:
        response.headers["Retry-After"] = RETRY_AFTER
    return response


def _not_json(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


# NaN and Infinity are not JSON (RFC 8259), though Python's parser takes them;
# as a number they break every check. One decoder for every body: json.loads
# with an option builds a new one per call.
_BODY_DECODER = json.JSONDecoder(parse_constant=_not_json)


def method_capability(method: str) -> str:
    """Vault's mapping of HTTP methods to policy capabilities."""
    return {
        "GET": "read",
        "HEAD": "read",
        "LIST": "list",
        "DELETE": "delete",
        "POST": "update",
        "PUT": "update",
    }.get(method, "update")


def is_list_request(request: web.Request) -> bool:
    """A LIST request, or its GET spelling (Vault takes Go's ParseBool spellings;
    hvac's client.list() sends "True")."""
    return request.method == "LIST" or (
        request.method == "GET" and request.query.get("list", "").lower() in {"true", "1", "t"})


def identity_of(token: Token) -> dict[str, Any]:
    """What templated policy paths see for ``token`` (``{{identity.metadata.KEY}}``)."""
    return {
        "metadata": token.metadata,
        "display_name": token.display_name,
        "entity": {"name": token.display_name},
    }


@dataclass
class Call:
    """One API call: who, what, and the audit trail it leaves."""

    request: web.Request
    state: BrokerState
    request_id: str
    path: str
    token: Token | None = None
    body: dict[str, Any] = field(default_factory=dict)
    #: whether the ``request`` line of a request without a token was written (None: not
    #: decided yet); the per-client limit may hold it back.
    request_audited: bool | None = None
    #: this request took its token's last use (num_uses): the token is revoked as the
    #: request ends (:meth:`end_spent_token`).
    spent: bool = False
    #: whether an error answer owes this request its outcome line (error_middleware):
    #: set by its ``request`` line and cleared by any line after it; set too when the
    #: token lookup itself failed (a stalled store), before any line was written.
    outcome_due: bool = False
    #: whether any audit line of this request was written.
    wrote: bool = False

    @property
    def operation(self) -> str:
        return method_capability(self.request.method)

    @property
    def identity(self) -> dict[str, Any]:
        """What templated policy paths may refer to (``{{identity.metadata.KEY}}``)."""
        return {} if self.token is None else identity_of(self.token)

    def auth_block(self) -> dict[str, Any] | None:
        if self.token is None:
            return None
        return {
            "accessor": self.token.accessor,
            "display_name": self.token.display_name or None,
            "policies": self.token.policies,
            "metadata": self.token.metadata or None,
        }

    def request_block(self) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "path": self.path,
            "method": self.request.method,
            "operation": self.operation,
            "remote_addr": self.request.remote,
        }

    async def audit(self, type_: str, *, outcome: str = "ok", **fields: Any) -> None:
        await self.state.audit.write(event(
            type_, outcome=outcome, auth=self.auth_block(), request=self.request_block(),
            **fields))
        # Written: a request line leaves its outcome due, any later line gives it.
        self.outcome_due = type_ == "request"
        self.wrote = True

    async def audit_error(self, status: int, message: str) -> None:
        """The outcome line of a request that failed after its ``request`` line with
        no line of its own since (Vault writes a response entry for every request
        entry): ``response``, ``outcome: "error"``, the status and the message.

        Without a token (a login, a token lookup that failed) it goes through the
        per-client limit of unauthenticated failures, which also decides the
        ``request`` line of a lookup that failed before any was written.
        """
        if self.token is None:
            await self.audit_unauthenticated("response", outcome="error", status=status,
                                             error=message)
        else:
            await self.audit("response", outcome="error", status=status, error=message)

    # -- authentication & authorisation -------------------------------------------
    def presented_token(self) -> str:
        """The token the caller sent: ``X-Vault-Token``, else ``Authorization: Bearer``."""
        raw = self.request.headers.get("X-Vault-Token")
        if not raw:
            header = self.request.headers.get("Authorization", "")
            raw = header[7:].strip() if header.lower().startswith("bearer ") else ""
        return raw

    # -- requests without a token (a login): audit lines within a per-client limit ----
    async def audit_unauthenticated_request(self) -> None:
        """The ``request`` line of a request that has no token yet (a login), if this
        client is within its limit (broker/api/audit_limit.py); else held back, and
        written by :meth:`audit_request_if_held` should the request succeed."""
        self.request_audited = self._limiter().admit(self._client())
        if self.request_audited:
            await self.audit("request")

    async def audit_request_if_held(self) -> None:
        """Before a request without a token changes anything: its ``request`` line, if
        the limit held it back (an action is never left unaudited)."""
        if not self.request_audited:
            self.request_audited = True
            await self.audit("request")

    async def audit_unauthenticated(self, type_: str, *, outcome: str = "denied",
                                    **fields: Any) -> None:
        """The ``type_`` line of a request refused before it was authenticated (a bad
        token, a failed login), after its ``request`` line, within the per-client
        limit; held back (counted in a later summary line) when over it."""
        if self.request_audited is None:  # no request line decided yet: decide now
            self.request_audited = self._limiter().admit(self._client())
            if self.request_audited:
                await self.audit("request")
        if self.request_audited:
            await self.audit(type_, outcome=outcome, **fields)
        else:
            self._limiter().hold(self._client(), type_)

    def _limiter(self) -> FailureAuditLimiter:
        return limiter_for(self.state)

    def _client(self) -> str:
        return client_key(self.request.remote)

    async def authenticate(self, *, consume: bool = True) -> Token:
        """Resolve the caller's token; audit and refuse a missing, unknown or dead one.

        The token is resolved (a store read; for a use-limited token, the write that
        takes one of its uses) before the ``request`` line: a refusal's lines go
        through the per-client limit, an accepted request's never do. ``consume=False``:
        a path Vault serves without a token (``sys/health``, the UI's mount list),
        where one sent along is looked at but takes no use.
        """
        raw = self.presented_token()
        try:
            token = await self.state.tokens.resolve(raw, consume=consume)
        except DeadToken as exc:
            await self._audit_reuse(exc)
            raise
        except PermissionDenied as exc:
            await self.audit_unauthenticated("auth_failure", error=str(exc))
            raise
        except Exception:
            # The lookup itself failed (the store stalled or is down): no line yet. The
            # error answer writes both (error_middleware), within the per-client limit:
            # nothing says the caller holds a token.
            self.outcome_due = True
            raise
        try:
            await self.audit("request")  # before self.token is set: as the line always was
        finally:
            # Even when the line failed: a last use taken is revoked as the request ends.
            self.token = token
            self.spent = token.num_uses < 0
        return token

    async def _audit_reuse(self, exc: DeadToken) -> None:
        """The ``request`` and ``reuse_attempt`` lines of an ended token's use.

        Never held back by the per-client limit: they name the token that leaked, and
        a flood of bad tokens from the same address must not hide them in a count. But
        its holder could write them without end: past the first REUSE_BURST uses of
        one accessor both lines are counted, for one ``suppressed`` line per window
        (broker/api/audit_limit.py, ReuseAuditFold). The answer is the same.
        """
        fold = self._limiter().reuse
        accessor, state = exc.token.accessor, exc.token.state.value
        self.request_audited = fold.admit(accessor)
        if not self.request_audited:
            fold.hold(accessor, "reuse_attempt", remote=self.request.remote, token_state=state)
            return
        await self.audit("request")
        await self.audit("reuse_attempt", outcome="denied", error=str(exc),
                         token_accessor=accessor, token_state=state)

    @property
    def unaudited(self) -> bool:
        """Whether the request has no audit line yet, nor one decided or due: refused
        before any handler looked at it, or by its handler before any token check."""
        return (self.request_audited is None and self.token is None and not self.wrote
                and not self.outcome_due)

    async def end_spent_token(self, response: web.StreamResponse | None
                              ) -> web.StreamResponse | None:
        """Revoke the token whose last use this request took, with its leases, as
        Vault does once the request is done (whatever its outcome); audited as
        ``token_revoke`` with ``reason: "num_uses"``.

        As in Vault, an answer carrying a lease (a credential issued or renewed
        with that last use) is not sent: the lease is being revoked with the
        token, so the caller gets a 400 saying so instead.
        """
        assert self.token is not None
        # With a full command_timeout (the request's budget may be spent by the very
        # stall that failed it) and shielded (a cancelled request still ends it): a
        # token left active here would keep its leases live, and nothing else takes
        # a used-up token's end in hand but the token-expiry job's backstop.
        tokens, leases = await apart(self._end_token_tree(self.token))
        # A renewal keeps its answer, as in Vault (sys/leases/renew may renew a lease
        # another token owns, which this does not revoke).
        withheld = "" if self.path.startswith(_RENEW_PATHS) else _lease_of(response)
        await self.audit("token_revoke", target=self.token.accessor, reason="num_uses",
                         tokens=tokens, leases_queued=leases, withheld_lease=withheld or None)
        if withheld:
            return error_response(400, SPENT_WITH_LEASE)
        return response

    async def _end_token_tree(self, token: Token) -> tuple[int, int]:
        accessors = await self.state.tokens.descendants(token.accessor)
        return await self.state.engine.end_tokens(accessors, state=TokenState.REVOKED)

    def allowed(self, path: str, capability: str) -> bool:
        assert self.token is not None
        return self.state.policies.allows(self.token.policies, path, capability,
                                          identity=self.identity)

    def denied(self, path: str) -> bool:
        """Whether a rule denies ``path`` outright (deny wins over a grant elsewhere)."""
        assert self.token is not None
        return self.state.policies.denies(self.token.policies, path, identity=self.identity)

    async def require(self, path: str, *capabilities: str) -> None:
        """Allow if any of ``capabilities`` is granted on ``path``; else audit and 403."""
        if any(self.allowed(path, cap) for cap in capabilities):
            return
        await self.audit("policy_denied", outcome="denied", checked_path=path,
                         capabilities=list(capabilities))
        raise PermissionDenied(f"permission denied: {capabilities[0]} on {path}")

    # -- input --------------------------------------------------------------------
    async def read_body(self) -> dict[str, Any]:
        """The JSON body (or query parameters for GET/LIST); 400 if it is not an object."""
        data: dict[str, Any] = dict(self.request.query)
        # Every parameter may come in the query (hvac and curl users send some
        # there), but not a secret: a URL lands in access and proxy logs.
        if data:  # (most requests have no query: no generator for them)
            leaked = next((name for name in data if name == "id" or is_secret_name(name)),
                          None)
            if leaked is not None:
                raise BadRequest(f"send {leaked} in the request body, not in the URL: a "
                                 "query string ends up in access logs")
        if self.request.body_exists and self.request.method not in {"GET", "HEAD"}:
            # A deadline on the body: idle_timeout covers idle connections and
            # unfinished headers only, and a client sending headers and then a
            # byte now and then (slowloris on the body) held its socket forever,
            # on routes that read the body before any token check (JWT login).
            limit = self.state.config.server.idle_timeout
            try:
                async with asyncio.timeout(limit):
                    raw = await self.request.read()
            except TimeoutError:
                raise RequestTimeout(f"request body not received within {limit}s "
                                     "(server.idle_timeout)") from None
            except ConnectionError:  # reset, broken pipe, aborted: the peer went away
                raise ClientDisconnected() from None
            if raw.strip():
                try:
                    # (what json.loads does with bytes: UTF-8, -16 or -32, BOM or not)
                    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
                    parsed = _BODY_DECODER.decode(text)
                except (ValueError, UnicodeDecodeError, RecursionError):
                    # RecursionError: nested thousands deep ([[[[...). Not a 500.
                    raise BadRequest("request body is not valid JSON") from None
                if not isinstance(parsed, dict):
                    raise BadRequest("request body must be a JSON object")
                if ("\\u" in text or not text.isascii()) and not _encodable(parsed):
                    raise BadRequest("request body holds an unpaired UTF-16 surrogate "
                                     "(\\ud800-\\udfff), which is not text")
                # JSON spells NUL only as \u0000 (a raw one is invalid JSON): one scan
                # of the text, and the walk only when it is there.
                if "\\u0000" in text and (name := _nul_field(parsed)) is not None:
                    raise BadRequest(nul_message(name))
                data.update(parsed)
        self.body = data
        return data

    def duration(self, name: str) -> int | None:
        value = self.body.get(name)
        if value in (None, ""):
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise BadRequest(f"{name}: {exc}") from None

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self.body.get(name)
        if value is None or value == "":
            if required:
                raise BadRequest(f"missing required parameter {name!r}")
            return None
        if not isinstance(value, str):
            raise BadRequest(f"{name} must be a string")
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.body.get(name, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes"}:
            return True
        if isinstance(value, str) and value.lower() in {"false", "0", "no", ""}:
            return False
        raise BadRequest(f"{name} must be a boolean")


#: Paths whose answer a token's last use never withholds (Vault's exception).
_RENEW_PATHS = ("sys/leases/renew", "sys/renew")

#: Vault's answer when a token's last use would have returned a lease it revokes.
SPENT_WITH_LEASE = ("Secret cannot be returned; token had one use left, so leased "
                    "credentials were immediately revoked.")


def _lease_of(response: web.StreamResponse | None) -> str:
    """The ``lease_id`` of a 200 JSON answer (an issued or renewed lease); "" if none."""
    if not isinstance(response, web.Response) or response.status != 200:
        return ""
    body = response.body
    if not isinstance(body, bytes) or b'"lease_id"' not in body:
        return ""
    try:
        lease_id = json.loads(body).get("lease_id")
    except (ValueError, AttributeError):
        return ""
    return lease_id if isinstance(lease_id, str) else ""


def _encodable(value: dict[str, Any]) -> bool:
    """Whether every string in ``value`` is valid Unicode (JSON lets "\\ud800" through;
    it would fail later, in a hash or a store write, as a 500)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: PostgreSQL text cannot hold NUL (asyncpg fails the query: a 500), SQLite can; a
#: NUL in a name, id, prefix or metadata value is a mistake or a probe on either.
_NUL = "\x00"


def nul_message(name: str) -> str:
    """The 400's text for a NUL in ``name`` (the parameter, never the value)."""
    return f"{_printable(name)} holds a NUL character (\\u0000), which is not allowed"


def _printable(name: str) -> str:
    return name.replace(_NUL, "\\u0000")


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return _NUL in value
    if isinstance(value, dict):
        return any(_NUL in key or _holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


def _nul_field(body: dict[str, Any]) -> str | None:
    """The top-level key of ``body`` under which a NUL is (in a key or a string, at any
    depth), or None. Only called when the text spells one: a body nested deeply
    enough to exhaust the stack was already refused by the parser."""
    for key, value in body.items():
        if _NUL in key or _holds_nul(value):
            return key
    return None


def _nul_in_url(request: web.Request) -> str | None:
    """What names the part of the URL holding a NUL (``%00``): a path parameter (the
    route's ``{name}``), a query parameter, or "the path"; None if there is none.

    In a request line NUL can only be spelled %00 (the HTTP parser refuses a raw
    one), so one substring scan of the raw target decides, every request, at
    O(its length); the parts are looked at only when it is there.
    """
    if "%00" not in request.raw_path:
        return None
    for name, value in request.match_info.items():
        if _NUL in value:
            return name
    for name, value in request.query.items():
        if _NUL in name or _NUL in value:
            return name
    return "the path" if _NUL in request.path else None


def new_call(request: web.Request, path: str) -> Call:
    call: Call = request[CALL]
    call.path = path
    return call


class ClientDisconnected(Exception):
    """The client closed its connection while the broker was reading its request body."""


#: Vault's response-wrapping header (hvac's ``wrap_ttl=``). The broker does not wrap.
WRAP_TTL_HEADER = "X-Vault-Wrap-TTL"
WRAPPING_UNSUPPORTED = "response wrapping (X-Vault-Wrap-TTL) is not supported"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into ``{"errors": [...]}`` with the right status."""
    from broker.engine import new_request_id

    state = request.app[STATE]
    call = request[CALL] = Call(request=request, state=state, request_id=new_request_id(),
                                path=request.path.removeprefix("/v1/"))
    try:
        if (refused := _refused_outright(call)) is not None:
            await _audit_failure(call, *refused)
            return refused[0]
        if not state.serving and request.path != "/v1/sys/health":
            return error_response(503, "broker is shutting down")
        # All the store calls the request makes share one command_timeout.
        with request_budget():
            try:
                response = await handler(request)
            except Exception as exc:
                return await _failed(call, exc)
            except BaseException:
                if call.spent:  # cancelled (the client left, a shutdown): ended all the same
                    _end_spent_later(call)
                raise
            if call.spent:  # one attribute test for every other request
                return await call.end_spent_token(response) or response
            if (response.status >= 400 and (call.outcome_due or call.unaudited)
                    and call.path != "sys/health"):
                # A refusal the handler returned (a 405 on a read-only path): before
                # any token check, on record as any unauthenticated failure; after
                # its request line, that line's outcome. (sys/health answers its
                # Vault status codes by design: not a refusal.)
                await _audit_failure(call, response, _errors_of(response))
            return response
    except Exception as exc:
        # A failure after the handler's (the spent token's revocation): its outcome
        # line, if one was due, was written or tried already.
        answer = _error_answer(request, state, exc)
        if answer is None:
            raise
        return answer[0]
    finally:
        # The call holds the request and the request holds the call. Unlinked,
        # a request's objects (a dozen: the request, its headers, match info,
        # writer, call, token) are freed as it ends; linked, every request was
        # cyclic garbage, and collecting it took ~5 % of the event loop's CPU.
        del request[CALL]


def _refused_outright(call: Call) -> tuple[web.Response, str] | None:
    """The 400 (and its message) of a request refused before any handler runs:
    nothing is issued, revoked or changed; None if it is not. Its lines are
    written as an unauthenticated failure's, within the per-client limit; the
    token, if one was sent, is not looked at (a refusal is no use of it).
    """
    request = call.request
    # A client asking for wrapping expects the secret to travel only inside a
    # single-use wrapping token; answering in plaintext would hand it to every
    # relay the client meant to keep it from. (One header lookup per request.)
    if request.headers.get(WRAP_TTL_HEADER):
        message = WRAPPING_UNSUPPORTED
    # Checked here, once for every route, before anything reaches a store: the
    # request's body strings are checked as Call.read_body parses them.
    elif (name := _nul_in_url(request)) is not None:
        message = nul_message(name)
        # Decoded, as every path is audited, with the NUL spelt as sent: the credential
        # filter must see a token in it however it was escaped (%62rk. is brk.).
        call.path = call.path.replace(_NUL, "%00")
    else:
        return None
    return error_response(400, message), message


async def _failed(call: Call, exc: Exception) -> web.StreamResponse:
    """The answer to a handler that raised ``exc``; its outcome line if the handler
    wrote none after the ``request`` line (an error never leaves a request line
    alone in the log), or both lines if the request was refused before any line
    (a path or method the broker does not have, a check before the token's); the
    end of a token whose last use the request took."""
    answer = _error_answer(call.request, call.state, exc)
    # (only on failure: nothing on success)
    if answer is not None and (call.outcome_due or call.unaudited):
        await _audit_failure(call, *answer)
    if call.spent:  # refused or failed, the last use is used all the same
        try:
            await call.end_spent_token(None)
        except Exception as end_exc:  # the client gets its request's error, not this one
            log.warning("request %s: could not end the token whose last use it took "
                        "(%s); the token-expiry job ends it", call.request_id,
                        type(end_exc).__name__)
    if answer is None:
        raise exc
    return answer[0]


#: revocations of spent tokens whose request was cancelled, kept until done
_ENDING: set[asyncio.Task[Any]] = set()


def _end_spent_later(call: Call) -> None:
    """End the token whose last use a cancelled request took, in a task of its own."""
    task = asyncio.ensure_future(call.end_spent_token(None))
    _ENDING.add(task)
    task.add_done_callback(_ENDING.discard)


async def _audit_failure(call: Call, answer: web.StreamResponse, message: str) -> None:
    """:meth:`Call.audit_error`; a failed write does not replace the answer."""
    try:
        await call.audit_error(answer.status, message)
    except Exception as exc:
        # The audit log down: its own error says so (logged, and in sys/health). The
        # client gets the error its request met, not the log's 503 over it; and its
        # action, if any, was refused or failed already. (Debug: one per request.)
        log.debug("outcome line of request %s not written: %s", call.request_id,
                  type(exc).__name__)


def _error_answer(request: web.Request, state: BrokerState, exc: Exception
                  ) -> tuple[web.Response, str] | None:
    """``{"errors": [...]}`` with the right status for ``exc``, and what the audit line
    says of it; None for an HTTPException that is no error (re-raised)."""
    if isinstance(exc, BrokerError):
        return error_response(exc.status, str(exc)), str(exc)
    if isinstance(exc, ClientDisconnected):
        # Nobody to answer, and not the broker's fault: no ERROR, no traceback.
        log.info("client %s closed the connection before its request body arrived (%s %s)",
                 request.remote, request.method, request.rel_url.raw_path)
        return _answer(400, "connection closed before the request body arrived")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return _answer(413, "request body too large "
                       f"(limit {state.config.server.max_request_size} bytes)")
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            return None
        text = {404: "unsupported path", 405: f"method {request.method} not allowed here"}
        message = text.get(exc.status, exc.reason)
        response = error_response(exc.status, message)
        if "Allow" in exc.headers:  # a 405 must say what is allowed (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response, message
    # The path as sent (percent-encoded): the decoded one may hold control
    # characters (a NUL, a line break) that do not belong in a log line.
    log.error("internal error on %s %s", request.method, request.rel_url.raw_path,
              exc_info=exc)
    return (error_response(500, "internal error; see the broker log"),
            f"internal error ({type(exc).__name__}); see the broker log")


def _answer(status: int, message: str) -> tuple[web.Response, str]:
    return error_response(status, message), message


def _errors_of(response: web.StreamResponse) -> str:
    """The message of an ``{"errors": [...]}`` answer (a handler's own refusal), for its
    audit line; its status phrase if it has none (a bare 404)."""
    body = response.body if isinstance(response, web.Response) else None
    try:
        errors = json.loads(body)["errors"] if isinstance(body, bytes) else []
    except (ValueError, TypeError, KeyError):
        errors = []
    if errors and isinstance(errors[0], str):
        return "; ".join(e for e in errors if isinstance(e, str))
    return response.reason


#: The methods that would change what a path shows: a read-only path's 405 says why.
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def not_allowed(request: web.Request, allowed: tuple[str, ...], text: str | None = None, *,
                read_only: str | None = None) -> web.Response:
    """405 with the ``Allow`` header (RFC 9110), saying why a write cannot be done here.

    ``read_only``: for a write, what follows the text, e.g. where what the path
    shows is set instead (roles and policies come from the config file).
    """
    text = text or f"method {request.method} not allowed here"
    if read_only and request.method in WRITE_METHODS:
        text += f": {read_only}"
    response = error_response(405, text)
    response.headers["Allow"] = ",".join(allowed)  # as aiohttp writes it
    return response
