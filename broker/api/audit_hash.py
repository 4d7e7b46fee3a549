"""``POST /v1/sys/audit-hash/{device}``: Vault's audit-hash, to search the audit log.

The audit log writes tokens, secrets and token accessors as ``hmac-sha256:<hex>``
under the broker's audit key. Given a value, this answers what the log wrote for
it, ``{"hash": "hmac-sha256:..."}``, the same as ``broker audit hash`` computes
offline; an operator then greps the log for it (hvac's
``client.sys.calculate_hash("file", value)``).

Vault names one of its audit devices in the path. The broker has one audit log,
its device is called ``file`` (``file/`` is taken too, as Vault takes both); any
other name is a 400, as Vault answers for an unknown device.

The answer confirms or refutes a guess of any secret that reached the log, so,
as in Vault (where the path is root-protected), it needs ``sudo`` and ``update``
on ``sys/audit-hash/<device>``: the root policy has them, the default one does
not. The value is never audited; the line says only that a hash was computed.
"""

from __future__ import annotations

from aiohttp import web

from broker.api.common import CALL, Call, vault_response
from broker.audit import shown
from broker.errors import BadRequest

__all__ = ["AUDIT_DEVICE", "routes"]

routes = web.RouteTableDef()

#: The name of the broker's one audit log in ``sys/audit-hash/{device}``, and the device
#: ``GET sys/audit`` lists (``audit_devices.py``): the two must agree.
AUDIT_DEVICE = "file"


def _device(name: str) -> str:
    """The device named in the path, or 400."""
    device = name.removesuffix("/")
    if not device:
        raise BadRequest(f"name the audit device: sys/audit-hash/{AUDIT_DEVICE}")
    if device != AUDIT_DEVICE:
        raise BadRequest(f"unknown audit device {shown(device)!r}: the broker has one audit "
                         f"log, named {AUDIT_DEVICE!r}")
    return device


@routes.post("/v1/sys/audit-hash/{device:.*}")
@routes.put("/v1/sys/audit-hash/{device:.*}")
async def audit_hash(request: web.Request) -> web.Response:
    """The HMAC the audit log writes for ``input`` (``sudo`` and ``update`` on the path)."""
    call: Call = request[CALL]
    await call.authenticate()
    # Both, as Vault asks of a root-protected path written to: sudo alone is no write.
    await call.require(call.path, "sudo")
    await call.require(call.path, "update")
    if "input" in request.query:
        # The value is likely a secret; a URL lands in access and proxy logs.
        raise BadRequest("send input in the request body, not in the URL: a query string "
                         "ends up in access logs")
    await call.read_body()
    device = _device(request.match_info["device"])
    value = call.string("input", required=True) or ""
    digest = call.state.audit.hmac(value)
    await call.audit("audit_hash", device=device)
    # Also at the top level: Vault's documented answer is {"hash": ...}.
    return vault_response(call, {"hash": digest}, top_level=True)
