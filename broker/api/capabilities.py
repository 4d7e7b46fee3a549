"""``/v1/sys/capabilities-self``, ``sys/capabilities`` and ``sys/capabilities-accessor``.

Vault's answer to "what may this token do on these paths", which UIs and
scripts ask before they try (hvac's ``client.sys.get_capabilities``). The
answer is Vault's: each path asked maps to its sorted capabilities, ``["root"]``
for a token holding the ``root`` policy and ``["deny"]`` where nothing is
granted; with exactly one path, ``capabilities`` repeats its list. Vault's
answers carry the mapping both at the top level (its older shape, which
clients still read) and under ``data``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from broker.api.common import CALL, Call, identity_of, vault_response
from broker.api.tokens import live_token
from broker.errors import BadRequest
from broker.lease import Token
from broker.tokens import hash_token

__all__ = ["MAX_PATHS", "routes"]

routes = web.RouteTableDef()

#: most paths one request may ask about: each is a policy evaluation on the
#: event loop, and no client asks about more than a screenful at once.
MAX_PATHS = 1000


def _paths(call: Call) -> list[str]:
    """The paths asked about: ``paths``, else Vault's deprecated ``path``.

    Each is a list of strings or one comma-separated string (Vault's
    ``TypeCommaStringSlice``, so ``{"path": "a/b"}`` still works).
    """
    value = call.body.get("paths")
    name = "paths"
    if value in (None, "", []):
        value, name = call.body.get("path"), "path"
    if isinstance(value, str):
        items = [p.strip() for p in value.split(",")]
    elif isinstance(value, list) and all(isinstance(p, str) for p in value):
        items = list(value)
    elif value is None:
        items = []
    else:
        raise BadRequest(f"{name} must be a list of strings (or one comma-separated string)")
    if not items or items == [""]:
        raise BadRequest("missing required parameter 'paths' (a list of paths)")
    if any(not p.strip("/") for p in items):
        raise BadRequest(f"{name}: an empty path; name each path, e.g. \"pg/creds/readonly\"")
    if len(items) > MAX_PATHS:
        raise BadRequest(f"{name}: {len(items)} paths; ask about at most {MAX_PATHS} at once")
    return items


def _capabilities(call: Call, token: Token, paths: list[str],
                  identity: Mapping[str, Any]) -> dict[str, list[str]]:
    """``token``'s capabilities on each path, in Vault's words (``root``, ``deny``)."""
    out: dict[str, list[str]] = {}
    for path in paths:
        if token.is_root:
            out[path] = ["root"]
            continue
        # The answer is keyed by the path as asked; policies see it without a leading "/".
        caps = call.state.policies.capabilities(token.policies, path.lstrip("/"),
                                                identity=identity)
        out[path] = sorted(caps) if caps else ["deny"]
    return out


def _answer(call: Call, paths: list[str], caps: dict[str, list[str]]) -> web.Response:
    data: dict[str, Any] = dict(caps)
    if len(paths) == 1:  # Vault's older, single-path shape
        data["capabilities"] = caps[paths[0]]
    # Also at the top level, as Vault answers it; a path named "data" or
    # "request_id" is under "data" only, and the answer keeps its shape.
    return vault_response(call, data, top_level=True)


@routes.post("/v1/sys/capabilities-self")
@routes.put("/v1/sys/capabilities-self")
async def capabilities_self(request: web.Request) -> web.Response:
    """The calling token's capabilities (``update`` on the path: the default policy has it)."""
    call: Call = request[CALL]
    token = await call.authenticate()
    await call.read_body()
    await call.require("sys/capabilities-self", "update")
    paths = _paths(call)
    caps = _capabilities(call, token, paths, call.identity)
    await call.audit("capabilities", paths=paths)
    return _answer(call, paths, caps)


async def _of_other(request: web.Request, path: str, field: str,
                    find: Callable[[Call, str], Awaitable[Token | None]]) -> web.Response:
    """Another token's capabilities, the token named by ``field`` of the body.

    What the caller sent in ``field`` never reaches the audit log (a token
    value, or a token pasted as an accessor by mistake): the ``request`` line
    carries no body, and the ``capabilities`` line names the token by its
    accessor. Unknown, revoked or expired tokens alike get Vault's 400.
    """
    call: Call = request[CALL]
    await call.authenticate()
    await call.read_body()
    await call.require(path, "update")
    value = call.string(field, required=True) or ""
    paths = _paths(call)
    other = live_token(await find(call, value), call.state.engine.clock())
    if other is None:
        await call.audit("capabilities", outcome="error", paths=paths,
                         error=f"invalid {field}")
        raise BadRequest(f"invalid {field}")
    caps = _capabilities(call, other, paths, identity_of(other))
    await call.audit("capabilities", paths=paths, target=other.accessor)
    return _answer(call, paths, caps)


@routes.post("/v1/sys/capabilities")
@routes.put("/v1/sys/capabilities")
async def capabilities_token(request: web.Request) -> web.Response:
    """Another token's capabilities, named by its value (``update`` on ``sys/capabilities``)."""
    return await _of_other(request, "sys/capabilities", "token",
                           lambda call, value: call.state.store.token_by_hash(hash_token(value)))


@routes.post("/v1/sys/capabilities-accessor")
@routes.put("/v1/sys/capabilities-accessor")
async def capabilities_accessor(request: web.Request) -> web.Response:
    """Another token's capabilities, named by its accessor (``update`` on
    ``sys/capabilities-accessor``)."""
    return await _of_other(request, "sys/capabilities-accessor", "accessor",
                           lambda call, value: call.state.store.token_by_accessor(value))
