"""``/v1/sys/health``, ``seal-status``, ``init``, ``leader``, ``mounts`` (and a mount's
``tune``), ``auth``, ``metrics`` and the OpenAPI document (``internal/specs/openapi``)."""

from __future__ import annotations

import functools
import hashlib
import re
import time
import uuid
from collections.abc import Mapping
from importlib import resources
from typing import Any

from aiohttp import web

from broker import __version__, metrics_text
from broker.api.common import (
    CALL,
    STATE,
    Call,
    is_list_request,
    json_response,
    not_allowed,
    vault_response,
)
from broker.api.leases import rfc3339
from broker.api.login import auth_methods
from broker.errors import BadRequest, BrokerError, StoreUnavailable
from broker.middleware import MountRuntime
from broker.state import BrokerState
from broker.store.base import Overdue
from broker.worker_stats import merge, publish_own

__all__ = ["auth_mount_info", "mount_info", "routes"]

routes = web.RouteTableDef()


#: Vault's ``sys/health`` query parameters that pick the status code of a node state, with
#: Vault's defaults (http/sys_health.go). The broker is never uninitialized, a standby or a
#: DR secondary: those are checked (a bad value is a 400, as in Vault) but never chosen.
_HEALTH_CODES = {
    "activecode": 200,
    "standbycode": 429,
    "drsecondarycode": 472,
    "performancestandbycode": 473,
    "sealedcode": 503,
    "uninitcode": 501,
}
#: Vault's boolean ``sys/health`` parameters: they only matter on a standby.
_HEALTH_FLAGS = ("standbyok", "perfstandbyok")
#: Go's strconv.ParseBool spellings, as Vault parses ``standbyok``.
_GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
             "0": False, "f": False, "F": False, "FALSE": False, "false": False,
             "False": False}
#: A status code a ``*code`` parameter may choose: a final answer (no 1xx), one that
#: HTTP clients and load balancers understand. ``activecode`` may not be a 5xx (Vault
#: takes any): a serving broker that answers one is taken out of every pool by a
#: typo, and a 5xx from health would read as the broker failing.
_CODE_RANGE = range(200, 600)
_ACTIVE_RANGE = range(200, 500)
#: How a ``*code`` parameter is spelled (as Go's strconv.Atoi reads it, ASCII digits only).
_STATUS_TEXT = re.compile(r"[+-]?[0-9]{1,9}")
#: Answers that carry no body (RFC 9110): chosen, they are sent empty.
_BODILESS = frozenset({204, 304})

#: A component's failure reason shown to a caller without a detail-reading token as is:
#: a few plain words ("database or disk is full", "File too large", "no commit within
#: 2s"). A reason with anything else (a host:port, a path, a driver's message) is
#: replaced by _WITHHELD; a mount's, free text from its plugin, always is.
_PLAIN_REASON = re.compile(r"[A-Za-z][A-Za-z0-9 '-]{0,79}")
_WITHHELD = "unavailable; a token that may read sys/metrics sees why"


def _overdue_grace(state: BrokerState) -> float:
    """Seconds past its expiry after which a live lease counts as overdue: one
    ``claim_timeout``. A lease is claimed as it falls due, and its revocation has until
    the claim runs out to be recorded (config.py keeps that longer than a backend call
    may take); one still live after that has missed its turn, whatever held it (its
    mount down, retries, a sweeper behind). Shorter would count a busy sweeper's
    ordinary lag; longer would wait on an alert that is already true."""
    return float(state.config.leases.claim_timeout)


async def _overdue_leases(state: BrokerState) -> dict[str, dict[str, float]] | None:
    """Overdue leases per mount (every configured mount, 0 when none, and any other
    mount that has some): ``{"leases": N, "oldest_seconds": S}``, S how long past its
    expiry the oldest of them is. None: the store could not count them."""
    now = state.engine.clock()
    try:
        found = await state.store.count_overdue(before=now - _overdue_grace(state))
    except StoreUnavailable:
        return None
    figures = {name: {"leases": 0, "oldest_seconds": 0.0} for name in state.engine.mounts}
    for mount, o in found.items():
        figures[mount] = _overdue_figure(o, now)
    return dict(sorted(figures.items()))


def _overdue_figure(o: Overdue, now: float) -> dict[str, float]:
    return {"leases": o.count, "oldest_seconds": round(max(0.0, now - o.oldest_expire_time), 3)}


def _health_codes(query: Mapping[str, str]) -> dict[str, int]:
    """The ``*code`` parameters of a ``sys/health`` query, defaults filled in; a bad value
    of one of them, or of ``standbyok``/``perfstandbyok``, is a 400 naming it."""
    for name in _HEALTH_FLAGS:
        if name in query and query[name] not in _GO_BOOLS:
            raise BadRequest(f"bad value for {name} parameter: use true or false")
    codes = dict(_HEALTH_CODES)
    for name in _HEALTH_CODES:
        if name not in query:
            continue
        text = query[name]
        allowed = _ACTIVE_RANGE if name == "activecode" else _CODE_RANGE
        code = int(text) if _STATUS_TEXT.fullmatch(text) else None
        if code is None or code not in allowed:
            raise BadRequest(f"bad value for {name} parameter: an HTTP status code "
                             f"from {allowed.start} to {allowed.stop - 1}")
        codes[name] = code
    return codes


def _reason(error: str | None, detail: bool, *, plugin_text: bool = False) -> str | None:
    """``error`` as a caller may see it (see _PLAIN_REASON)."""
    if error is None or detail:
        return error
    if plugin_text or not _PLAIN_REASON.fullmatch(error):
        return _WITHHELD
    return error


async def _shows_detail(call: Call) -> bool:
    """Whether the caller sent a token that may ``read`` ``sys/metrics``: then health shows
    why a mount, the audit log or the store fails, in full.

    The token is checked, and audited, as on any call; but health never refuses
    one: a missing, unknown or dead token (or one that cannot be checked while the
    store or the audit log is down) gets the answer anyone gets, as in Vault,
    which ignores tokens on ``sys/health``.
    """
    if not call.presented_token():
        return False
    try:
        await call.authenticate(consume=False)  # Vault ignores tokens here: no use taken
    except BrokerError:
        return False
    return call.allowed("sys/metrics", "read")


@routes.get("/v1/sys/health")
async def health(request: web.Request) -> web.Response:
    """Vault's health shape plus each mount's, the audit log's and the store's health.

    No token needed. Vault's ``*code`` parameters choose the status; the broker
    is always initialized, unsealed and active, except that it cannot serve
    (shutting down, or its audit log or lease store failing): that state answers
    ``sealedcode`` (503, as a sealed Vault), for load balancers to route around.
    Why a component fails is shown in full only to a token that may read
    ``sys/metrics``: a backend's error names its host and port. Such a token also
    sees each mount's ``overdue_leases`` (lease counts are metrics, and a load
    balancer's check, without a token, costs no store query); they never change
    the status: a mount's backend being down does not stop the others.
    """
    codes = _health_codes(request.query)
    call: Call = request[CALL]
    state = request.app[STATE]
    detail = await _shows_detail(call)
    mounts: dict[str, dict[str, Any]] = {
        name: {"plugin": m.spec.plugin, "healthy": m.healthy,
               "error": _reason(m.error, detail, plugin_text=True)}
        for name, m in state.engine.mounts.items()
    }
    audit_ok = state.audit.healthy
    store_error = state.store.error
    if detail:
        overdue = await _overdue_leases(state) if store_error is None else None
        for name, entry in mounts.items():
            # .get: a reload may have added a mount since ``mounts`` was read (before
            # the store's answer).
            entry["overdue_leases"] = (None if overdue is None
                                       else overdue.get(name, {}).get("leases", 0))
    # An instance that cannot audit cannot issue anything (fail-closed), nor can
    # one that cannot reach its lease store: tell load balancers to send traffic
    # elsewhere (a replica with its own path to the store may still reach it).
    serves = state.serving and audit_ok and store_error is None
    status = codes["activecode"] if serves else codes["sealedcode"]
    body = {
        "initialized": True,
        "sealed": False,
        "standby": False,
        "performance_standby": False,
        "replication_performance_mode": "disabled",
        "replication_dr_mode": "disabled",
        "server_time_utc": int(time.time()),
        "version": __version__,
        "cluster_name": "broker",
        "mounts": mounts,
        "audit": {"healthy": audit_ok,
                  "error": _reason(getattr(state.audit, "last_error", None), detail)},
        "storage": {"healthy": store_error is None, "error": _reason(store_error, detail)},
    }
    if status in _BODILESS:
        return web.Response(status=status)
    return json_response(body, status=status)


@routes.get("/v1/sys/seal-status")
async def seal_status(request: web.Request) -> web.Response:
    """Vault's seal status, for clients that ask before anything else (hvac's
    ``sys.is_sealed()``, ``vault status``). The broker has no seal to open: it
    is always initialized and unsealed, and says so. No token needed, as in Vault.
    """
    state = request.app[STATE]
    return json_response({
        "type": "shamir",
        "initialized": True,
        "sealed": False,
        "t": 0,
        "n": 0,
        "progress": 0,
        "nonce": "",
        "version": __version__,
        "migration": False,
        "cluster_name": "broker",
        "recovery_seal": False,
        "storage_type": state.config.storage.url.partition(":")[0],
    })


def _replicas_possible(state: BrokerState) -> bool:
    """Whether other brokers may share this one's store: a PostgreSQL store can be shared
    by replicas, an embedded SQLite file cannot."""
    return state.config.storage.url.startswith(("postgresql:", "postgres:"))


@routes.get("/v1/sys/leader")
async def leader(request: web.Request) -> web.Response:
    """Vault's ``GET sys/leader`` (``vault status``, hvac's ``sys.read_leader_status()``).

    No token needed, as in Vault. There is no leader election: every broker,
    replica or not, serves every request itself, so each answers ``is_self:
    true`` with its own address. ``ha_enabled`` says whether replicas are
    possible at all (a PostgreSQL store), and ``active_time`` is when this
    instance started serving. There is no cluster port: its address is "".
    """
    state = request.app[STATE]
    return json_response({
        "ha_enabled": _replicas_possible(state),
        "is_self": True,
        "active_time": rfc3339(state.started),
        "leader_address": state.config.server.address,
        "leader_cluster_address": "",
        "performance_standby": False,
        "performance_standby_last_remote_wal": 0,
    })


@routes.get("/v1/sys/auth")
async def auth_mounts(request: web.Request) -> web.Response:
    """Vault's ``GET sys/auth`` (hvac's ``sys.list_auth_methods()``): the token method and
    each ``[auth.jwt.NAME]`` method, keyed ``NAME/``. ``read`` on ``sys/auth``.

    As Vault answers it, the mapping is both under ``data`` and at the top level.
    Methods are set in the config file, not enabled over the API, so the
    mount-time settings Vault reports have their defaults. Accessor and uuid are
    derived from the name, so every replica answers the same.
    """
    call: Call = request[CALL]
    await call.authenticate()
    await call.require("sys/auth", "read")
    methods = {"token/": auth_mount_info("token", "token", "token based credentials")}
    for name in sorted(auth_methods(call.state)):
        methods[f"{name}/"] = auth_mount_info(name, "jwt", "JWT/OIDC login")
    return vault_response(call, methods, top_level=True)


def mount_info(runtime: MountRuntime) -> dict[str, Any]:
    """One secrets mount in Vault's ``mountInfo`` shape, plus ``env_names`` and ``healthy``.

    ``options`` is null: the mount's own settings (its connection URL, region,
    ...) are configuration, not anything a client of the mount needs. Accessor
    and uuid are derived from the name, so every replica answers the same.
    """
    name, plugin = runtime.spec.name, runtime.spec.plugin
    digest = hashlib.sha256(f"broker mount {name}/".encode()).hexdigest()
    return {
        "type": plugin,
        "description": "",
        "accessor": f"{plugin}_{digest[:8]}",
        "uuid": str(uuid.UUID(digest[:32], version=4)),
        "config": {"default_lease_ttl": 0, "max_lease_ttl": 0, "force_no_cache": False},
        "local": False,
        "seal_wrap": False,
        "external_entropy_access": False,
        "options": None,
        "plugin_version": "",
        "running_plugin_version": "",
        "running_sha256": "",
        # Extensions. Health is no secret: GET sys/health shows it to anyone.
        "healthy": runtime.healthy,
        "env_names": dict(runtime.capabilities.env_names),
    }


def auth_mount_info(name: str, kind: str, description: str) -> dict[str, Any]:
    """One entry of ``sys/auth`` (and of ``sys/internal/ui/mounts``' ``auth``) in Vault's
    shape."""
    digest = hashlib.sha256(f"broker auth {name}/".encode()).hexdigest()
    return {
        "accessor": f"auth_{kind}_{digest[:8]}",
        "config": {"default_lease_ttl": 0, "force_no_cache": False, "max_lease_ttl": 0,
                   "token_type": "default-service"},
        "description": description,
        "external_entropy_access": False,
        "local": False,
        "options": None,
        "plugin_version": "",
        "running_plugin_version": "",
        "running_sha256": "",
        "seal_wrap": False,
        "type": kind,
        "uuid": str(uuid.UUID(digest[:32], version=4)),
    }


@routes.get("/v1/sys/init")
async def init_status(request: web.Request) -> web.Response:
    """Vault's ``GET sys/init`` (hvac's ``sys.is_initialized()``): always initialized.
    (Tokens come from ``broker operator init``, not from this path.)"""
    return json_response({"initialized": True})


#: docs/openapi.yaml as JSON, shipped inside the package (the YAML is not, and reading
#: it would need PyYAML at run time); tests/integration/test_openapi.py fails when the
#: two differ.
OPENAPI_JSON = "openapi.json"


@functools.cache
def openapi_document() -> bytes:
    """The OpenAPI document's bytes, read once (from the wheel or the source tree)."""
    return resources.files("broker.api").joinpath(OPENAPI_JSON).read_bytes()


@routes.get("/v1/sys/internal/specs/openapi")
async def openapi_spec(request: web.Request) -> web.Response:
    """Vault's ``GET sys/internal/specs/openapi``: the API as an OpenAPI document (JSON).

    No token needed, as in Vault. Vault narrows the document to the paths the
    caller's token may use; ours is the whole static API (docs/openapi.yaml),
    which is public anyway, and names no mount, role or lease.
    """
    return web.Response(body=openapi_document(), content_type="application/json")


#: the ``warnings`` of a ``sys/mounts`` answer to a token without ``read`` on it.
PARTIAL_MOUNTS_WARNING = ("only the mounts this token may use are listed, without their "
                          "roles; read on sys/mounts lists them all")


@routes.get("/v1/sys/mounts")
async def mounts(request: web.Request) -> web.Response:
    """Every mount with its plugin, health, roles and ``env_names`` (extension of Vault's
    shape), for a token with ``read`` on ``sys/mounts``, which the ``default`` policy
    does not grant, as Vault's: a client asks ``sys/internal/ui/mounts/MOUNT``.

    Any other token gets only the mounts its policies grant something under
    (what ``sys/internal/ui/mounts`` tells it), without their roles, not a 403:
    a ``broker creds --format env`` / ``broker exec`` from before that path
    existed reads its variable names here, and on a 403 it fell back to
    ``BROKER_*`` names, so the command ran with no ``PGUSER`` and psql logged
    in as the OS user (QA).
    """
    call: Call = request[CALL]
    await call.authenticate()
    state = call.state
    full = call.allowed("sys/mounts", "read")
    data: dict[str, Any] = {}
    for name, m in state.engine.mounts.items():
        if not full and not state.policies.grants_under(
                call.token.policies if call.token else (), f"{name}/",
                identity=call.identity):
            continue
        data[f"{name}/"] = mount_info(m)
        if full:
            data[f"{name}/"]["roles"] = sorted(m.spec.roles)
    # Said, so that a client (``broker lease list``) never takes a mount missing
    # from a partial answer for one the broker does not have.
    warnings = None if full else [PARTIAL_MOUNTS_WARNING]
    # Also at the top level, as Vault answers it.
    return vault_response(call, data, warnings=warnings, top_level=True)


#: What a write to ``sys/mounts/NAME/tune`` is told (405): there is nothing to tune.
TUNE_READ_ONLY = ("mounts are configured in the broker's config file ([mounts.NAME]; the "
                  "lease TTLs in [leases] and in each role), re-read on SIGHUP: tune is "
                  "read-only")


@routes.route("*", "/v1/sys/mounts/{path:.+}/tune")
async def mount_tune(request: web.Request) -> web.Response:
    """Vault's ``GET sys/mounts/NAME/tune`` (hvac's ``sys.read_mount_configuration``):
    the mount's lease TTLs in seconds, under ``data`` and at the top level (as Vault
    answers it, and clients read it either way).

    A mount has no TTLs of its own: a role without ``default_ttl``/``max_ttl`` takes
    ``[leases] default_ttl``/``max_ttl``, and no role may go past ``[leases]
    max_ttl``, which is what Vault's mount TTLs are (its answer shows the system
    values for a mount never tuned, as here). Read-only: a write is a 405 saying
    where mounts are set. The grant is ``sys/mounts``': ``read`` on it or on
    Vault's ``sys/mounts/NAME/tune``, or any grant under the mount (what
    ``sys/mounts`` shows such a token); else 403, before the mount is looked up.
    """
    if request.method != "GET":
        return not_allowed(request, ("GET",), read_only=TUNE_READ_ONLY)
    call: Call = request[CALL]
    await call.authenticate()
    if is_list_request(request):  # GET ?list=true: as Vault, which has no LIST here
        return not_allowed(request, ("GET",), "sys/mounts/NAME/tune is not a listing: GET "
                           "it without ?list=true")
    name = request.match_info["path"].strip("/")  # Vault's sanitizePath: "pg/" is "pg"
    await _require_mount_read(call, name, f"sys/mounts/{name}/tune")
    call.state.engine.mount(name)  # 404 for an unknown mount
    leases = call.state.config.leases
    data = {
        "description": "",
        "default_lease_ttl": leases.default_ttl,
        "max_lease_ttl": leases.max_ttl,
        "force_no_cache": False,
    }
    return vault_response(call, data, top_level=True)


async def _require_mount_read(call: Call, name: str, path: str) -> None:
    """``sys/mounts``' grant for one mount: ``read`` on ``sys/mounts`` or on ``path``, or
    a grant under ``NAME/``, unless a rule denies ``path`` (deny wins); else audited
    and 403."""
    assert call.token is not None
    if call.allowed(path, "read"):
        return
    if call.denied(path):
        await call.require(path, "read")  # audited as denied, 403
    if call.allowed("sys/mounts", "read"):
        return
    if call.state.policies.grants_under(call.token.policies, f"{name}/",
                                        identity=call.identity):
        return
    await call.require(path, "read")


#: The families a scrape gets while the lease store is down and its token cannot
#: be checked: no more than ``GET sys/health`` tells anyone without a token.
STORE_DOWN_FAMILIES = frozenset({
    "broker_store_healthy", "broker_audit_healthy", "broker_mount_healthy"})


@routes.get("/v1/sys/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Lease counts by state, sweeper load and per-backend call timings (JSON, or
    Prometheus' text format with ``?format=prometheus``, as Vault).

    With several workers the figures are every worker's added up (each is
    also listed under ``workers``), whichever worker answers.

    The lease store down: a token checked before, or one checked on a replica, can
    no longer be checked. A Prometheus scrape then gets only the health gauges
    (``broker_store_healthy 0``: what the alert is about), which sys/health
    shows to anyone; JSON answers 503, as every other call. A token that is
    checked gets everything but the lease counts, which need the store.
    """
    call: Call = request[CALL]
    fmt = request.query.get("format", "")
    try:
        await call.authenticate()
    except StoreUnavailable:
        if fmt != "prometheus":
            raise
        text = _render(call.state, None)
        await call.audit("response", outcome="error", error="lease store unavailable: token "
                         "not checked; answered the health gauges only")
        return web.Response(body=_only_families(text, STORE_DOWN_FAMILIES).encode(),
                            headers={"Content-Type": metrics_text.CONTENT_TYPE})
    await call.require("sys/metrics", "read")
    if fmt not in ("", "json", "prometheus"):
        raise BadRequest(f"format {fmt!r}: use prometheus, or leave it out for JSON")
    state = call.state
    try:
        leases: dict[str, int] | None = await state.store.count_by_state()
    except StoreUnavailable:
        leases = None  # the rest needs no store, and broker_store_healthy says why
    overdue = await _overdue_leases(state) if leases is not None else None
    if fmt == "prometheus":
        return web.Response(body=_render(state, leases, overdue).encode(),
                            headers={"Content-Type": metrics_text.CONTENT_TYPE})
    own = publish_own(state)  # this worker's figures fresh, the others' up to 1 s old
    workers = state.stats_board.snapshots() if state.stats_board is not None else {}
    total = merge(workers.values() if workers else [own])
    started = min(w["started"] for w in workers.values()) if workers else state.started
    data: dict[str, Any] = {
        "leases": leases,
        "leases_overdue": overdue,
        "sweeper_busy": total["sweeper_busy"],
        "sweeper_dropped_claims": total["sweeper_dropped_claims"],
        "backends": _backend_figures(total["backends"]),
        "started": rfc3339(started),
    }
    if workers:
        data["worker"] = state.worker
        data["workers"] = {
            str(n): {"pid": w["pid"], "started": rfc3339(w["started"]),
                     "updated": rfc3339(w["published"]),
                     "sweeper_busy": w["sweeper_busy"],
                     "sweeper_dropped_claims": w["sweeper_dropped_claims"],
                     "backends": _backend_figures(w["backends"])}
            for n, w in sorted(workers.items())
        }
    return vault_response(call, data)


def _render(state: BrokerState, leases: dict[str, int] | None,
            overdue: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """The Prometheus text; ``leases`` or ``overdue`` None: the store could not count
    them (no samples)."""
    own = publish_own(state)
    workers = state.stats_board.snapshots() if state.stats_board is not None else {}
    total = merge(workers.values() if workers else [own])
    started = min(w["started"] for w in workers.values()) if workers else state.started
    return metrics_text.render(
        leases=leases or {}, overdue=overdue or {}, total=total, started=started,
        workers=max(len(workers), 1),
        audit_healthy=state.audit.healthy, store_healthy=state.store.error is None,
        mounts_healthy={name: m.healthy for name, m in state.engine.mounts.items()})


def _only_families(text: str, names: frozenset[str]) -> str:
    """The lines of exposition ``text`` that belong to the families ``names``."""
    kept = []
    for line in text.splitlines():
        if line.startswith("#"):
            name = line.split(maxsplit=3)[2]
        else:
            name = line.partition("{")[0].partition(" ")[0]
        if name in names:
            kept.append(line)
    return "\n".join(kept) + "\n"


def _backend_figures(backends: dict[str, dict[str, dict[str, Any]]]
                     ) -> dict[str, dict[str, dict[str, Any]]]:
    return {
        name: {op: {"calls": s["calls"], "errors": s["errors"],
                    "mean_ms": round(1000 * s["total_seconds"] / s["calls"], 3)
                    if s["calls"] else 0,
                    "max_ms": round(1000 * s["max_seconds"], 3)}
               for op, s in ops.items()}
        for name, ops in backends.items()
    }
