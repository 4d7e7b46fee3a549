"""``POST /v1/auth/{NAME}/login``: trade a CI system's signed JWT for a broker token.

Same request and answer as Vault's JWT auth method, so ``hvac``'s
``client.auth.jwt.jwt_login(role=..., jwt=..., path=NAME)`` works unchanged.
No broker token is needed. Every refusal is audited as ``auth_failure`` with
the reason and the (unverified) issuer, subject and key id, never the JWT, and
its ``jti`` only as the audit HMAC (``broker audit hash`` finds it), within a
per-client limit (what it holds back is counted in a summary line,
broker/api/audit_limit.py); a success is audited as ``login`` with the new
token's accessor (the token itself only as an HMAC). A second login with a JWT
a ``single_use`` role has seen is audited as ``reuse_attempt``.
"""

from __future__ import annotations

import weakref
from typing import Any

from aiohttp import web

from broker.api.common import CALL, Call, vault_response
from broker.api.tokens import auth_block
from broker.audit import shown
from broker.auth import JWTAuthMethod, JWTReplayed, build_auth_methods, describe_token
from broker.config import Config
from broker.errors import BadRequest, BrokerError, NotFound
from broker.state import BrokerState
from broker.store.deadline import apart
from broker.tokens import new_accessor

__all__ = ["auth_methods", "close_auth_methods", "reload_auth_methods", "routes"]

routes = web.RouteTableDef()

# Methods built from a config that the server did not build them for (see
# auth_methods), by id(config). The weak reference drops the entry, and with
# it the cached keys, when a reload replaces the config.
_lazy: dict[int, tuple[weakref.ref[Config], dict[str, JWTAuthMethod]]] = {}


def auth_methods(state: BrokerState) -> dict[str, JWTAuthMethod]:
    """The auth methods of ``state``: the server's, else built once per config object."""
    if state.auth_methods:
        return state.auth_methods
    config = state.config
    entry = _lazy.get(id(config))
    if entry is not None and entry[0]() is config:
        return entry[1]
    return _remember(config, build_auth_methods(config))


def _remember(config: Config, methods: dict[str, JWTAuthMethod]) -> dict[str, JWTAuthMethod]:
    key = id(config)
    _lazy[key] = (weakref.ref(config, lambda _ref: _lazy.pop(key, None)), methods)
    return methods


async def reload_auth_methods(state: BrokerState, old: Config) -> None:
    """After a reload replaced ``old`` with ``state.config``: rebuild the auth methods.

    A method whose key settings are unchanged keeps its key source, cached
    keys included (``build_auth_methods``); the others' background refreshes
    are stopped instead of running on for a method nobody can reach.
    """
    entry = _lazy.pop(id(old), None)
    previous = entry[1] if entry is not None and entry[0]() is old else {}
    if not previous:
        return  # never built: the new config's are built at the first login
    methods = _remember(state.config, build_auth_methods(state.config, previous))
    kept = {id(method.keys) for method in methods.values()}
    for method in previous.values():
        if id(method.keys) not in kept:
            await method.close()


async def close_auth_methods(state: BrokerState) -> None:
    """Stop the auth methods' background work (a JWKS refresh in flight); at shutdown."""
    methods = list(state.auth_methods.values())
    entry = _lazy.pop(id(state.config), None)
    if entry is not None and entry[0]() is state.config:
        methods += entry[1].values()
    for method in methods:
        await method.close()


def _check_strings(body: dict[str, Any], *names: str) -> None:
    """400 naming the field whose value is not a string: ``{"role": 5}`` is not a
    missing role, and saying so sent callers looking for the wrong mistake."""
    for name in names:
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"{name} must be a string")


@routes.post("/v1/auth/{method}/login")
@routes.put("/v1/auth/{method}/login")
async def login(request: web.Request) -> web.Response:
    call: Call = request[CALL]
    name = request.match_info["method"]
    # Written before anything happens, as for every request: no audit, no login. Anyone
    # can send a login, so within the per-client limit of unauthenticated requests.
    await call.audit_unauthenticated_request()
    body: dict[str, Any] = {}
    # Chosen before the token is made: a single_use role's record of the JWT names it.
    accessor = new_accessor()
    try:
        body = await call.read_body()
        method = auth_methods(call.state).get(name)
        if method is None:
            # "token" is the token auth method itself, which has no login (nor in Vault).
            raise NotFound(
                "'token' is the token auth method, which has no login (as in Vault): log "
                "in at auth/NAME/login of an [auth.jwt.NAME] method, or create a token "
                "with auth/token/create" if name == "token"
                else f"no auth method {name!r} is configured ([auth.jwt.{name}])")
        _check_strings(body, "role", "jwt")
        result = await method.login(body.get("role"), body.get("jwt"))
        await call.audit_request_if_held()  # a verified login: its request line, if held
        await method.record_use(call.state.store, result, accessor)
    except Exception as exc:
        # A bug (an exception no check turned into a refusal) answers 500, but the
        # attempt is still on the record: no login goes unaudited.
        refused = isinstance(exc, BrokerError | web.HTTPException)
        error = str(exc) if refused else f"internal error: {type(exc).__name__}"
        role = body.get("role")
        replayed = {"first_accessor": exc.first_accessor or None} \
            if isinstance(exc, JWTReplayed) else {}
        # The jti as the audit HMAC, as the store keeps only its hash: `broker audit
        # hash` of a jti finds its lines.
        presented = describe_token(body.get("jwt"), call.state.audit.hmac)
        await call.audit_unauthenticated("reuse_attempt" if replayed else "auth_failure",
                                         outcome="denied" if refused else "error",
                                         error=error, auth_method=name,
                                         role=shown(role) if isinstance(role, str) else None,
                                         **replayed, **presented)
        raise
    try:
        token, record = await call.state.tokens.create(
            policies=result.policies,
            ttl=result.ttl,
            max_ttl=result.max_ttl,
            display_name=result.display_name,
            metadata=result.metadata,
            parent=None,  # a login token is an orphan: nothing above it revokes it
            renewable=True,
            accessor=accessor,
            path=f"auth/{name}/login",  # as Vault's token lookups show a login's token
            num_uses=result.role.token_num_uses,
            # A periodic role's token: TTL = period, renewed by it, capped only at the
            # role's token_explicit_max_ttl (max_ttl), as in Vault.
            period=result.period,
        )
    except Exception:
        # No token was made: a single_use JWT is not used up (a store blip must not turn
        # the job's retry into a "replay"). With a full command_timeout: the stall that
        # failed the token's write has spent the request's store budget.
        await apart(method.forget_use(call.state.store, result, accessor))
        raise
    call.token = record
    await call.audit("login", auth_method=name, role=result.role.name,
                     created={"accessor": record.accessor, "policies": record.policies,
                              "client_token": token})
    return vault_response(call, None, auth=auth_block(token, record, call.state.engine.clock()))
