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

Also ``GET /v1/sys/auth/{name}/tune``: an auth method's token TTLs, read-only
(the secrets mounts' ``tune`` is in ``system.py``).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from broker.api.common import CALL, Call, is_list_request, not_allowed, vault_response
from broker.api.login import auth_methods
from broker.api.system import auth_mount_info, mount_info
from broker.audit import shown
from broker.auth.jwt_config import JWTRoleConfig
from broker.errors import NotFound, PermissionDenied

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
    await call.authenticate(consume=False)  # an unauthenticated path in Vault: no use taken
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


#: What a write to ``sys/auth/NAME/tune`` is told (405): there is nothing to tune.
AUTH_TUNE_READ_ONLY = ("auth methods are configured in the broker's config file "
                       "([auth.jwt.NAME]; token TTLs in [tokens] and in each role), re-read "
                       "on SIGHUP: tune is read-only")


@routes.route("*", "/v1/sys/auth/{path:.+}/tune")
async def auth_tune(request: web.Request) -> web.Response:
    """Vault's ``GET sys/auth/NAME/tune`` (hvac's ``sys.read_auth_method_tuning``): the
    method's token TTLs in seconds, under ``data`` and at the top level (as Vault
    answers it).

    ``max_lease_ttl`` is ``[tokens] max_ttl``, which no token but a periodic one
    outlives (Vault's system max, what a method never tuned shows). ``default_lease_ttl`` is what a
    token gets when nothing sets its TTL: for ``token``, a token created without
    a ttl (``[tokens] max_ttl`` too); for a JWT method, a login whose role sets
    no ``token_ttl``. Read-only: a write is a 405 saying where methods are set.
    The grant: ``read`` and ``sudo`` on ``sys/auth/NAME/tune``, as in Vault (a
    root-protected path there), or ``read`` on ``sys/auth``, which lists the
    methods; else 403, before the method is looked up.
    """
    if request.method != "GET":
        return not_allowed(request, ("GET",), read_only=AUTH_TUNE_READ_ONLY)
    call: Call = request[CALL]
    await call.authenticate()
    if is_list_request(request):  # GET ?list=true: as Vault, which has no LIST here
        return not_allowed(request, ("GET",), "sys/auth/NAME/tune is not a listing: GET "
                           "it without ?list=true")
    name = request.match_info["path"].strip("/")  # Vault's sanitizePath: "github/" is "github"
    await _require_auth_read(call, f"sys/auth/{name}/tune")
    info = _auth_methods(call).get(name)
    if info is None:
        raise NotFound(f"no auth method named {shown(name)!r}")
    ceiling = call.state.config.tokens.max_ttl
    default = ceiling if name == "token" else min(JWTRoleConfig.token_ttl, ceiling)
    data = {
        "description": info["description"],
        "default_lease_ttl": default,
        "max_lease_ttl": ceiling,
        "force_no_cache": False,
        "token_type": info["config"]["token_type"],
    }
    return vault_response(call, data, top_level=True)


async def _require_auth_read(call: Call, path: str) -> None:
    """``read`` on ``sys/auth`` (unless a rule denies ``path``), or ``read`` and ``sudo`` on
    ``path``; else audited and 403 naming the capability missing on ``path``."""
    if call.allowed("sys/auth", "read") and not call.denied(path):
        return
    # Both, as Vault asks of a root-protected path it reads: sudo alone is no read.
    await call.require(path, "read")
    await call.require(path, "sudo")
