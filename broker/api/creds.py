"""``GET|POST /v1/{mount}/creds/{role}``: issue a credential and its lease."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from broker.api.common import CALL, Call, json_response
from broker.audit import AuditError
from broker.engine import lease_ref
from broker.errors import BadRequest
from broker.lease import Lease

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
    if "/" in mount or "/" in role:
        # %2F decodes into the name: no mount or role holds a "/", and a policy
        # glob must never be checked against a path that climbs ("x/../y").
        raise BadRequest(f"invalid path {path!r}: a mount or role name holds no '/'")
    await call.read_body()
    caps = ("read",) if request.method == "GET" else ("update", "create")
    await call.require(path, *caps)
    ttl = call.duration("ttl")
    engine = call.state.engine
    recorded = False

    async def record(lease: Lease, data: Mapping[str, Any]) -> None:
        # The data block (passwords, keys) reaches the log only as HMACs. The
        # engine writes this line before we answer (on a staging backend,
        # beside the backend's COMMIT) and revokes the lease if it fails.
        nonlocal recorded
        await call.audit("issue", lease=lease_ref(lease),
                         ttl=int(lease.expire_time - lease.issue_time), data=dict(data))
        recorded = True

    try:
        issued = await engine.issue(mount, role, token=call.token,  # type: ignore[arg-type]
                                    ttl=ttl, request=call.request_block(), record=record)
    except AuditError:
        raise  # the log is failing: an error line would fail too
    except Exception as exc:
        if not recorded:
            await call.audit("issue", outcome="error", mount=mount, role=role, error=str(exc))
        # else: the issue line went out before the COMMIT failed; the engine's
        # rollback line (same request id) records how it ended.
        raise
    lease = issued.lease
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
