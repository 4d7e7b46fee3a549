"""``POST /v1/{mount}/rotate-root``: replace a backend's admin credential (extension).

The broker cannot write the operator's ``password_file``, so the new secret is
returned once (and audited only as an HMAC); the running backend already uses
it. Store it where ``password_file``/``password_env`` points before the next
restart, or the broker comes back with the old, now invalid, secret.
"""

from __future__ import annotations

import dataclasses

from aiohttp import web

from broker.api.common import CALL, Call, json_response
from broker.backend import BackendError, RotateRootRequest
from broker.errors import BackendUnavailable

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.post("/v1/{mount}/rotate-root")
@routes.post("/v1/{mount}/config/rotate-root")
async def rotate_root(request: web.Request) -> web.Response:
    call: Call = request[CALL]
    mount = request.match_info["mount"]
    await call.authenticate()
    await call.read_body()
    await call.require(f"{mount}/rotate-root", "update", "sudo")
    runtime = call.state.engine.mount(mount)
    try:
        resp = await runtime.rotate_root(RotateRootRequest())
    except BackendError as exc:
        await call.audit("admin", outcome="error", action="rotate_root", mount=mount,
                         error=str(exc))
        raise BackendUnavailable(f"mount {mount!r}: rotate-root failed: {exc}") from None
    data = dataclasses.asdict(resp)
    await call.audit("admin", action="rotate_root", mount=mount, data=data)
    return json_response({"request_id": call.request_id, "data": data,
                          "warnings": ["store the new secret where password_file/password_env "
                                       "points before the next restart"]})
