"""``GET /v1/sys/internal/ui/mounts[/{path}]``: what a token may know about the mounts it uses.

Vault's answer to "which mount is this path on, and what plugin backs it",
which clients ask without any grant of their own (Vault's CLI before a ``kv``
call; ``broker creds --format env`` and ``broker exec`` for the variable names
of a credential). The built-in ``default`` policy grants no ``sys/mounts``
(that lists every mount and every role); this path tells a token about a
mount only if its policies grant it something on some path under that mount
(Vault's ``hasMountAccess``: :meth:`broker.policy.PolicySet.grants_under`).

- ``sys/internal/ui/mounts/{path}``: the mount ``path`` falls under (``pg``,
  ``pg/``, ``pg/creds/readonly``), in Vault's shape plus ``env_names`` and
  ``healthy`` (extensions). A mount the token may not use and one that does
  not exist get the same 403 with the same words, as in Vault (mount names
  and plugins are public anyway: ``sys/health`` lists them to anyone). No
  list of roles: a token allowed one role does not learn the others.
- ``sys/internal/ui/mounts``: every secrets mount and auth method the token
  may use, ``{"secret": {...}, "auth": {...}}``. Without a token (Vault lists
  the mounts tuned ``listing_visibility = "unauth"`` then, which the broker has
  none of) both are empty.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from broker.api.common import CALL, Call, vault_response
from broker.api.login import auth_methods
from broker.api.system import auth_mount_info, mount_info
from broker.errors import PermissionDenied

__all__ = ["routes"]

routes = web.RouteTableDef()


def _may_use(call: Call, prefix: str) -> bool:
    assert call.token is not None
    return call.state.policies.grants_under(call.token.policies, prefix,
                                            identity=call.identity)


@routes.get("/v1/sys/internal/ui/mounts")
async def list_mounts(request: web.Request) -> web.Response:
    """The secrets mounts and auth methods the caller's token may use (Vault's shape)."""
    call: Call = request[CALL]
    if not call.presented_token():
        return vault_response(call, {"secret": {}, "auth": {}})
    await call.authenticate()
    engine = call.state.engine
    secret = {f"{name}/": mount_info(runtime) for name, runtime in sorted(engine.mounts.items())
              if _may_use(call, f"{name}/")}
    auth = {f"{name}/": info for name, info in _auth_methods(call).items()
            if _may_use(call, f"auth/{name}/")}
    return vault_response(call, {"secret": secret, "auth": auth})


def _auth_methods(call: Call) -> dict[str, dict[str, Any]]:
    """The auth methods by name (``token`` and each JWT method), in Vault's shape."""
    methods = {"token": auth_mount_info("token", "token", "token based credentials")}
    for name in sorted(auth_methods(call.state)):
        methods[name] = auth_mount_info(name, "jwt", "JWT/OIDC login")
    return methods


@routes.get("/v1/sys/internal/ui/mounts/{path:.+}")
async def read_mount(request: web.Request) -> web.Response:
    """The mount ``path`` is on (a secrets mount, or ``auth/NAME``: an auth method),
    if the caller's token may use it; else 403."""
    call: Call = request[CALL]
    await call.authenticate()
    # Vault's sanitizeMountPath: no leading "/", one trailing "/"; its words on a 403.
    path = request.match_info["path"].lstrip("/")
    path = path if path.endswith("/") else path + "/"
    name = path.partition("/")[0]
    if name == "auth":  # Vault resolves auth mounts on this path too: auth/github/...
        method = path.split("/")[1]
        info = _auth_methods(call).get(method) if method else None
        if info is not None and _may_use(call, f"auth/{method}/"):
            return vault_response(call, {**info, "path": f"auth/{method}/"})
    else:
        runtime = call.state.engine.mounts.get(name)
        if runtime is not None and _may_use(call, f"{name}/"):
            return vault_response(call, {**mount_info(runtime), "path": f"{name}/"})
    # The same answer whether the mount exists or not, as Vault's (%q: JSON quoting).
    message = ("preflight capability check returned 403, please ensure client's "
               f"policies grant access to path {json.dumps(path)}")
    await call.audit("policy_denied", outcome="denied", checked_path=path, error=message)
    raise PermissionDenied(message)
