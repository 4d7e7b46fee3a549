"""``LIST /v1/{mount}/roles`` and ``GET /v1/{mount}/roles/{name}``: the configured roles.

Vault's database and AWS engines' paths and shapes, so hvac's
``secrets.database.list_roles``/``read_role`` (and ``secrets.aws``'s) work. On a
database mount a role names its connection as Vault's does (``db_name``): the
mount's one connection, named as the mount (``pg/config/pg``, ``db_config.py``).
The broker's roles come from its config file (``[mounts.NAME.roles.ROLE]``,
re-read on SIGHUP), so these paths are read-only: a write answers 405 saying
where roles are set.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from broker.api.common import error_response, not_allowed, vault_response
from broker.api.db_config import DATABASE_PLUGINS
from broker.api.read_only import item_call, listing_call
from broker.audit import redact
from broker.backend import RoleSpec
from broker.templating import DEFAULT_USERNAME_TEMPLATE

__all__ = ["role_data", "routes"]

routes = web.RouteTableDef()

def _not_allowed(request: web.Request, allowed: tuple[str, ...],
                 text: str | None = None) -> web.Response:
    """405 with the ``Allow`` header (RFC 9110), saying why a write cannot be done here."""
    mount = request.match_info["mount"]
    return not_allowed(request, allowed, text, read_only=(
        f"roles are read-only over the API; they are set in the broker's config "
        f"file ([mounts.{mount}.roles.NAME]), re-read on SIGHUP"))


def _not_found() -> web.Response:
    """Vault's answer for a role (or a listing) that is not there: 404 and no message."""
    return error_response(404)


def role_data(role: RoleSpec, db_name: str | None = None) -> dict[str, Any]:
    """A role's configuration as ``read_role`` answers it; secret-named options hidden.

    ``db_name``: the connection the role uses, on a database mount (Vault's database
    engine answers it; its AWS engine has no such key).
    """
    # The plugin options first: the common keys are not among them (the config
    # loader takes those out), so nothing here overwrites a common key anyway.
    options: dict[str, Any] = redact(dict(role.options))
    connection = {} if db_name is None else {"db_name": db_name}
    return {
        **options,
        **connection,
        "default_ttl": role.default_ttl,
        "max_ttl": role.max_ttl,
        "creation_statements": list(role.creation_statements),
        "revocation_statements": list(role.revocation_statements),
        "rollback_statements": list(role.rollback_statements),
        "renew_statements": list(role.renew_statements),
        # The one in effect: the role's own, else the broker's default.
        "username_template": role.username_template or DEFAULT_USERNAME_TEMPLATE,
    }


async def _list(request: web.Request) -> web.Response:
    mount = request.match_info["mount"]
    call = await listing_call(request, f"{mount}/roles", _not_allowed)
    if isinstance(call, web.Response):
        return call
    runtime = call.state.engine.mount(mount)  # 404 for an unknown mount
    keys = sorted(runtime.spec.roles)
    await call.audit("list", mount=mount, count=len(keys))
    if not keys:
        return _not_found()  # Vault answers 404 for an empty listing
    return vault_response(call, {"keys": keys})


@routes.route("*", "/v1/{mount}/roles")
async def list_roles(request: web.Request) -> web.Response:
    """The mount's role names, sorted (``list`` on ``{mount}/roles``)."""
    return await _list(request)


@routes.route("*", "/v1/{mount}/roles/{role:[^/]*}")
async def read_role(request: web.Request) -> web.Response:
    """One role's configuration (``read`` on ``{mount}/roles/{name}``).

    ``/v1/{mount}/roles/`` (the folder, with its slash, as ``curl -X LIST``
    users write it) is the listing.
    """
    name = request.match_info["role"]
    if not name:
        return await _list(request)
    mount = request.match_info["mount"]
    call = await item_call(request, f"{mount}/roles/{name}", _not_allowed, kind="role",
                           folder=f"{mount}/roles")
    if isinstance(call, web.Response):
        return call
    spec = call.state.engine.mount(mount).spec  # 404 for an unknown mount
    role = spec.roles.get(name)
    if role is None:
        await call.audit("role_read", outcome="error", mount=mount, role=name,
                         error="no such role")
        return _not_found()
    await call.audit("role_read", mount=mount, role=name)
    # The mount is the connection, and its name is the mount's (as {mount}/config lists it).
    db_name = spec.name if spec.plugin in DATABASE_PLUGINS else None
    return vault_response(call, role_data(role, db_name))
