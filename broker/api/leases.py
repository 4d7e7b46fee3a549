"""``/v1/sys/leases/*``: renew, revoke, lookup, list, revoke-prefix/force, and extensions.

Extensions select leases by the metadata they carry (copied from the token
that issued them, e.g. a CI ``run_id``): ``revoke-by``, ``search``, and
``meta.KEY=VALUE`` query parameters on ``stats`` and the listing.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

from aiohttp import web

from broker import timefmt
from broker.api.common import (
    CALL,
    Call,
    error_response,
    json_response,
    not_allowed,
    vault_response,
)
from broker.audit import shown
from broker.engine import MountNotServed
from broker.errors import BadRequest, DeadLease, PermissionDenied, RevocationFailed, UnknownLease
from broker.lease import META_KEY, Lease, LeaseFilter, LeaseState
from broker.revocation import HELD_FOR_HEALTH, lease_ref

__all__ = ["limit_param", "meta_params", "rfc3339", "routes", "store_call"]

routes = web.RouteTableDef()

T = TypeVar("T")

LIVE_STATES = (LeaseState.ACTIVE, LeaseState.REVOKING, LeaseState.IRREVOCABLE)
#: How long a revoke request waits for the first attempt before answering "queued".
REVOKE_WAIT = 30.0
#: How long ``sync=true`` on revoke-prefix waits at most.
SYNC_WAIT = 600.0
#: ``LIST sys/leases/lookup/PREFIX`` answers at most this many keys unless ``limit`` says
#: otherwise (then with a warning, and ``after`` pages on).
LIST_LIMIT = 10_000
#: most rows one ``search`` answer carries.
SEARCH_MAX = 1000
#: the largest limit a listing takes (one that fits every store's LIMIT).
_INT_MAX = 2**31 - 1
_META_PARAM = "meta."
#: revoke-by's policy path; ``_REVOKE_BY/KEY/VALUE`` is its per-pair form.
_REVOKE_BY = "sys/leases/revoke-by"
#: Most selector pairs whose two-pair grants (``_REVOKE_BY/K1/V1/K2/V2``) are looked for.
_PAIRED_GRANT_PAIRS = 8


def rfc3339(ts: float | None) -> str | None:
    """``ts`` as the API writes times (:func:`broker.timefmt.rfc3339`); None stays None."""
    return None if ts is None else timefmt.rfc3339(ts)


def _only(request: web.Request, *methods: str) -> None:
    if request.method not in methods:
        raise web.HTTPMethodNotAllowed(request.method, list(methods))


async def _lease_for(call: Call, op: str) -> Lease:
    """Load the lease named in the body and check the caller may ``op`` it.

    The owner passes with the endpoint capability (granted by the built-in
    default policy); anyone else needs the capability on
    ``sys/leases/{op}/{lease_id}``.
    """
    await call.authenticate()
    await call.read_body()
    lease_id = call.string("lease_id") or call.request.match_info.get("lease_id", "")
    if not lease_id:
        raise BadRequest("missing required parameter 'lease_id'")
    endpoint = f"sys/leases/{op}"
    await call.require(endpoint, "update")
    lease = await call.state.engine.get_live(lease_id, caller=call.token,  # type: ignore[arg-type]
                                             op=op)
    token = call.token
    assert token is not None
    if lease.owner != token.accessor and not call.allowed(f"{endpoint}/{lease.id}", "update"):
        await call.audit("policy_denied", outcome="denied", lease=lease_ref(lease),
                         checked_path=f"{endpoint}/{lease.id}", capabilities=["update"])
        raise PermissionDenied(f"permission denied: lease {lease.id} belongs to another token")
    return lease


@routes.route("*", "/v1/sys/leases/renew")
@routes.route("*", "/v1/sys/leases/renew/{lease_id:.+}")
@routes.route("*", "/v1/sys/renew/{lease_id:.+}")
async def renew(request: web.Request) -> web.Response:
    _only(request, "PUT", "POST")
    call: Call = request[CALL]
    lease = await _lease_for(call, "renew")
    increment = call.duration("increment")
    # Taken before the renew (which reads the clock again): an honoured increment
    # of 1800 reads back as 1800, not 1799 after the audit write.
    now = call.state.engine.clock()
    try:
        lease, warnings = await call.state.engine.renew(lease, increment)
    except Exception as exc:
        await call.audit("renew", outcome="error", lease=lease_ref(lease), error=str(exc))
        raise
    await call.audit("renew", lease=lease_ref(lease), increment=increment,
                     expire_time=rfc3339(lease.expire_time))
    return vault_response(call, None, lease_id=lease.id, renewable=lease.renewable,
                          lease_duration=lease.ttl(now), warnings=warnings)


@routes.route("*", "/v1/sys/leases/revoke")
@routes.route("*", "/v1/sys/leases/revoke/{lease_id:.+}")
@routes.route("*", "/v1/sys/revoke/{lease_id:.+}")
async def revoke(request: web.Request) -> web.Response:
    _only(request, "PUT", "POST")
    call: Call = request[CALL]
    try:
        lease = await _lease_for(call, "revoke")
        call.flag("strict", False)  # checked on every call: a bad value is always a 400
        sync = call.flag("sync", True)
        # Raises the same when the lease ended since _lease_for looked (the sweeper
        # expired it, another revoke finished first).
        outcome = await call.state.engine.revoke(lease, wait=REVOKE_WAIT if sync else 0)
    except (UnknownLease, DeadLease) as gone:
        return await _nothing_to_revoke(call, gone)
    except MountNotServed as exc:
        # Queued for a replica that has the mount; this one cannot carry it out (503).
        await call.audit("revoke_request", lease=lease_ref(lease), outcome="queued",
                         error=str(exc))
        raise
    # An attempt still under way (sync=false asks for none to end) is no error.
    error = None if outcome.pending else outcome.error
    await call.audit("revoke_request", lease=lease_ref(lease),
                     outcome="ok" if outcome.done else
                     "error" if outcome.irrevocable else "queued", error=error)
    if outcome.done:
        return json_response(None)
    if outcome.irrevocable:
        # Not lost either, but nothing retries it soon: the caller must know.
        retry = call.state.config.leases.irrevocable_retry_interval
        raise RevocationFailed(
            f"revoking {lease.id} failed: {outcome.error}; the lease is irrevocable "
            f"(GET sys/leases/irrevocable), retried every {retry}s, or end it with "
            "sys/leases/revoke-force")
    # Not lost: it stays revoking and is retried with backoff until done or irrevocable.
    # 202 as Vault answers sync=false (vault/logical_system.go, handleRevoke).
    return vault_response(call, {"queued": 1}, warnings=[_queued_warning(lease.id, sync, error)],
                          status=202)


async def _nothing_to_revoke(call: Call, gone: UnknownLease | DeadLease) -> web.Response:
    """The answer to revoking a lease that is unknown or already dead.

    Vault's: 204 (vault/expiration.go, revokeCommon: "If there is no entry,
    nothing to revoke"), and 202 for sync=false (LazyRevoke answers 202 whatever
    it found), so a client that revokes its lease on the way out, after it
    expired, is not handed an error. A dead lease was audited as a reuse attempt
    already. strict=true (extension; the broker's CLI and exec send it) keeps the
    400 that says which.
    """
    if call.flag("strict", False):
        raise gone
    lease_id = call.string("lease_id") or call.request.match_info.get("lease_id", "")
    await call.audit("revoke_request", lease={"id": shown(lease_id)}, outcome="nothing_to_revoke",
                     error=str(gone))
    if not call.flag("sync", True):
        return vault_response(call, {"queued": 0}, status=202)
    return json_response(None)


def _queued_warning(lease_id: str, sync: bool, error: str | None) -> str:
    """What a 202 from ``sys/leases/revoke`` says: queued, and why it is not done yet."""
    if not sync:
        return (f"revocation of {lease_id} queued (sync=false): the lease is revoking and "
                "ends in the background; look it up to follow it")
    if error is None:
        return (f"revocation of {lease_id} queued: the first attempt did not end within "
                f"{REVOKE_WAIT:g}s; it goes on in the background")
    if error.endswith(HELD_FOR_HEALTH):  # its mount is down: no attempt was made
        return f"revocation of {lease_id} queued: {error}"
    return (f"revocation of {lease_id} queued: the first attempt failed ({error}); "
            "it is retried with backoff")


#: What ``sys/leases/lookup`` serves: a lookup (PUT, POST) and the top-level listing
#: (LIST, or GET with ?list=true, as every listing's Allow says).
_LOOKUP_METHODS = ("PUT", "POST", "LIST", "GET")


@routes.route("*", "/v1/sys/leases/lookup")
async def lookup(request: web.Request) -> web.StreamResponse:
    if _is_list(request):
        return await list_leases(request)  # the top level: hvac drops the trailing slash
    if request.method not in ("PUT", "POST"):
        text = None
        if request.method == "GET":  # allowed, but only as a listing
            text = ("sys/leases/lookup looks a lease up with PUT or POST (lease_id in the "
                    "body); LIST it, or GET it with ?list=true, to list lease ids")
        return not_allowed(request, _LOOKUP_METHODS, text)
    call: Call = request[CALL]
    lease = await _lease_for(call, "lookup")
    now = call.state.engine.clock()
    await call.audit("lookup", lease=lease_ref(lease))
    return vault_response(call, {
        "id": lease.id,
        "issue_time": rfc3339(lease.issue_time),
        "expire_time": rfc3339(lease.expire_time),
        "last_renewal": rfc3339(lease.last_renewal),
        "renewable": lease.renewable and lease.state is LeaseState.ACTIVE,
        "ttl": lease.ttl(now),
        # Extensions (Vault clients ignore unknown keys):
        "state": lease.state.value,
        "max_expire_time": rfc3339(lease.max_expire_time),
        "metadata": lease.metadata,
    })


@routes.route("*", "/v1/sys/leases/lookup/{prefix:.*}")
async def list_leases(request: web.Request) -> web.Response:
    call: Call = request[CALL]
    if not _is_list(request):
        raise web.HTTPMethodNotAllowed(request.method, ["LIST", "GET"])
    prefix = request.match_info.get("prefix", "")
    if prefix and not prefix.endswith("/"):
        prefix += "/"  # a LIST always names a folder (hvac drops the trailing slash)
    await call.authenticate()
    await call.read_body()
    await call.require(f"sys/leases/lookup/{prefix}", "list", "sudo")
    limit = limit_param(call.body.get("limit"), LIST_LIMIT)
    after = call.string("after") or ""
    meta = meta_params(request)
    keys = await store_call(_list_level(call, LeaseFilter(prefix=prefix, metadata=meta), limit,
                                        after=after))
    await call.audit("list", prefix=prefix, metadata=meta or None, count=len(keys))
    if not keys:
        # Vault's answer to an empty listing: 404 with no error at all, which a
        # client can tell from an unknown path's 404 ("unsupported path").
        return error_response(404)
    warnings = None
    if len(keys) == limit:  # as LIST auth/token/accessors
        warnings = [f"listing stopped at limit={limit}; there may be more: "
                    f"repeat with after={keys[-1]}"]
    return vault_response(call, {"keys": keys}, warnings=warnings)


def _is_list(request: web.Request) -> bool:
    """A LIST request, or its GET spelling (Vault takes Go's ParseBool spellings;
    hvac's client.list() sends "True")."""
    return request.method == "LIST" or (
        request.method == "GET" and request.query.get("list", "").lower() in {"true", "1", "t"})


async def _list_level(call: Call, flt: LeaseFilter, limit: int, *, after: str = "") -> list[str]:
    """Keys one level below ``prefix`` (``creds/``, ``readonly/``, random parts), those
    sorting after the key ``after`` (the last key of the previous page) only.

    Skip-scans the id index: after seeing ``a/...`` it jumps past every id
    under ``a/``, so listing a mount with 100k leases reads only a few rows.
    """
    store = call.state.store
    prefix = flt.prefix
    keys: list[str] = []
    if after:
        # A folder key ("a/") pages on past every id under it, a lease's past itself.
        after = prefix + after + ("\U0010ffff" if after.endswith("/") else "")
    while len(keys) < limit:
        ids = await store.list_ids(flt, states=LIVE_STATES, limit=256, after=after)
        if not ids:
            break
        for lease_id in ids:
            seg, slash, _ = lease_id[len(prefix):].partition("/")
            if slash:
                keys.append(seg + "/")
                after = f"{prefix}{seg}/\U0010ffff"
                break
            keys.append(seg)
            after = lease_id
            if len(keys) >= limit:
                break
    return keys


def limit_param(value: Any, default: int) -> int:
    """A listing's ``limit`` from a body or query: ``default`` when absent, else 1..2**31-1."""
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise BadRequest("limit must be at least 1")
    if number > _INT_MAX:  # it goes into a SQL LIMIT, a 64-bit integer or less
        raise BadRequest(f"limit must be at most {_INT_MAX}")
    return number


def meta_params(request: web.Request) -> dict[str, str]:
    """The ``meta.KEY=VALUE`` query parameters as a metadata filter.

    A key given twice is a 400: "either value" or "both values" would both be
    plausible readings, and a selector that revokes must not be guessed.
    """
    meta: dict[str, str] = {}
    for name, value in request.query.items():
        if not name.startswith(_META_PARAM):
            continue
        key = name[len(_META_PARAM):]
        if not key:
            raise BadRequest("empty metadata key: use meta.KEY=VALUE")
        if key in meta:
            raise BadRequest(f"metadata key {key!r} given more than once")
        meta[key] = value
    return meta


def _meta_body(value: Any) -> dict[str, str]:
    """The ``metadata`` object of a JSON body: string (or whole number) values only."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadRequest("metadata must be an object, e.g. {\"run_id\": \"1234\"}")
    meta: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise BadRequest(f"metadata value of {key!r} must be a string")
        meta[str(key)] = str(item)
    return meta


async def _require_revoke_by(call: Call, meta: Mapping[str, str], *, force: bool) -> None:
    """Who may revoke-by: ``update``/``sudo`` on ``sys/leases/revoke-by`` (any selector), or
    ``update`` on ``sys/leases/revoke-by/KEY/VALUE`` for one KEY=VALUE of the selector's
    metadata, or on ``sys/leases/revoke-by/K1/V1/K2/V2`` for two of its pairs (in either
    order). ``force`` needs ``sudo`` on ``sys/leases/revoke-by``: it is revoke-force's
    break-glass, which needs ``sudo`` too.

    Every lease the selector matches carries each of its pairs, so authority
    over one pair (or two) covers the whole selector. A CI role whose policy holds
    ``"sys/leases/revoke-by/run_id/{{identity.metadata.run_id}}" = ["update"]``
    can end its own run's leases and no other run's. Two pairs narrow it further:
    ``sys/leases/revoke-by/auth/github/run_id/{{identity.metadata.run_id}}`` needs the
    selector to name the auth method as well, so that another method whose runs are
    numbered the same (a second GitLab instance) cannot be reached through it. A value
    with a "/" never takes the narrow paths (it would span path segments).
    """
    if force:
        await call.require(_REVOKE_BY, "sudo")  # allowed, or audited and refused (403)
        return
    pairs = [f"{key}/{value}" for key, value in meta.items()
             if META_KEY.fullmatch(key) and value and "/" not in value]
    if any(call.allowed(f"{_REVOKE_BY}/{pair}", "update") for pair in pairs):
        return
    # Two pairs: at most _PAIRED_GRANT_PAIRS of them are tried (n x (n-1) paths), so a
    # selector of many pairs cannot make this check expensive.
    if len(pairs) <= _PAIRED_GRANT_PAIRS and any(
        call.allowed(f"{_REVOKE_BY}/{a}/{b}", "update")
        for a, b in itertools.permutations(pairs, 2)
    ):
        return
    await call.require(_REVOKE_BY, "update", "sudo")


async def store_call(aw: Awaitable[T]) -> T:
    """Await a store query whose filter came from the client: a bad key is a 400.

    The stores validate metadata keys (they end up in a JSON path) and raise
    ValueError with a message safe to show.
    """
    try:
        return await aw
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


async def _path_prefix(call: Call, prefix: str) -> str:
    """The lease-id prefix ``prefix`` means, as Vault reads it: whole path segments.

    hvac strips the trailing slash (``revoke_prefix("pg/creds/app/")`` sends
    ``pg/creds/app``), and a bare string prefix then also took role ``app2``'s
    leases. As in Vault, a prefix without a trailing "/" is one lease's exact
    id if such a lease exists (ids end in a fixed-length random part, so it
    matches only that lease), else a path to which "/" is added.
    """
    if not prefix or prefix.endswith("/"):
        return prefix
    if await store_call(call.state.store.get(prefix)) is not None:
        return prefix
    return prefix + "/"


async def _revoke_many(request: web.Request, *, force: bool) -> web.Response:
    _only(request, "PUT", "POST")
    call: Call = request[CALL]
    prefix = request.match_info["prefix"]
    op = "revoke-force" if force else "revoke-prefix"
    await call.authenticate()
    await call.read_body()
    # sudo, as in Vault (both paths are root-protected there): one call ends every
    # lease under the prefix, whoever owns it.
    await call.require(f"sys/leases/{op}/{prefix}", "sudo")
    if not prefix and not call.flag("all", False):
        raise BadRequest(f"an empty prefix would revoke every lease; pass all=true to {op} ''")
    prefix = await _path_prefix(call, prefix)
    flt = LeaseFilter(prefix=prefix)
    queued, already = await _queue_matching(call, flt, force=force)
    await call.audit("admin", action=op, prefix=prefix, queued=queued,
                     already_revoking=already or None)
    left = 0
    if call.flag("sync", False):
        left = await call.state.engine.wait_drained(flt, SYNC_WAIT)
    return vault_response(call, _queued_answer(queued, already, left))


async def _queue_matching(call: Call, flt: LeaseFilter, *, force: bool) -> tuple[int, int]:
    """Queue the live leases ``flt`` matches: (how many this call queued, how many of
    them were already being revoked when it came and were left to that revocation).

    revoke-prefix leaves a lease already revoking as it is (so does force, one already
    forced). Without the second figure a caller's total missed them and its progress
    read done while they were still being revoked (day-2 QA). The store counts it in
    the statement that queues the others: counted apart, before, a lease issued or
    ended in between made it wrong.
    """
    done = await store_call(call.state.engine.revoke_matching(flt, force=force))
    return done.queued, done.already_revoking


def _queued_answer(queued: int, already: int, left: int) -> dict[str, int]:
    """revoke-prefix's (and revoke-by's) data: ``already_revoking`` only when any were."""
    data = {"queued": queued, "still_revoking": left}
    if already:
        data["already_revoking"] = already
    return data


@routes.route("*", "/v1/sys/leases/revoke-prefix/{prefix:.*}")
async def revoke_prefix(request: web.Request) -> web.Response:
    return await _revoke_many(request, force=False)


@routes.route("*", "/v1/sys/leases/revoke-force/{prefix:.*}")
async def revoke_force(request: web.Request) -> web.Response:
    return await _revoke_many(request, force=True)


@routes.route("*", "/v1/sys/leases/revoke-by")
async def revoke_by(request: web.Request) -> web.Response:
    """Revoke every lease whose metadata (and optionally id prefix) matches: one CI run."""
    _only(request, "PUT", "POST")
    call: Call = request[CALL]
    await call.authenticate()
    await call.read_body()
    try:
        meta = _meta_body(call.body.get("metadata"))
        prefix = (call.string("prefix") or "").lstrip("/")
        force = call.flag("force", False)
    except BadRequest:
        # A body the narrow capability cannot judge: only a caller with the
        # broad one gets to hear what is wrong with it; anyone else gets 403.
        await call.require(_REVOKE_BY, "update", "sudo")
        raise
    await _require_revoke_by(call, meta, force=force)
    if not meta and not prefix:
        raise BadRequest("an empty selector would revoke every lease; give metadata "
                         "and/or prefix (use revoke-prefix with all=true for everything)")
    prefix = await _path_prefix(call, prefix)
    flt = LeaseFilter(prefix=prefix, metadata=meta)
    queued, already = await _queue_matching(call, flt, force=force)
    await call.audit("admin", action="revoke-by", prefix=prefix or None, metadata=meta or None,
                     force=force, queued=queued, already_revoking=already or None)
    left = 0
    if call.flag("sync", False):
        left = await call.state.engine.wait_drained(flt, SYNC_WAIT)
    return vault_response(call, _queued_answer(queued, already, left))


@routes.route("*", "/v1/sys/leases/search")
async def search(request: web.Request) -> web.Response:
    """Whole lease rows matching a prefix and/or metadata, paged by id, for operators."""
    _only(request, "GET")
    call: Call = request[CALL]
    await call.authenticate()
    await call.read_body()
    await call.require("sys/leases/search", "read")
    prefix = call.string("prefix") or ""
    meta = meta_params(request)
    limit = min(limit_param(call.body.get("limit"), 100), SEARCH_MAX)
    states = _states(call.string("state"))
    rows = await store_call(call.state.store.list_leases(
        LeaseFilter(prefix=prefix, metadata=meta), states=states, limit=limit,
        after=call.string("after") or ""))
    await call.audit("list", action="search", prefix=prefix or None, metadata=meta or None,
                     count=len(rows))
    return vault_response(call, {
        "leases": [
            {"lease_id": r.id, "mount": r.mount, "role": r.role, "owner": r.owner,
             "state": r.state.value, "issue_time": rfc3339(r.issue_time),
             "expire_time": rfc3339(r.expire_time), "metadata": r.metadata}
            for r in rows],
        # Page on with after=next_after; null when this page was the last.
        "next_after": rows[-1].id if len(rows) == limit else None,
    })


def _states(text: str | None) -> tuple[LeaseState, ...]:
    """``state=active,revoking`` -> the states; empty means every state (tombstones too)."""
    if not text:
        return ()
    try:
        return tuple(LeaseState(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        names = ", ".join(s.value for s in LeaseState)
        raise BadRequest(f"state must be a comma-separated list of: {names}") from None


@routes.route("*", "/v1/sys/leases/irrevocable")
async def irrevocable(request: web.Request) -> web.Response:
    _only(request, "GET")
    call: Call = request[CALL]
    await call.authenticate()
    await call.read_body()
    await call.require("sys/leases/irrevocable", "read")
    prefix = call.string("prefix") or ""
    rows = await call.state.store.list_leases(
        LeaseFilter(prefix=prefix), states=(LeaseState.IRREVOCABLE,),
        limit=limit_param(call.body.get("limit"), 1000), after=call.string("after") or "")
    await call.audit("list", prefix=prefix, state="irrevocable", count=len(rows))
    return vault_response(call, {"leases": [
        {"lease_id": r.id, "mount": r.mount, "role": r.role, "owner": r.owner,
         "revoke_attempts": r.revoke_attempts, "last_error": r.last_error,
         "expire_time": rfc3339(r.expire_time), "username": r.username}
        for r in rows]})


@routes.route("*", "/v1/sys/leases/stats")
async def stats(request: web.Request) -> web.Response:
    _only(request, "GET")
    call: Call = request[CALL]
    await call.authenticate()
    await call.read_body()
    await call.require("sys/leases/stats", "read")
    prefix = call.string("prefix") or ""
    meta = meta_params(request)
    store = call.state.store
    counts: dict[str, int] = {}
    if prefix or meta:
        flt = LeaseFilter(prefix=prefix, metadata=meta)
        for state in LeaseState:
            counts[state.value] = await store_call(store.count_matching(flt, states=(state,)))
    else:
        counts = {s.value: 0 for s in LeaseState} | await store.count_by_state()
    return vault_response(call, counts)
