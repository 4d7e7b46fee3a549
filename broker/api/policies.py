"""``sys/policy`` and ``sys/policies/acl``: the configured policies, read-only.

Vault's paths and shapes, so hvac's ``sys.list_policies``/``read_policy`` and
``sys.list_acl_policies``/``read_acl_policy`` (and ``vault policy list``/``read``)
work. A policy's text is Vault HCL written from the rules the broker enforces
(:meth:`broker.policy.PolicySet.hcl`). Its templates are the broker's
(``{{identity.metadata.KEY}}``, ``{{identity.display_name}}``), not Vault's
identity templates, and ``default``'s lease paths reach only the token's own leases.

The broker's policies come from its config file (``[policies.NAME]``, re-read on
SIGHUP), so these paths are read-only: a write answers 405 saying where policies
are set. As in Vault, reading them needs a grant (the ``default`` policy has
none) and an unknown policy is a bare 404.
"""

from __future__ import annotations

from aiohttp import web

from broker.api.common import (
    CALL,
    Call,
    error_response,
    is_list_request,
    not_allowed,
    vault_response,
)

__all__ = ["routes"]

routes = web.RouteTableDef()

_LIST_METHODS = ("GET", "LIST")
_READ_METHODS = ("GET",)
_READ_ONLY = ("policies are read-only over the API; they are set in the broker's config "
              "file ([policies.NAME]), re-read on SIGHUP")

#: The older path (``sys/policy``): Vault answers it with the data at the top level
#: as well, a listing both as ``keys`` and ``policies`` and a policy's text as
#: ``rules``. The newer one (``sys/policies/acl``) has them under ``data`` only, the
#: text as ``policy``, and is only a listing with LIST.
_LEGACY = "sys/policy"
_ACL = "sys/policies/acl"


def _not_allowed(request: web.Request, allowed: tuple[str, ...],
                 text: str | None = None) -> web.Response:
    return not_allowed(request, allowed, text, read_only=_READ_ONLY)


def _names(call: Call) -> list[str]:
    """Every policy a token may name, in Vault's order: sorted, then ``root`` (Vault
    appends it to what its store lists)."""
    return [*sorted(call.state.policies.names - {"root"}), "root"]


async def _require_listing(call: Call, path: str, capability: str) -> None:
    """``capability`` on the listing ``path``; for a LIST Vault checks the path with a
    slash added, the broker's docs name it without: a grant on either will do."""
    if not call.allowed(f"{path}/", capability):
        await call.require(path, capability)


async def _list(request: web.Request, path: str) -> web.Response:
    if request.method not in _LIST_METHODS:
        return _not_allowed(request, _LIST_METHODS)
    call: Call = request[CALL]
    await call.authenticate()
    listing = is_list_request(request)
    if path == _LEGACY and not listing:
        # Vault's sys/policy answers a plain GET too: a read, checked on sys/policy
        # alone (a read grant on sys/policy/* is for single policies, not the names).
        await call.require(path, "read")
    elif path == _LEGACY:
        await _require_listing(call, path, "list")
    elif not listing:
        # As Vault (after the token check): a plain read of the folder is no operation.
        return _not_allowed(request, _LIST_METHODS, f"{path} is a listing: send LIST, "
                            "or GET with ?list=true")
    else:
        await _require_listing(call, path, "list")
    keys = _names(call)
    await call.audit("list", count=len(keys))
    if path == _LEGACY:
        return vault_response(call, {"keys": keys, "policies": keys}, top_level=True)
    return vault_response(call, {"keys": keys})


async def _read(request: web.Request, folder: str) -> web.Response:
    name = request.match_info["name"]
    if not name:  # the folder, with its slash (as `curl -X LIST` users write it)
        return await _list(request, folder)
    if request.method != "GET":
        return _not_allowed(request, _READ_METHODS)
    call: Call = request[CALL]
    await call.authenticate()
    path = f"{folder}/{name}"
    if is_list_request(request):  # GET ?list=true: a policy is not a folder (Vault: 405 too)
        return _not_allowed(request, _READ_METHODS, f"{path} is a policy, not a listing: "
                            f"GET it without ?list=true, or list {folder}")
    # Before the lookup, as in Vault: a token without the grant learns nothing,
    # not even whether the policy exists.
    await call.require(path, "read")
    text = call.state.policies.hcl(name)
    if text is None:
        await call.audit("policy_read", outcome="error", policy=name, error="no such policy")
        return error_response(404)  # Vault's bare 404 (hvac's InvalidPath)
    await call.audit("policy_read", policy=name)
    if folder == _LEGACY:
        return vault_response(call, {"name": name, "rules": text}, top_level=True)
    return vault_response(call, {"name": name, "policy": text})


@routes.route("*", "/v1/sys/policy")
async def list_policies(request: web.Request) -> web.Response:
    """Every policy name (``read`` on ``sys/policy``; ``list`` for a LIST)."""
    return await _list(request, _LEGACY)


@routes.route("*", "/v1/sys/policy/{name:.*}")
async def read_policy(request: web.Request) -> web.Response:
    """A policy's rules (``read`` on ``sys/policy/{name}``)."""
    return await _read(request, _LEGACY)


@routes.route("*", "/v1/sys/policies/acl")
async def list_acl_policies(request: web.Request) -> web.Response:
    """Every policy name (``list`` on ``sys/policies/acl``; LIST or GET ?list=true only)."""
    return await _list(request, _ACL)


@routes.route("*", "/v1/sys/policies/acl/{name:.*}")
async def read_acl_policy(request: web.Request) -> web.Response:
    """A policy's rules (``read`` on ``sys/policies/acl/{name}``)."""
    return await _read(request, _ACL)
