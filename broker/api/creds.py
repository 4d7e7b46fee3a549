"""``GET|POST /v1/{mount}/creds/{role}``: issue a credential and its lease."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from broker.api.common import CALL, Call, json_response
from broker.audit import AuditError
from broker.engine import lease_ref

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.route("*", "/v1/{mount}/creds/{role}")
@routes.route("*", "/v1/{mount}/sts/{role}")
async def issue(request: web.Request) -> web.Response:
    if request.method not in {"GET", "POST", "PUT"}:
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST", "PUT"])
    call: Call = request[CALL]
    mount, role = request.match_info["mount"], request.match_info["role"]
    # Policies see the path asked for, as in Vault: aws/sts/x needs a grant on
    # aws/sts/x; one on aws/creds/x does not reach it.
    kind = "sts" if request.path.startswith(f"/v1/{mount}/sts/") else "creds"
    path = f"{mount}/{kind}/{role}"
    await call.authenticate()
    await call.read_body()
    caps = ("read",) if request.method == "GET" else ("update", "create")
    await call.require(path, *caps)
    ttl = call.duration("ttl")
    engine = call.state.engine
    try:
        issued = await engine.issue(mount, role, token=call.token,  # type: ignore[arg-type]
                                    ttl=ttl, request=call.request_block())
    except Exception as exc:
        await call.audit("issue", outcome="error", mount=mount, role=role, error=str(exc))
        raise
    lease = issued.lease
    try:
        # The data block (passwords, keys) reaches the log only as HMACs.
        await call.audit("issue", lease=lease_ref(lease), ttl=int(lease.expire_time
                         - lease.issue_time), data=dict(issued.data))
    except AuditError:
        # Fail-closed: a credential nobody can trace must not exist.
        await engine.revoke(lease, reason="revoke", wait=0)
        raise
    body: dict[str, Any] = {
        "request_id": call.request_id,
        "lease_id": lease.id,
        "lease_duration": round(lease.expire_time - lease.issue_time),
        "renewable": lease.renewable,
        "data": issued.data,
        "wrap_info": None,
        "warnings": issued.warnings or None,
        "auth": None,
    }
    return json_response(body)
