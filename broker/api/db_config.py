"""``LIST /v1/{mount}/config`` and ``GET /v1/{mount}/config/{name}``: a database mount's
connection, read-only.

Vault's database engine paths and shapes (``path_config_connection.go``), so
hvac's ``secrets.database.list_connections`` and ``read_connection`` work on a
postgres or mysql mount. A Vault database mount holds named connections; a
broker mount IS one connection, named as the mount (``pg/config/pg``), so the
listing has that one name and any other is Vault's bare 404. Vault's
``{mount}/rotate-root/{connection}`` (hvac's ``rotate_root_credentials(name)``)
takes that name too: another one is a 404 saying which name is the mount's,
after the grant is checked (the rotation itself is ``mounts.py``'s).

The answer is written field by field from the mount's parsed config, never the
admin secret: not the password, nor a ``password_file``'s content, nor where
the secret is kept. ``connection_url`` is shown as Vault shows it, a password
in it replaced by ``xxxxx`` (Go's ``url.Redacted``); the config already refuses
one there, so that is a second line of defence, as is hiding every
secret-named option.

A mount is configured in the broker's config file (``[mounts.NAME]``, re-read
on SIGHUP), so writes here (hvac's ``configure``, ``delete_connection`` and
``reset_connection``) answer 405 saying so. As in Vault, reading needs a grant
the ``default`` policy lacks, checked before anything is looked up. A mount of
another plugin (aws) has no such paths: 404 ``unsupported path``, as Vault's
AWS engine answers them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

from aiohttp import web

from broker.api import mounts
from broker.api.common import CALL, Call, error_response, not_allowed, vault_response
from broker.api.read_only import item_call, listing_call
from broker.audit import is_secret_name, redact, shown
from broker.backend import MountSpec
from broker.errors import NotFound

__all__ = ["DATABASE_PLUGINS", "connection_data", "redacted_url", "rotate_routes", "routes"]

routes = web.RouteTableDef()
#: ``{mount}/rotate-root/{connection}``, added before ``mounts.routes``: the name is
#: checked here, and the rotation is left to ``mounts.rotate_root``.
rotate_routes = web.RouteTableDef()

#: The broker plugins that are Vault database-engine connections, and the name of
#: Vault's plugin for the same database (``plugin_name``; MariaDB is mysql's too).
DATABASE_PLUGINS: Mapping[str, str] = {
    "postgres": "postgresql-database-plugin",
    "mysql": "mysql-database-plugin",
}
#: Both built-in database plugins' pool size when the mount sets none
#: (plugins/_pg_options.py, plugins/mysql.py ``DEFAULT_MAX_OPEN``).
_DEFAULT_MAX_OPEN = 4
#: What Go's ``url.Redacted`` writes for a password, as Vault's answer shows it.
_REDACTED = "xxxxx"
#: URL query parameters that point at a secret, besides the secret-named ones.
_SECRET_QUERY_KEYS = frozenset({"passfile"})
#: ``POST {mount}/config/rotate-root`` is rotate-root (``mounts.py``, routed first).
_ROTATE_ROOT = "rotate-root"


def _not_allowed(request: web.Request, allowed: tuple[str, ...],
                 text: str | None = None) -> web.Response:
    """405 with the ``Allow`` header; for a write, where the connection is set instead."""
    mount = request.match_info["mount"]
    return not_allowed(request, allowed, text, read_only=(
        f"database connections are read-only over the API: a mount is one connection, "
        f"set in the broker's config file ([mounts.{mount}]), re-read on SIGHUP"))


def _database_mount(request: web.Request) -> str:
    """The mount in the path; 404 ``unsupported path`` where it is no database mount.

    ``sys`` and ``auth`` are no mounts, and a mount of another plugin (aws) has no
    connections, as in Vault, whose AWS engine has no such paths. Told before the
    token is checked, as for any path the broker does not route: which plugin a
    mount runs is public (``sys/health`` lists it to anyone). An unknown mount
    goes on to the method and grant checks, and is a 404 naming it after them.
    """
    mount = request.match_info["mount"]
    runtime = request[CALL].state.engine.mounts.get(mount)
    if mount in {"sys", "auth"} or (runtime is not None
                                    and runtime.spec.plugin not in DATABASE_PLUGINS):
        raise web.HTTPNotFound()  # the error middleware words it "unsupported path"
    return mount


def _redacted_pair(pair: str) -> str:
    key, sep, _ = pair.partition("=")
    name = unquote_plus(key)
    if sep and (is_secret_name(name) or name.lower() in _SECRET_QUERY_KEYS):
        return f"{key}={_REDACTED}"
    return pair


def redacted_url(url: str) -> str:
    """``url`` as Vault's read shows ``connection_url``: a password in it as ``xxxxx``
    (Go's ``url.Redacted``), and so is a secret-named query parameter's value."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{_REDACTED}@{host}"
    query = "&".join(_redacted_pair(pair) for pair in parts.query.split("&")) \
        if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def connection_data(spec: MountSpec) -> dict[str, Any]:
    """A database mount as Vault's ``read_connection`` answers a connection.

    ``connection_details`` holds the mount's options as configured (secret-named
    ones as ``[redacted]``), the admin ``username`` from the URL, and the pool
    size in force. The rest is fixed by how the broker works: every role of the
    mount uses its connection (``allowed_roles: ["*"]``), rotate-root runs the
    plugin's own statements (``[]``), passwords come from the broker's own
    generator (no ``password_policy``), and the connection is verified whenever
    the mount starts.
    """
    details: dict[str, Any] = redact({k: v for k, v in spec.options.items()
                                      if k != "connection_url"})
    url = spec.options.get("connection_url")
    if isinstance(url, str):
        details["connection_url"] = redacted_url(url)
        details["username"] = unquote(urlsplit(url).username or "")
    details.setdefault("max_open_connections", _DEFAULT_MAX_OPEN)
    return {
        "plugin_name": DATABASE_PLUGINS[spec.plugin],
        "plugin_version": "",
        "connection_details": details,
        "allowed_roles": ["*"],
        "root_credentials_rotate_statements": [],
        "password_policy": "",
        "verify_connection": True,
    }


async def _list(request: web.Request) -> web.Response:
    mount = _database_mount(request)
    call = await listing_call(request, f"{mount}/config", _not_allowed)
    if isinstance(call, web.Response):
        return call
    runtime = call.state.engine.mount(mount)  # 404 naming an unknown mount
    await call.audit("list", mount=mount, count=1)
    return vault_response(call, {"keys": [runtime.name]})


async def _read(call: Call, mount: str, name: str) -> web.Response:
    spec = call.state.engine.mount(mount).spec  # 404 naming an unknown mount
    if spec.plugin not in DATABASE_PLUGINS:  # a reload changed its plugin since the check
        raise web.HTTPNotFound()
    if name != spec.name:
        await call.audit("config_read", outcome="error", mount=mount, connection=shown(name),
                         error="no such connection")
        return error_response(404)  # Vault's bare 404 (hvac's InvalidPath)
    await call.audit("config_read", mount=mount, connection=name)
    return vault_response(call, connection_data(spec))


@routes.route("*", "/v1/{mount}/config")
async def list_connections(request: web.Request) -> web.Response:
    """The mount's one connection name (``list`` on ``{mount}/config``)."""
    return await _list(request)


@routes.route("*", "/v1/{mount}/config/{name:[^/]*}")
async def read_connection(request: web.Request) -> web.Response:
    """The mount's connection settings (``read`` on ``{mount}/config/{name}``).

    ``/v1/{mount}/config/`` (the folder, with its slash) is the listing.
    """
    name = request.match_info["name"]
    if not name:
        return await _list(request)
    if name == _ROTATE_ROOT and name != request.match_info["mount"]:
        # The path of rotate-root on every mount (a POST, routed to mounts.py):
        # nothing else is served there, as before this route and as the OpenAPI
        # document says of that concrete path.
        return not_allowed(request, ("POST",))
    mount = _database_mount(request)
    call = await item_call(request, f"{mount}/config/{name}", _not_allowed,
                           kind="connection", folder=f"{mount}/config")
    if isinstance(call, web.Response):
        return call
    return await _read(call, mount, name)


@routes.route("*", "/v1/{mount}/reset/{name}")
async def reset_connection(request: web.Request) -> web.Response:
    """Vault's ``reset/{name}`` (close and reopen a connection): refused, 405.

    The broker reconnects a mount that fails on its own; its settings change
    with the config file and a reload (SIGHUP).
    """
    _database_mount(request)
    return _not_allowed(request, ())


@rotate_routes.post("/v1/{mount}/rotate-root/{connection}")  # Vault's database engine
async def rotate_root_connection(request: web.Request) -> web.StreamResponse:
    """Vault's ``rotate-root/{connection}`` (hvac's ``rotate_root_credentials(name)``):
    the mount's one connection, named as the mount, is rotated; another name is a 404.

    As in Vault, the grant (``update``/``sudo`` on the path asked for) is checked
    before the name: a token without it learns nothing. An unknown mount is
    ``mounts.rotate_root``'s 404 naming it.
    """
    mount, connection = request.match_info["mount"], request.match_info["connection"]
    runtime = request[CALL].state.engine.mounts.get(mount)
    if runtime is None or connection == runtime.spec.name:
        return await mounts.rotate_root(request)
    call: Call = request[CALL]
    await call.authenticate()
    await call.read_body()
    path = f"{mount}/rotate-root/{connection}"
    await call.require(path, "update", "sudo")
    name = runtime.spec.name
    message = (f"no connection {shown(connection)!r} on mount {mount!r}: a broker mount is one "
               f"connection, named as the mount ({mount}/config/{name}); rotate it with "
               f"{mount}/rotate-root/{name} or {mount}/rotate-root")
    await call.audit("admin", outcome="error", action="rotate_root", mount=mount,
                     connection=shown(connection), error="no such connection")
    raise NotFound(message)
