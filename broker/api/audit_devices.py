"""``GET /v1/sys/audit``: Vault's list of enabled audit devices, read-only.

hvac's ``sys.list_enabled_audit_devices()`` (and ``vault audit list``) ask it.
The broker has one audit log, the ``[audit]`` table of its config file; it is
shown as Vault's ``file`` device, the name ``sys/audit-hash/{device}`` takes
(:data:`broker.api.audit_hash.AUDIT_DEVICE`), with the file this process
writes as ``file_path`` (with ``[server] workers > 1``, each worker's own).

As in Vault, where the path is root-protected, reading it needs ``sudo`` (and
``read``) on ``sys/audit``: the root policy has them, the default one does not.
Audit devices cannot be enabled or disabled over the API (``PUT``/``POST``/
``DELETE sys/audit/NAME``, hvac's ``enable_audit_device`` and
``disable_audit_device``): those answer 405 saying that ``[audit]`` sets the
log. Nothing secret is shown: not the HMAC key, nor where it is kept.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from broker.api.audit_hash import AUDIT_DEVICE
from broker.api.common import not_allowed, vault_response
from broker.api.read_only import item_call
from broker.config import AuditConfig

__all__ = ["device_info", "routes"]

routes = web.RouteTableDef()

_PATH = "sys/audit"
_READ_ONLY = (f"audit devices are not enabled or disabled over the API: the broker has one "
              f"audit log (device {AUDIT_DEVICE!r}), set in its config file's [audit] table")


def _not_allowed(request: web.Request, allowed: tuple[str, ...],
                 text: str | None = None) -> web.Response:
    return not_allowed(request, allowed, text, read_only=_READ_ONLY)


def _flag(value: bool) -> str:
    # Vault's device options are strings (map[string]string), booleans included.
    return "true" if value else "false"


def device_info(audit: AuditConfig) -> dict[str, Any]:
    """The audit log as Vault's ``file`` device in ``sys/audit``'s shape."""
    return {
        "type": "file",
        "description": "",
        "options": {
            "file_path": audit.path,
            "format": "json",
            "hmac_accessor": _flag(audit.hmac_accessor),
            "log_raw": "false",  # secrets are always HMACs: there is no raw mode
            "fsync": _flag(audit.fsync),  # extension: Vault's file device has no such option
        },
        "local": False,
        "path": f"{AUDIT_DEVICE}/",
    }


async def _list(request: web.Request) -> web.Response:
    call = await item_call(request, _PATH, _not_allowed)
    if isinstance(call, web.Response):
        return call
    # Both, as Vault asks of a root-protected path it reads: sudo alone is no read.
    await call.require(_PATH, "sudo")
    devices = {f"{AUDIT_DEVICE}/": device_info(call.state.config.audit)}
    await call.audit("audit_list", count=len(devices))
    # Vault answers this path with the mapping at the top level too (hvac reads either).
    return vault_response(call, devices, top_level=True)


@routes.route("*", "/v1/sys/audit")
async def list_audit_devices(request: web.Request) -> web.Response:
    """The enabled audit devices: the broker's one log (``read`` and ``sudo`` on sys/audit)."""
    return await _list(request)


@routes.route("*", "/v1/sys/audit/{path:.*}")
async def audit_device(request: web.Request) -> web.Response:
    """``sys/audit/NAME``: enabling or disabling a device, which the broker refuses (405).

    ``/v1/sys/audit/`` (with the slash) is the list.
    """
    if not request.match_info["path"]:
        return await _list(request)
    # Vault has no read here either (only update and delete): every method is a 405.
    return _not_allowed(request, (), f"method {request.method} not allowed here: GET "
                        f"{_PATH} lists the audit devices" if request.method == "GET" else None)
