"""``/v1/sys/health``, ``/v1/sys/mounts`` and ``/v1/sys/metrics``."""

from __future__ import annotations

import time

from aiohttp import web

from broker import __version__
from broker.api.common import CALL, STATE, Call, json_response
from broker.api.leases import rfc3339

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.get("/v1/sys/health")
async def health(request: web.Request) -> web.Response:
    """Vault's health shape plus each mount's backend health. No token needed."""
    state = request.app[STATE]
    mounts = {
        name: {"plugin": m.spec.plugin, "healthy": m.healthy, "error": m.error}
        for name, m in state.engine.mounts.items()
    }
    audit_ok = state.audit.healthy
    # An instance that cannot audit cannot issue anything (fail-closed): tell
    # load balancers to send traffic elsewhere.
    status = 200 if state.serving and audit_ok else 503
    return json_response({
        "initialized": True,
        "sealed": False,
        "standby": False,
        "performance_standby": False,
        "server_time_utc": int(time.time()),
        "version": __version__,
        "cluster_name": "broker",
        "mounts": mounts,
        "audit": {"healthy": audit_ok, "error": getattr(state.audit, "last_error", None)},
    }, status=status)


@routes.get("/v1/sys/mounts")
async def mounts(request: web.Request) -> web.Response:
    call: Call = request[CALL]
    await call.authenticate()
    await call.require("sys/mounts", "read")
    state = call.state
    data = {
        f"{name}/": {"type": m.spec.plugin, "description": "", "healthy": m.healthy,
                     "roles": sorted(m.spec.roles),
                     "env_names": dict(m.capabilities.env_names)}
        for name, m in state.engine.mounts.items()
    }
    return json_response({"request_id": call.request_id, "data": data})


@routes.get("/v1/sys/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Lease counts by state, sweeper load and per-backend call timings (JSON)."""
    call: Call = request[CALL]
    await call.authenticate()
    await call.require("sys/metrics", "read")
    state = call.state
    backends = {
        name: {op: {"calls": s.calls, "errors": s.errors,
                    "mean_ms": round(1000 * s.total_seconds / s.calls, 3) if s.calls else 0,
                    "max_ms": round(1000 * s.max_seconds, 3)}
               for op, s in m.stats.items()}
        for name, m in state.engine.mounts.items()
    }
    return json_response({"request_id": call.request_id, "data": {
        "leases": await state.store.count_by_state(),
        "sweeper_busy": state.sweeper.busy,
        "sweeper_dropped_claims": state.sweeper.dropped_claims,
        "backends": backends,
        "started": rfc3339(state.started),
    }})
