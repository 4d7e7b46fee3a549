"""The start every read-only configuration path shares: mount roles (``roles.py``),
policies (``policies.py``) and JWT roles and settings (``auth_roles.py``).

Vault's rules, in Vault's order: the method first (405 with ``Allow``; for a
write the caller's ``refuse`` says where the thing is set instead), then the
token, then "a listing is a LIST" / "an item is not a listing" (405), and the
grant last, before anything is looked up: a token without it learns nothing,
not even whether the thing exists.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from broker.api.common import CALL, Call, is_list_request

__all__ = ["LIST_METHODS", "READ_METHODS", "item_call", "listing_call", "require_listing"]

LIST_METHODS = ("GET", "LIST")
READ_METHODS = ("GET",)

#: The module's 405: ``(request, allowed methods, text or None for the default)``.
Refuse = Callable[[web.Request, tuple[str, ...], str | None], web.Response]


async def require_listing(call: Call, path: str, capability: str = "list") -> None:
    """``capability`` on the listing ``path``: Vault checks a LIST with a slash added
    (``pg/roles/``), the broker's docs name it without (``pg/roles``); either will do."""
    if not call.allowed(f"{path}/", capability):
        await call.require(path, capability)


async def listing_call(request: web.Request, path: str, refuse: Refuse) -> Call | web.Response:
    """The call for a LIST of ``path`` once allowed, or the answer refusing it."""
    if request.method not in LIST_METHODS:
        return refuse(request, LIST_METHODS, None)
    call: Call = request[CALL]
    await call.authenticate()
    if not is_list_request(request):
        # As Vault (after the token check): a plain read of the folder is no operation.
        return refuse(request, LIST_METHODS, f"{path} is a listing: send LIST, or GET with "
                      "?list=true")
    await require_listing(call, path)
    return call


async def item_call(request: web.Request, path: str, refuse: Refuse, *,
                    kind: str | None = None, folder: str | None = None) -> Call | web.Response:
    """The call for a read of ``path`` (a ``kind`` listed in ``folder``) once allowed, or
    the answer refusing it."""
    if request.method != "GET":
        return refuse(request, READ_METHODS, None)
    call: Call = request[CALL]
    await call.authenticate()
    if is_list_request(request):  # GET ?list=true: an item is not a folder (Vault: 405 too)
        text = (f"{path} is a {kind}, not a listing: GET it without ?list=true, or list "
                f"{folder}" if kind else f"{path} is not a listing: GET it without ?list=true")
        return refuse(request, READ_METHODS, text)
    await call.require(path, "read")
    return call
