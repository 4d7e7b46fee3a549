"""``/v1/auth/token/*``: create, look up, renew and revoke tokens (Vault's shapes)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from broker.api.common import CALL, Call, json_response
from broker.api.leases import rfc3339
from broker.errors import BadRequest, PermissionDenied
from broker.lease import Token, TokenState
from broker.state import BrokerState
from broker.tokens import hash_token

__all__ = ["auth_block", "revoke_token_tree", "routes"]

routes = web.RouteTableDef()


def auth_block(token: str, record: Token, now: float) -> dict[str, Any]:
    ttl = int(record.expire_time - now) if record.expire_time else 0
    return {
        "client_token": token,
        "accessor": record.accessor,
        "policies": record.policies,
        "token_policies": record.policies,
        "identity_policies": None,
        "metadata": record.metadata or None,
        "lease_duration": max(ttl, 0),
        "renewable": record.renewable,
        "entity_id": "",
        "token_type": "service",
        "orphan": record.parent is None,
    }


def token_data(record: Token, now: float) -> dict[str, Any]:
    ttl = int(record.expire_time - now) if record.expire_time else 0
    return {
        "accessor": record.accessor,
        "creation_time": int(record.created),
        "creation_ttl": int(record.expire_time - record.created) if record.expire_time else 0,
        "display_name": record.display_name,
        "expire_time": rfc3339(record.expire_time),
        "explicit_max_ttl": int(record.max_expire_time - record.created)
        if record.max_expire_time else 0,
        "id": "",  # Vault shows the token itself here; we never echo it back
        "meta": record.metadata or None,
        "num_uses": 0,
        "orphan": record.parent is None,
        "path": "auth/token/create",
        "policies": record.policies,
        "renewable": record.renewable,
        "ttl": max(ttl, 0),
        "type": "service",
    }


async def revoke_token_tree(state: BrokerState, accessor: str) -> tuple[int, int]:
    """Revoke a token, its children and every lease they own. Returns (tokens, leases)."""
    accessors = await state.tokens.descendants(accessor)
    now = state.engine.clock()
    ended = 0
    for acc in accessors:
        ended += await state.store.end_token(acc, state=TokenState.REVOKED, now=now)
    leases = await state.engine.revoke_token_leases(accessors)
    return ended, leases


def _strings(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise BadRequest(f"{name} must be a list of strings")


@routes.post("/v1/auth/token/create")
@routes.post("/v1/auth/token/create-orphan")
async def create(request: web.Request) -> web.Response:
    call: Call = request[CALL]
    parent = await call.authenticate()
    await call.read_body()
    await call.require(call.path, "update", "create", "sudo")
    policies = _strings(call.body.get("policies"), "policies") or list(parent.policies)
    if not parent.is_root:
        extra = set(policies) - set(parent.policies) - {"default"}
        if extra:
            raise PermissionDenied(
                f"permission denied: a token can only give policies it has; not {sorted(extra)}")
    if "root" in policies and not parent.is_root:
        raise PermissionDenied("permission denied: only a root token can create root tokens")
    meta = call.body.get("meta") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadRequest("meta must be an object of string values")
    ttl = call.duration("ttl")
    if ttl is None and "root" not in policies:
        ttl = 32 * 86400 if parent.expire_time is None else None
    orphan = call.path.endswith("create-orphan") or call.flag("no_parent", False)
    token, record = await call.state.tokens.create(
        policies=policies,
        ttl=ttl,
        max_ttl=call.duration("explicit_max_ttl"),
        display_name=call.string("display_name") or "token",
        metadata=meta,
        parent=None if orphan and parent.is_root else parent,
        renewable=call.flag("renewable", True),
    )
    now = call.state.engine.clock()
    await call.audit("token_create", created={"accessor": record.accessor,
                                              "policies": record.policies,
                                              "client_token": token})
    return json_response({"request_id": call.request_id, "auth": auth_block(token, record, now),
                          "data": None, "lease_id": "", "renewable": False, "lease_duration": 0})


@routes.get("/v1/auth/token/lookup-self")
@routes.post("/v1/auth/token/lookup-self")
async def lookup_self(request: web.Request) -> web.Response:
    call: Call = request[CALL]
    token = await call.authenticate()
    await call.require("auth/token/lookup-self", "read", "update")
    await call.audit("token_lookup")
    return json_response({"request_id": call.request_id,
                          "data": token_data(token, call.state.engine.clock())})


@routes.post("/v1/auth/token/lookup")
async def lookup(request: web.Request) -> web.Response:
    call: Call = request[CALL]
    await call.authenticate()
    await call.read_body()
    await call.require("auth/token/lookup", "update", "sudo")
    other = await call.state.store.token_by_hash(hash_token(call.string("token", required=True)
                                                            or ""))
    if other is None or other.state is not TokenState.ACTIVE:
        raise BadRequest("bad token")
    await call.audit("token_lookup", target=other.accessor)
    return json_response({"request_id": call.request_id,
                          "data": token_data(other, call.state.engine.clock())})


@routes.post("/v1/auth/token/renew-self")
@routes.put("/v1/auth/token/renew-self")
async def renew_self(request: web.Request) -> web.Response:
    call: Call = request[CALL]
    token = await call.authenticate()
    await call.read_body()
    await call.require("auth/token/renew-self", "update")
    token = await call.state.tokens.renew(token, call.duration("increment"))
    await call.audit("token_renew", expire_time=rfc3339(token.expire_time))
    body = auth_block("", token, call.state.engine.clock())
    body.pop("client_token")
    return json_response({"request_id": call.request_id, "auth": body})


@routes.post("/v1/auth/token/revoke-self")
@routes.put("/v1/auth/token/revoke-self")
async def revoke_self(request: web.Request) -> web.Response:
    call: Call = request[CALL]
    token = await call.authenticate()
    await call.require("auth/token/revoke-self", "update")
    tokens, leases = await revoke_token_tree(call.state, token.accessor)
    await call.audit("token_revoke", target=token.accessor, tokens=tokens, leases_queued=leases)
    return json_response(None)


@routes.post("/v1/auth/token/revoke")
@routes.put("/v1/auth/token/revoke")
async def revoke(request: web.Request) -> web.Response:
    call: Call = request[CALL]
    await call.authenticate()
    await call.read_body()
    await call.require("auth/token/revoke", "update", "sudo")
    other = await call.state.store.token_by_hash(hash_token(call.string("token", required=True)
                                                            or ""))
    if other is not None:
        tokens, leases = await revoke_token_tree(call.state, other.accessor)
        await call.audit("token_revoke", target=other.accessor, tokens=tokens,
                         leases_queued=leases)
    return json_response(None)


@routes.post("/v1/auth/token/revoke-accessor")
@routes.put("/v1/auth/token/revoke-accessor")
async def revoke_accessor(request: web.Request) -> web.Response:
    call: Call = request[CALL]
    await call.authenticate()
    await call.read_body()
    await call.require("auth/token/revoke-accessor", "update", "sudo")
    accessor = call.string("accessor", required=True) or ""
    if await call.state.store.token_by_accessor(accessor) is None:
        raise BadRequest("no token with that accessor")
    tokens, leases = await revoke_token_tree(call.state, accessor)
    await call.audit("token_revoke", target=accessor, tokens=tokens, leases_queued=leases)
    return json_response(None)
