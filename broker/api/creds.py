"""``GET|POST /v1/{mount}/creds/{role}``: issue a credential and its lease."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from aiohttp import web

from broker.api.common import CALL, Call, vault_response
from broker.audit import AuditError
from broker.errors import BadRequest
from broker.lease import Lease, Token
from broker.revocation import lease_ref

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
        token = _aws_request(call, mount, role, kind)
        issued = await engine.issue(mount, role, token=token, ttl=ttl,
                                    request=call.request_block(), record=record, kind=kind)
    except AuditError:
        raise  # the log is failing: an error line would fail too
    except Exception as exc:
        if not recorded:
            await call.audit("issue", outcome="error", mount=mount, role=role, error=str(exc))
        # else: the issue line went out before the COMMIT failed; the engine's
        # rollback line (same request id) records how it ended.
        raise
    lease = issued.lease
    return vault_response(call, issued.data, lease_id=lease.id, renewable=lease.renewable,
                          lease_duration=round(lease.expire_time - lease.issue_time),
                          warnings=issued.warnings)


def _aws_request(call: Call, mount: str, role: str, kind: str) -> Token:
    """Vault's AWS request parameters, for an ``aws`` mount: the token to issue with.

    ``role_arn`` reaches the plugin the way token metadata ``role_arn`` does (the
    lease's metadata), so the plugin checks it against the role's ``role_arns``.
    A token whose metadata pins a ``role_arn`` cannot ask for another one.
    """
    token = call.token
    assert token is not None
    runtime = call.state.engine.mount(mount)
    if runtime.spec.plugin != "aws":
        return token
    spec = call.state.engine.role(mount, role)
    ctype = spec.options.get("credential_type")
    if kind == "sts" and ctype == "iam_user":
        raise BadRequest(f"role {role!r} issues iam_user credentials, which are not STS "
                         f"credentials: use {mount}/creds/{role}")
    if call.body.get("role_session_name") not in (None, ""):
        raise BadRequest("role_session_name is not supported: the broker names each session "
                         "itself (an early revoke denies the session by its name)")
    wanted = call.string("role_arn")
    if wanted is None:
        return token
    pinned = token.metadata.get("role_arn")
    if pinned and pinned != wanted:
        raise BadRequest(f"role_arn {wanted!r} differs from the role_arn {pinned!r} in the "
                         "token's metadata, which the token is limited to")
    if ctype != "assumed_role":
        raise BadRequest(f"role_arn applies to assumed_role roles only; role {role!r} is "
                         f"{ctype}")
    return replace(token, metadata={**token.metadata, "role_arn": wanted})
