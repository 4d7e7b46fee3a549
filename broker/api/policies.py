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
from broker.api.read_only import LIST_METHODS, item_call, listing_call, require_listing

__all__ = ["routes"]

routes = web.RouteTableDef()

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


async def _list(request: web.Request, path: str) -> web.Response:
    if path == _ACL:
        answer = await listing_call(request, path, _not_allowed)
        if isinstance(answer, web.Response):
            return answer
        call = answer
    elif request.method not in LIST_METHODS:
        return _not_allowed(request, LIST_METHODS)
    else:
        call = request[CALL]
        await call.authenticate()
        if is_list_request(request):
            await require_listing(call, path)
        else:
            # Vault's sys/policy answers a plain GET too: a read, checked on sys/policy
            # alone (a read grant on sys/policy/* is for single policies, not the names).
            await call.require(path, "read")
    keys = _names(call)
    await call.audit("list", count=len(keys))
    if path == _LEGACY:
        return vault_response(call, {"keys": keys, "policies": keys}, top_level=True)
    return vault_response(call, {"keys": keys})


async def _read(request: web.Request, folder: str) -> web.Response:
    name = request.match_info["name"]
    if not name:  # the folder, with its slash (as `curl -X LIST` users write it)
        return await _list(request, folder)
    call = await item_call(request, f"{folder}/{name}", _not_allowed, kind="policy",
                           folder=folder)
    if isinstance(call, web.Response):
        return call
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
