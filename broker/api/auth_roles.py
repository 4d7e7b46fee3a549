"""Vault's JWT auth method read paths: the roles and settings of ``[auth.jwt.NAME]``.

``LIST /v1/auth/{NAME}/role``, ``GET /v1/auth/{NAME}/role/{ROLE}`` and
``GET /v1/auth/{NAME}/config``, in the shape of Vault's JWT plugin
(``path_role.go``, ``path_config.go``), so hvac's ``client.auth.jwt.list_roles``,
``read_role`` and ``read_config`` work. An operator asking "why was my
pipeline's login refused?" reads the bindings exactly as the login enforces
them: the answers are built from the very objects the login checks tokens
against (:func:`broker.api.login.auth_methods`), so after a reload they show
what the next login will check.

Every field is written out one by one from the parsed config, none copied
wholesale: a key added to ``[auth.jwt.NAME]`` later (a client secret, say)
stays out of these answers until someone decides here how to show it. Today
the config holds nothing secret: key URLs may not carry credentials
(``check_fetch_url``), ``jwt_validation_pubkeys`` are public keys and
``jwks_ca_pem`` a CA certificate.

Auth methods and their roles come from the config file (re-read on SIGHUP), so
these paths are read-only: a write answers 405 saying where they are set. As in
Vault, reading them needs a grant (the ``default`` policy has none), checked
before anything is looked up: a token without it gets the same 403 for a
method that exists and one that does not.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from broker.api.common import (
    Call,
    error_response,
    not_allowed,
    vault_response,
)
from broker.api.login import auth_methods
from broker.api.read_only import item_call, listing_call
from broker.audit import shown
from broker.auth import JWTAuthMethod, JWTMethodConfig, JWTRoleConfig

__all__ = ["config_data", "role_data", "routes"]

routes = web.RouteTableDef()

#: auth/token is the token store, not a JWT method: its role and config paths are
#: Vault paths the broker does not have, and keep answering 404 ``unsupported path``.
_BUILTIN_METHOD = "token"


def _method_name(request: web.Request) -> str:
    """The auth method's name in the path; 404 ``unsupported path`` for ``token``."""
    name = request.match_info["method"]
    if name == _BUILTIN_METHOD:
        raise web.HTTPNotFound()  # the error middleware words it as for any unknown path
    return name


def _not_allowed(request: web.Request, allowed: tuple[str, ...],
                 text: str | None = None) -> web.Response:
    """405 with the ``Allow`` header; for a write, where methods and roles are set instead."""
    name = request.match_info["method"]
    return not_allowed(request, allowed, text, read_only=(
        f"auth methods and their roles are read-only over the API; they are set in the "
        f"broker's config file ([auth.jwt.{name}] and [auth.jwt.{name}.roles.ROLE]), "
        "re-read on SIGHUP"))


async def _method(call: Call, name: str, event: str, **fields: Any) -> JWTAuthMethod:
    """The configured method ``name``, as the login uses it; else audit and 404.

    Called only once the caller's grant was checked, so the 404 tells nothing to a
    token that may not ask. It is the same ``unsupported path`` as for any path
    the broker does not route (Vault: no handler for an auth mount that is not there).
    """
    method = auth_methods(call.state).get(name)
    if method is None:
        await call.audit(event, outcome="error", auth_method=name,
                         error="no such auth method", **fields)
        raise web.HTTPNotFound()
    return method


def role_data(method: JWTMethodConfig, role: JWTRoleConfig) -> dict[str, Any]:
    """A role as Vault's JWT plugin answers ``read_role``: the fields the broker has.

    TTLs are seconds (0: no cap). The broker always adds ``default`` to a login
    token's policies, hence ``token_no_default_policy: false``; its login tokens are
    service tokens. The leeway is the method's (``clock_skew_leeway``, for exp, nbf
    and iat alike), which Vault sets per role.
    """
    return {
        "role_type": "jwt",  # a login with a JWT; the broker has no OIDC browser flow
        "bound_audiences": list(role.bound_audiences),
        "bound_subject": role.bound_subject or "",
        "bound_claims_type": role.bound_claims_type,
        # Every value as the text the claim is compared with (numbers and booleans
        # included), a list even for one value: any one of them matches.
        "bound_claims": {claim: list(values) for claim, values in role.bound_claims.items()},
        "claim_mappings": dict(role.claim_mappings),
        "user_claim": role.user_claim,
        # The broker reads a claim name starting with "/" as a JSON pointer.
        "user_claim_json_pointer": role.user_claim.startswith("/"),
        "clock_skew_leeway": method.leeway,
        "token_policies": list(role.token_policies),
        "token_no_default_policy": False,
        "token_ttl": role.token_ttl,
        "token_max_ttl": role.token_max_ttl or 0,
        "token_explicit_max_ttl": role.token_explicit_max_ttl or 0,
        "token_type": "service",
        "token_num_uses": role.token_num_uses,
        # As Vault: 0 unless periodic; then token_ttl and token_max_ttl are 0 (unused).
        "token_period": role.token_period,
        # An extension (Vault has no such option): each JWT logs in once.
        "single_use": role.single_use,
    }


def _pem(key: Any) -> str:
    """A public key as PEM (SubjectPublicKeyInfo): what the signatures are checked with."""
    data: bytes = key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return data.decode("ascii")


def config_data(method: JWTMethodConfig) -> dict[str, Any]:
    """A method's settings as Vault's JWT plugin answers ``read_config``; nothing secret.

    Vault's fields the broker has, ``""`` or ``[]`` when unset as in Vault, with the
    broker's effective values (``jwt_supported_algs``: the accepted algorithms, the
    default list when the config narrows none). ``jwks_ca_pem`` verifies every
    fetch, the discovery document's included, so with ``oidc_discovery_url`` it is
    ``oidc_discovery_ca_pem`` too. Vault's OIDC browser-flow settings
    (``oidc_client_id``, ``oidc_client_secret``, ...) do not exist here and are not
    shown. The broker's own key-fetching settings are extensions, shown only where
    keys are fetched.
    """
    discovery = method.oidc_discovery_url or ""
    ca_pem = method.jwks_ca_pem or ""
    data: dict[str, Any] = {
        "oidc_discovery_url": discovery,
        "oidc_discovery_ca_pem": ca_pem if discovery else "",
        "jwks_url": method.jwks_url or "",
        "jwks_ca_pem": ca_pem,
        "jwt_validation_pubkeys": [_pem(key) for key in method.public_keys],
        "jwt_supported_algs": list(method.algorithms),
        "bound_issuer": method.bound_issuer,
        "default_role": "",  # a login must name its role
        # extension: Vault sets this per role; here it applies to every role
        "clock_skew_leeway": method.leeway,
    }
    if not method.public_keys:  # extensions: how fetched keys are cached and fetched
        data.update(jwks_cache_ttl=method.jwks_cache_ttl, jwks_max_stale=method.jwks_max_stale,
                    fetch_timeout=int(method.fetch_timeout))
    return data


async def _list(request: web.Request) -> web.Response:
    name = _method_name(request)
    call = await listing_call(request, f"auth/{name}/role", _not_allowed)
    if isinstance(call, web.Response):
        return call
    method = await _method(call, name, "list")
    keys = sorted(method.config.roles)
    await call.audit("list", auth_method=name, count=len(keys))
    if not keys:
        return error_response(404)  # Vault answers a bare 404 for an empty listing
    return vault_response(call, {"keys": keys})


@routes.route("*", "/v1/auth/{method}/role")
async def list_roles(request: web.Request) -> web.Response:
    """The method's role names, sorted (``list`` on ``auth/{method}/role``)."""
    return await _list(request)


@routes.route("*", "/v1/auth/{method}/role/{role:[^/]*}")
async def read_role(request: web.Request) -> web.Response:
    """One role's bindings and token settings (``read`` on ``auth/{method}/role/{role}``).

    ``/v1/auth/{method}/role/`` (the folder, with its slash) is the listing.
    """
    role_name = request.match_info["role"]
    if not role_name:
        return await _list(request)
    name = _method_name(request)
    # The grant before any lookup: a token without it learns nothing, not even
    # whether the method or the role exists.
    call = await item_call(request, f"auth/{name}/role/{role_name}", _not_allowed,
                           kind="role", folder=f"auth/{name}/role")
    if isinstance(call, web.Response):
        return call
    method = await _method(call, name, "role_read", role=role_name)
    # Matched exactly, as the login matches it (Vault lowercases role names).
    role = method.config.roles.get(role_name)
    if role is None:
        await call.audit("role_read", outcome="error", auth_method=name, role=shown(role_name),
                         error="no such role")
        return error_response(404)  # Vault's bare 404 (hvac's InvalidPath)
    await call.audit("role_read", auth_method=name, role=role_name)
    return vault_response(call, role_data(method.config, role))


@routes.route("*", "/v1/auth/{method}/config")
async def read_config(request: web.Request) -> web.Response:
    """The method's key source and issuer settings (``read`` on ``auth/{method}/config``)."""
    name = _method_name(request)
    call = await item_call(request, f"auth/{name}/config", _not_allowed)
    if isinstance(call, web.Response):
        return call
    method = await _method(call, name, "config_read")
    await call.audit("config_read", auth_method=name)
    return vault_response(call, config_data(method.config))
