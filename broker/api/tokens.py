"""``/v1/auth/token/*``: create, look up, renew and revoke tokens (Vault's shapes)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from aiohttp import web

from broker.api.common import (
    CALL,
    Call,
    error_response,
    is_list_request,
    json_response,
    vault_response,
)
from broker.api.leases import limit_param, rfc3339
from broker.durations import format_duration
from broker.errors import BadRequest, BrokerError, PermissionDenied
from broker.lease import Token, TokenState
from broker.state import BrokerState
from broker.store.base import LeaseStore
from broker.tokens import LoginRole, TokenIdTaken, hash_token, with_default_policy

__all__ = [
    "auth_block",
    "lookup_data",
    "orphaned",
    "renewal_limit",
    "revoke_token_tree",
    "routes",
    "token_data",
]

routes = web.RouteTableDef()


def auth_block(token: str, record: Token, now: float | None = None, *,
               ttl: int | None = None) -> dict[str, Any]:
    """Vault's ``auth`` object for a token just created, logged in or renewed.

    ``lease_duration`` is the TTL granted: ``ttl`` (what a renewal gave), else
    the TTL the token was created with. Measuring ``expire_time - now`` after
    the fact reported a 1h token as 3599 s; ``now`` only serves records from
    before the creation TTL was stored.
    """
    if ttl is None:
        ttl = record.creation_ttl
    if ttl is None:
        ttl = int(record.expire_time - now) if record.expire_time and now else 0
    policies = with_default_policy(record.policies)
    return {
        "client_token": token,
        "accessor": record.accessor,
        "policies": policies,
        "token_policies": policies,
        "identity_policies": None,
        "metadata": record.metadata or None,
        "lease_duration": max(ttl, 0),
        "renewable": record.renewable,
        "entity_id": "",
        "token_type": "service",
        "orphan": record.parent is None,
        "num_uses": record.num_uses,  # as Vault's auth block: uses left, 0 no limit
    }


def token_data(record: Token, now: float, *, token_id: str = "",
               orphan: bool | None = None, parent_expire: float | None = None,
               explicit_max_ttl: int | None = None) -> dict[str, Any]:
    """Vault's lookup ``data`` for ``record``, plus ``max_expire_time`` (an extension).

    ``token_id``: the token itself, shown as ``id`` as Vault does. Tokens are
    stored only as hashes, so only a caller that presented the token (lookup-self,
    lookup) can be answered with it; lookup-accessor leaves it empty, as in Vault.
    The audit log never sees it: lookups audit the accessor, not the answer.
    ``orphan``: what :func:`orphaned` found (else: the token has no parent).
    ``parent_expire``: the live parent's expiry, which holds back the token's
    renewals (:func:`lookup_data` finds it). ``explicit_max_ttl``: what to show
    instead of the token's own cap (a JWT login's: :func:`_login_explicit_max_ttl`).
    A periodic token's answer has ``period`` (seconds), as Vault's; others have none.
    """
    ttl = int(record.expire_time - now) if record.expire_time else 0
    creation_ttl = record.creation_ttl
    if creation_ttl is None:  # a row from before the store kept it
        creation_ttl = int(record.expire_time - record.created) if record.expire_time else 0
    if explicit_max_ttl is None:
        # The token's own cap (the one asked for, within [tokens] max_ttl), never
        # its parent's expiry: a child's cap used to be cut to it at creation and
        # showed the parent's. The parent still bounds ttl and expire_time.
        explicit_max_ttl = round(record.max_expire_time - record.created) \
            if record.max_expire_time else 0
    data: dict[str, Any] = {
        "accessor": record.accessor,
        "creation_time": int(record.created),
        "creation_ttl": creation_ttl,
        "display_name": record.display_name,
        "entity_id": "",  # no identity store: as a Vault token without an entity
        "expire_time": rfc3339(record.expire_time),
        "explicit_max_ttl": explicit_max_ttl,
        "id": token_id,
        "issue_time": rfc3339(record.created),
        # Extension: the latest a renewal can take the token to now, which no Vault
        # field shows (explicit_max_ttl is not it for a child, nor a JWT login's).
        "max_expire_time": rfc3339(renewal_limit(record, parent_expire)),
        "meta": record.metadata or None,
        # Uses left after this request's (0: no limit; -1: this was the last), as Vault.
        "num_uses": record.num_uses,
        "orphan": record.parent is None if orphan is None else orphan,
        "path": record.path or "auth/token/create",  # a login's: auth/NAME/login
        # As Vault: "default" is listed (a row stored before it was is shown with it).
        "policies": with_default_policy(record.policies),
        "renewable": record.renewable,
        "ttl": max(ttl, 0),
        "type": "service",
    }
    if record.period:
        # As Vault: only a periodic token's lookup has it (seconds).
        data["period"] = record.period
    return data


async def orphaned(store: LeaseStore, record: Token) -> bool:
    """Whether ``record`` has no live parent: it was created without one, or its
    parent was revoked by ``revoke-orphan`` (any other end of a parent ends its
    children too: revocation cascades, and a child never outlives its parent)."""
    return await _live_parent(store, record) is None


async def _live_parent(store: LeaseStore, record: Token) -> Token | None:
    """``record``'s parent while it is active (it then bounds the token), else None."""
    if record.parent is None:
        return None
    parent = await store.token_by_accessor(record.parent)
    return parent if parent is not None and parent.state is TokenState.ACTIVE else None


def renewal_limit(record: Token, parent_expire: float | None) -> float | None:
    """The latest a renewal can take ``record`` to now; None: no limit.

    The limits ``TokenManager.renew`` holds a renewal to: the token's own max
    expiry and its live parent's current expiry (the parent's end ends the
    child). The parent's moves when the parent is renewed, and so does this.
    """
    limits = [t for t in (record.max_expire_time, parent_expire) if t is not None]
    return min(limits) if limits else None


async def lookup_data(state: BrokerState, record: Token, now: float, *,
                      token_id: str = "") -> dict[str, Any]:
    """:func:`token_data` for a lookup: with what the store and the config add (whether
    the token is an orphan, its parent's expiry, a JWT login's explicit max TTL)."""
    parent = await _live_parent(state.store, record)
    return token_data(record, now, token_id=token_id, orphan=parent is None,
                      parent_expire=parent.expire_time if parent is not None else None,
                      explicit_max_ttl=_login_explicit_max_ttl(state, record))


def _login_explicit_max_ttl(state: BrokerState, record: Token) -> int | None:
    """What Vault shows as a JWT login token's ``explicit_max_ttl``: its role's
    ``token_explicit_max_ttl``, 0 if unset. None: not a login's token, or its
    role is gone or changed since the login; the token's own cap is shown then.

    The token keeps one cap, the smaller of the role's ``token_max_ttl`` and
    ``token_explicit_max_ttl`` (enforced as before); which one it was is not
    stored. While the role still gives that cap, it is the role's values the
    token was created with, and its ``token_explicit_max_ttl`` is Vault's answer.
    """
    name = _login_method(record.path)
    if name is None or record.max_expire_time is None:
        return None
    # Here, not at the top: broker.api.login imports this module (auth_block).
    from broker.api.login import auth_methods

    method = auth_methods(state).get(name)
    role = method.config.roles.get(record.metadata.get("role", "")) if method else None
    if role is None or role.token_cap != round(record.max_expire_time - record.created):
        return None
    return role.token_explicit_max_ttl or 0


def _login_method(path: str) -> str | None:
    """NAME of a login token's path (``auth/NAME/login``), else None."""
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "auth" and parts[2] == "login" and parts[1]:
        return parts[1]
    return None


async def revoke_token_tree(state: BrokerState, accessor: str, *,
                            children: bool = True) -> tuple[int, int]:
    """Revoke a token, its children and every lease they own. Returns (tokens, leases).

    ``children=False``: the token and its leases only (revoke-orphan; and a token
    already revoked, whose live children, if any, revoke-orphan left alive).
    """
    accessors = await state.tokens.descendants(accessor) if children else [accessor]
    return await state.engine.end_tokens(accessors, state=TokenState.REVOKED)


# -- input checks --------------------------------------------------------------
def _check_text(value: str, name: str) -> None:
    """400 for a string that is not Unicode text (a lone surrogate, which a JSON
    body can spell as ``"\\ud800"``): no token holds one and the stores cannot."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise BadRequest(f"{name} is not valid Unicode text (it holds a lone surrogate)") from None


def _text(call: Call, name: str) -> str | None:
    value = call.string(name)
    if value is not None:
        _check_text(value, name)
    return value


def _required_text(call: Call, name: str) -> str:
    """``name`` from the body; 400 if it is missing, empty or not text."""
    value = call.string(name, required=True) or ""
    _check_text(value, name)
    return value


def _strings(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        raise BadRequest(f"{name} must be a list of strings")
    for item in items:
        _check_text(item, name)
    return items


def _meta(call: Call) -> dict[str, str]:
    """``meta`` as the token's metadata: an object whose values are strings.

    Vault decodes it weakly (mapstructure.WeakDecode into map[string]string), so
    a number becomes its JSON text (``42`` -> ``"42"``) and a boolean ``"1"`` or
    ``"0"``; the same here, so ``meta={"run": 42}`` works as it does there.
    A nested object, a list or null has no such form: 400 naming the key.
    """
    meta = call.body.get("meta")
    if meta is None:
        return {}
    # Not "or {}": a list, a string or a number is a mistake to report, not "no metadata".
    if not isinstance(meta, dict):
        raise BadRequest(f"meta must be an object of string values, not {_json_type(meta)}")
    out: dict[str, str] = {}
    for key, value in meta.items():
        _check_text(key, "meta")
        out[key] = _meta_value(key, value)
    return out


def _meta_value(key: str, value: Any) -> str:
    """One ``meta`` value as text, as Vault's weak decoding makes it (see :func:`_meta`)."""
    if isinstance(value, str):
        _check_text(value, "meta")
        return value
    if isinstance(value, bool):  # before int: a bool is an int in Python
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Vault keeps a number's JSON text (it decodes with UseNumber); the body
        # parser here kept the value only, and repr gives that text back for the
        # usual spellings (1.5, 42.0). NaN and Infinity never get here: not JSON.
        return repr(value)
    # The key, not the value, in the message: a value may be a secret.
    raise BadRequest(f"meta {key!r} must be a string, number or boolean, "
                     f"not {_json_type(value)}")


def _json_type(value: Any) -> str:
    """What a JSON value is, for an error message (never the value: it may be a secret)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "a string" if isinstance(value, str) else "null"


def _whole_number(call: Call, name: str) -> int | None:
    """``name`` as an integer (a JSON number or its decimal text, as Vault takes it)."""
    value = call.body.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii():  # int() takes other scripts' digits too
        try:
            return int(value)
        except ValueError:  # not a number, or thousands of digits
            pass
    raise BadRequest(f"{name} must be a whole number, not {_json_type(value)}")


#: The largest ``num_uses`` (Vault's is an int64; so are both stores' columns).
MAX_NUM_USES = 2**63 - 1


def _num_uses(call: Call, caller: Token) -> int:
    """The new token's use limit (``num_uses``; 0 or absent: none), as Vault reads it.

    A caller with a use limit of its own cannot create tokens at all (Vault's
    "restricted use token cannot generate child tokens"): a child, or an orphan,
    would let it escape its count.
    """
    if caller.num_uses:
        raise BadRequest("restricted use token cannot generate child tokens: a token with "
                         "num_uses cannot create tokens (use one without a use limit)")
    num_uses = _whole_number(call, "num_uses") or 0
    if num_uses < 0:
        raise BadRequest("num_uses must not be negative")
    if num_uses > MAX_NUM_USES:
        raise BadRequest(f"num_uses must be at most {MAX_NUM_USES}")
    return num_uses


def _refuse_unsupported(call: Call) -> None:
    """400 for token features the broker does not have, rather than ignoring them:
    a batch token that behaves as a service token is worse than an error. A value of
    the wrong type says so first: "not supported" would send the caller the wrong way."""
    if _text(call, "type") not in (None, "service"):
        raise BadRequest("type is not supported: only 'service' tokens exist (omit type)")
    # The policy engine adds "default" to every token when it evaluates: a token
    # claiming to lack it would still have it.
    if call.flag("no_default_policy", False):
        raise BadRequest("no_default_policy is not supported: every token carries the built-in "
                         "'default' policy (omit it or send false)")
    if _text(call, "entity_alias") is not None:
        raise BadRequest("entity_alias is not supported: there are no identity entities "
                         "or aliases (omit it)")


def _lifetime(call: Call, policies: list[str]) -> tuple[int | None, int | None, list[str]]:
    """The new token's TTL and max TTL in seconds, and warnings for what was capped.

    As in Vault, ``[tokens] max_ttl`` (the system max TTL) bounds every token:
    a longer ``ttl`` or ``explicit_max_ttl`` is capped (and said so), no ``ttl``
    (or 0) means the ceiling, and renewals stop at creation + ceiling. Only a
    token with the root policy created without a ttl never expires (with an
    explicit_max_ttl alone, it lives that long).
    """
    ceiling = call.state.config.tokens.max_ttl
    warnings: list[str] = []

    def capped(name: str, value: int | None) -> int | None:
        if value is not None and value > ceiling:
            warnings.append(f"{name} {format_duration(value)} is longer than the token max TTL "
                            f"([tokens] max_ttl); capped at {format_duration(ceiling)}")
            return ceiling
        return value

    ttl = capped("ttl", call.duration("ttl") or None)  # 0 is Vault's "the default"
    explicit = capped("explicit_max_ttl", call.duration("explicit_max_ttl") or None)
    if ttl is None and "root" in policies:
        return None, explicit, warnings
    return ttl or ceiling, explicit or ceiling, warnings


def _periodic_lifetime(call: Call, period: int) -> tuple[int, int | None, list[str]]:
    """A periodic token's period and explicit max TTL in seconds, and warnings.

    As Vault's ``CalculateTTL``: the period is capped at ``[tokens] max_ttl`` (the
    system max TTL) and at ``explicit_max_ttl``, but the token's life is not: renewed
    in time, it lives on, until its ``explicit_max_ttl`` if it has one (which
    ``[tokens] max_ttl`` does not cap either). A ``ttl`` is not used: the period is
    the TTL, at creation and at every renewal.
    """
    ceiling = call.state.config.tokens.max_ttl
    explicit = call.duration("explicit_max_ttl") or None
    warnings: list[str] = []
    for limit, what in ((ceiling, "[tokens] max_ttl"), (explicit, "explicit_max_ttl")):
        if limit and period > limit:
            warnings.append(f'period of "{format_duration(period)}" exceeded the effective '
                            f'max_ttl of "{format_duration(limit)}"; period value is capped '
                            f"accordingly (the limit is {what})")
            period = limit
    if call.duration("ttl"):
        warnings.append("ttl is not used for a periodic token: its TTL is its period, "
                        "at creation and at every renewal")
    return period, explicit, warnings


async def _period(call: Call, caller: Token) -> int:
    """The new token's ``period`` in seconds (0 or absent: not periodic).

    As in Vault, only a root token or ``sudo`` on the path (``auth/token/create``
    or ``create-orphan``) may create a periodic token, and anyone else gets
    Vault's 400: a periodic token has no max TTL, so a token allowed to create
    children could otherwise mint one that outlives every limit set on it.
    """
    period = call.duration("period") or 0
    if period and not (caller.is_root or call.allowed(call.path, "sudo")):
        message = (f"root or sudo privileges required to create periodic token: period "
                   f"needs a root token or sudo on {call.path}")
        await call.audit("policy_denied", outcome="denied", error=message)
        raise BadRequest(message)
    return period


# -- who may give what ------------------------------------------------------------
async def _deny(call: Call, message: str) -> NoReturn:
    await call.audit("policy_denied", outcome="denied", error=message)
    raise PermissionDenied(message)


async def _policies(call: Call, caller: Token) -> list[str]:
    policies = _strings(call.body.get("policies"), "policies") or list(caller.policies)
    if caller.is_root:
        return policies
    extra = set(policies) - set(caller.policies) - {"default"}
    if extra:
        await _deny(call, "permission denied: a token can only give policies it has; "
                          f"not {sorted(extra)}")
    if "root" in policies:
        await _deny(call, "permission denied: only a root token can create root tokens")
    return policies


async def _identity(call: Call, caller: Token) -> tuple[dict[str, str], str]:
    """The new token's metadata and display name.

    Policies resolve ``{{identity.metadata.KEY}}`` and ``{{identity.display_name}}``
    from these, and leases copy them, so a non-root caller passes on its own:
    were a CI run's token (repository_owner=acme, run_id=111) free to mint a
    child with other values, the child would reach another owner's paths or
    revoke another run's leases. A ``meta`` that only repeats the caller's pairs,
    and a display name equal to the caller's, are accepted; "token", hvac's and
    our default, counts as none given.
    """
    meta = _meta(call)
    display_name = _text(call, "display_name")
    if caller.is_root:
        return meta, display_name or "token"
    differ = sorted(k for k, v in meta.items() if caller.metadata.get(k) != v)
    if differ:
        await _deny(call, "permission denied: only a root token can set token metadata; "
                          f"a new token inherits its creator's, and meta {differ} differs")
    if display_name not in (None, "token", caller.display_name):
        await _deny(call, "permission denied: only a root token can set a token's display_name; "
                          "a new token inherits its creator's")
    return dict(caller.metadata), caller.display_name


async def _orphan(call: Call, caller: Token) -> bool:
    """Whether the new token has no parent (so revoking the caller leaves it alive).

    As in Vault: through ``auth/token/create-orphan`` the policy on that path is
    the gate; ``no_parent`` on ``auth/token/create`` needs a root token or sudo
    on that path, else any token that may create children could shed the
    cascade that revoking it triggers.
    """
    if call.path == "auth/token/create-orphan":
        return True
    if not call.flag("no_parent", False):
        return False
    if not (caller.is_root or call.allowed(call.path, "sudo")):
        await _deny(call, "permission denied: no_parent needs a root token or sudo on "
                          "auth/token/create; use auth/token/create-orphan")
    return True


async def _chosen_id(call: Call, caller: Token) -> str | None:
    """The value the caller chose for the new token (``id``), if any.

    As in Vault, only a root token or sudo on the path may choose it: a
    chosen value is only as strong as whoever picked it, and the 400 for a
    value in use tells the caller that some token has it. The value is a
    secret: no message here or in ``check_token_id`` repeats it.
    """
    token_id = _text(call, "id")
    if token_id is None:
        return None
    if not (caller.is_root or call.allowed(call.path, "sudo")):
        await _deny(call, f"permission denied: id (choosing the token's value) needs a root "
                          f"token or sudo on {call.path}")
    return token_id


# -- handlers ---------------------------------------------------------------------
async def _authorized(request: web.Request, *capabilities: str,
                      body: bool = True) -> tuple[Call, Token]:
    """The call and the caller's token, once one of ``capabilities`` on the path
    asked for is granted. In that order: the ``request`` audit line and the token
    (403 if bad), the body (400 if not JSON), the policy check (403, audited)."""
    call: Call = request[CALL]
    caller = await call.authenticate()
    if body:
        await call.read_body()
    await call.require(call.path, *capabilities)
    return call, caller


# PUT everywhere POST is taken: Vault maps both to its update operation, and
# `vault write auth/token/create ...` sends PUT.
@routes.post("/v1/auth/token/create")
@routes.put("/v1/auth/token/create")
@routes.post("/v1/auth/token/create-orphan")
@routes.put("/v1/auth/token/create-orphan")
async def create(request: web.Request) -> web.Response:
    call, caller = await _authorized(request, "update", "create", "sudo")
    num_uses = _num_uses(call, caller)
    _refuse_unsupported(call)
    policies = await _policies(call, caller)
    metadata, display_name = await _identity(call, caller)
    orphan = await _orphan(call, caller)
    token_id = await _chosen_id(call, caller)
    period = await _period(call, caller)
    if period:
        ttl = None
        period, max_ttl, warnings = _periodic_lifetime(call, period)
    else:
        ttl, max_ttl, warnings = _lifetime(call, policies)
    try:
        token, record = await call.state.tokens.create(
            policies=policies,
            ttl=ttl,
            max_ttl=max_ttl,
            display_name=display_name,
            metadata=metadata,
            parent=None if orphan else caller,
            renewable=call.flag("renewable", True),
            token_id=token_id,
            num_uses=num_uses,
            period=period,
        )
    except TokenIdTaken as exc:
        # Audited: a sudo holder probing for the values of other tokens shows up here.
        await call.audit("token_create", outcome="error", error=str(exc))
        raise
    # Only a ttl the caller asked for: without one, ttl is [tokens] max_ttl. A
    # periodic token's TTL is its period.
    asked = period or (ttl if call.duration("ttl") else None)
    warnings += _parent_cap_warning(record, asked, caller if not orphan else None)
    await call.audit("token_create", created={"accessor": record.accessor,
                                              "policies": record.policies,
                                              "client_token": token})
    return _auth_response(call, auth_block(token, record), warnings)


def _parent_cap_warning(record: Token, ttl: int | None, parent: Token | None) -> list[str]:
    """Say so when the parent's expiry, not the ``ttl`` asked for, set the new token's.

    A child never outlives its parent (``TokenManager.create``); the answer's
    ``lease_duration`` shows the shorter TTL, and the warning says why, as the
    ``[tokens] max_ttl`` cap does.
    """
    if (parent is None or parent.expire_time is None or ttl is None
            or record.expire_time is None or record.expire_time < parent.expire_time
            or record.expire_time >= record.created + ttl):
        return []
    # What the answer's lease_duration says, so the two agree.
    left = record.creation_ttl or max(0, round(record.expire_time - record.created))
    return [f"ttl {format_duration(ttl)} is longer than the parent token has left; capped at "
            f"{format_duration(left)}: a child token never outlives its parent"]


def _auth_response(call: Call, auth: dict[str, Any],
                   warnings: list[str] | None = None) -> web.Response:
    return vault_response(call, None, auth=auth, warnings=warnings)


def live_token(record: Token | None, now: float) -> Token | None:
    """``record`` if that token can still be used: not ended, not past its expiry
    (which the sweeper may not have recorded yet), not used up (num_uses)."""
    if record is None or record.state is not TokenState.ACTIVE or record.num_uses < 0:
        return None
    if record.expire_time is not None and record.expire_time <= now:
        return None
    return record


@routes.get("/v1/auth/token/lookup-self")
@routes.post("/v1/auth/token/lookup-self")
@routes.put("/v1/auth/token/lookup-self")
async def lookup_self(request: web.Request) -> web.Response:
    call, token = await _authorized(request, "read", "update", body=False)
    await call.audit("token_lookup")
    return vault_response(call, await lookup_data(call.state, token, call.state.engine.clock(),
                                                  token_id=call.presented_token()))


@routes.post("/v1/auth/token/lookup")
@routes.put("/v1/auth/token/lookup")
async def lookup(request: web.Request) -> web.Response:
    # Vault answers 403 for an unknown or dead token...
    return await _lookup_other(request, "token", lambda store, v: store.token_by_hash(
        hash_token(v)), PermissionDenied("bad token"))


@routes.post("/v1/auth/token/lookup-accessor")
@routes.put("/v1/auth/token/lookup-accessor")
async def lookup_accessor(request: web.Request) -> web.Response:
    # ... and 400 for an unknown or dead accessor.
    return await _lookup_other(request, "accessor", lambda store, v: store.token_by_accessor(
        v), BadRequest("invalid accessor"))


async def _lookup_other(request: web.Request, field: str,
                        find: Callable[[LeaseStore, str], Awaitable[Token | None]],
                        missing: BrokerError) -> web.Response:
    """Another token's data, named by ``field`` of the body (its value or accessor).

    Named by its value, the answer's ``id`` is that value (the caller has it);
    named by its accessor, ``id`` stays empty: an accessor must never lead to the token.
    """
    call, _ = await _authorized(request, "update", "sudo")
    value = _required_text(call, field)
    now = call.state.engine.clock()
    other = live_token(await find(call.state.store, value), now)
    if other is None:
        raise missing
    await call.audit("token_lookup", target=other.accessor)
    token_id = value if field == "token" else ""
    return vault_response(call, await lookup_data(call.state, other, now, token_id=token_id))


#: ``LIST auth/token/accessors`` answers at most this many unless ``limit`` says otherwise.
ACCESSORS_LIMIT = 10_000


@routes.route("*", "/v1/auth/token/accessors")
async def list_accessors(request: web.Request) -> web.Response:
    """Vault's ``LIST auth/token/accessors`` (hvac's ``list_accessors``): the accessors
    of every live token, sorted.

    ``sudo`` on the path, as in Vault, where it is root-protected: with these, a
    caller holding revoke-accessor can end every token. Extension: ``limit``
    (default 10,000) and ``after`` (the last key of the previous answer) page
    through a large store instead of loading every token at once.
    """
    if request.method not in ("GET", "LIST"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "LIST"])
    call: Call = request[CALL]
    await call.authenticate()
    if not is_list_request(request):
        # As Vault (after the token check): a plain read of the folder is no operation.
        response = error_response(405, "auth/token/accessors is a listing: send LIST, "
                                       "or GET with ?list=true")
        response.headers["Allow"] = "GET,LIST"
        return response
    await call.read_body()
    # Vault checks a LIST on the path with a trailing slash; a grant on either will do.
    if not call.allowed("auth/token/accessors/", "sudo"):
        await call.require("auth/token/accessors", "sudo")
    limit = limit_param(call.body.get("limit"), ACCESSORS_LIMIT)  # as the lease listings
    after = _text(call, "after") or ""
    keys = await call.state.store.live_token_accessors(
        now=call.state.engine.clock(), limit=limit, after=after)
    await call.audit("list", count=len(keys))
    if not keys:
        return error_response(404)  # Vault's bare 404 for an empty listing
    warnings = None
    if len(keys) == limit:
        warnings = [f"listing stopped at limit={limit}; there may be more: "
                    f"repeat with after={keys[-1]}"]
    return vault_response(call, {"keys": keys}, warnings=warnings)


async def _renew(call: Call, token: Token, increment: int | None,
                 warnings: list[str]) -> tuple[Token, int]:
    """``tokens.renew`` under the limits the running config sets now (a reload may have
    lowered them since the token was made): ``[tokens] max_ttl``, and for a login's
    token its role's (Vault's auth methods re-read the role at every renewal)."""
    return await call.state.tokens.renew(
        token, increment, warnings=warnings,
        system_max_ttl=call.state.config.tokens.max_ttl, role=_login_role(call, token))


def _login_role(call: Call, token: Token) -> LoginRole | None:
    """The role of a JWT login's token (``path`` auth/NAME/login, its ``role`` metadata)
    as the running config has it; None for other tokens. A role or auth method gone
    since the login is a 400, as in Vault: removing a role stops its tokens' renewals."""
    method_name = _login_method(token.path)
    if method_name is None:
        return None
    from broker.api.login import auth_methods  # (see _login_explicit_max_ttl)

    role_name = token.metadata.get("role", "")
    method = auth_methods(call.state).get(method_name)
    role = method.config.roles.get(role_name) if method is not None else None
    if role is None:
        raise BadRequest(f"token cannot be renewed: role {role_name!r} of auth method "
                         f"{method_name!r} no longer exists (a login's token renews under "
                         "its role as configured now)")
    return LoginRole(label=f"JWT role {role_name!r} of auth/{method_name}",
                     period=role.token_period, cap=role.token_cap)


@routes.post("/v1/auth/token/renew-self")
@routes.put("/v1/auth/token/renew-self")
async def renew_self(request: web.Request) -> web.Response:
    call, token = await _authorized(request, "update")
    warnings: list[str] = []
    token, granted = await _renew(call, token, call.duration("increment"), warnings)
    await call.audit("token_renew", expire_time=rfc3339(token.expire_time))
    # The caller's own token: Vault's renew answer carries it, and it tells the caller nothing new.
    return _auth_response(call, auth_block(call.presented_token(), token, ttl=granted),
                          warnings)


@routes.post("/v1/auth/token/renew")
@routes.put("/v1/auth/token/renew")
async def renew(request: web.Request) -> web.Response:
    call, _ = await _authorized(request, "update")
    value = _required_text(call, "token")
    increment = call.duration("increment")
    other = live_token(await call.state.store.token_by_hash(hash_token(value)),
                  call.state.engine.clock())
    if other is None:
        raise BadRequest("token not found")  # Vault's answer (400)
    warnings: list[str] = []
    other, granted = await _renew(call, other, increment, warnings)
    await call.audit("token_renew", target=other.accessor,
                     expire_time=rfc3339(other.expire_time))
    return _auth_response(call, auth_block(value, other, ttl=granted), warnings)


@routes.post("/v1/auth/token/renew-accessor")
@routes.put("/v1/auth/token/renew-accessor")
async def renew_accessor(request: web.Request) -> web.Response:
    """Renew another token named by its accessor (Vault's path; ``update`` on it).

    The answer's ``client_token`` is empty, as in Vault: whoever holds an
    accessor may manage the token, never learn it (nor can the broker: it
    keeps only a hash).
    """
    call, _ = await _authorized(request, "update")
    accessor = _required_text(call, "accessor")
    increment = call.duration("increment")
    other = live_token(await call.state.store.token_by_accessor(accessor),
                       call.state.engine.clock())
    if other is None:
        raise BadRequest("invalid accessor")  # as lookup-accessor
    warnings: list[str] = []
    other, granted = await _renew(call, other, increment, warnings)
    await call.audit("token_renew", target=other.accessor,
                     expire_time=rfc3339(other.expire_time))
    return _auth_response(call, auth_block("", other, ttl=granted), warnings)


@routes.post("/v1/auth/token/revoke-self")
@routes.put("/v1/auth/token/revoke-self")
async def revoke_self(request: web.Request) -> web.Response:
    call, token = await _authorized(request, "update", body=False)
    tokens, leases = await revoke_token_tree(call.state, token.accessor)
    await call.audit("token_revoke", target=token.accessor, tokens=tokens, leases_queued=leases)
    return json_response(None)


@routes.post("/v1/auth/token/revoke")
@routes.put("/v1/auth/token/revoke")
async def revoke(request: web.Request) -> web.Response:
    call, caller = await _authorized(request, "update", "sudo")
    value = _required_text(call, "token")
    # An unknown token is a no-op (204), as in Vault.
    other = await call.state.store.token_by_hash(hash_token(value))
    if other is not None:
        await _guard_root(call, caller, other)
        tokens, leases = await revoke_token_tree(call.state, other.accessor,
                                                 children=not _already_revoked(other))
        await call.audit("token_revoke", target=other.accessor, tokens=tokens,
                         leases_queued=leases)
    return json_response(None)


def _already_revoked(record: Token) -> bool:
    """A revoked token's children went with it, except those revoke-orphan left
    alive, which must stay so: revoking the token again must not reach them (in
    Vault the token is gone by then, and a revoke reaches nothing)."""
    return record.state is TokenState.REVOKED


async def _guard_root(call: Call, caller: Token, target: Token) -> None:
    """403 unless the caller may revoke ``target`` when it carries the ``root`` policy:
    that needs ``sudo`` on the path used (a root token has it everywhere).

    ``update`` on revoke-accessor (the example operator policy's grant, for ending
    a CI run's token) otherwise reached ``root-init``, a well-known accessor, and
    with it every token made from it and every lease they own. Vault does not
    guard this. Revoking one's own root token stays open (revoke-self, or naming
    it here), as does revoking any token without ``root``: only a root token can
    create a root token, and it becomes that token's parent, so a token without
    ``root`` never has one below it and its revocation never reaches one.
    """
    if not target.is_root or target.accessor == caller.accessor:
        return
    if caller.is_root or call.allowed(call.path, "sudo"):
        return
    # The reason is for the operators (the audit line); the caller gets Vault's plain
    # "permission denied": saying why would tell whoever holds update on revoke-accessor
    # which accessors belong to root tokens (a probe of each accessor they know).
    reason = (f"permission denied: the token to revoke has the root policy; revoking it "
              f"would end every token and lease below it, which needs a root token or "
              f"sudo on {call.path}")
    await call.audit("policy_denied", outcome="denied", checked_path=call.path,
                     capabilities=["sudo"], target=target.accessor, error=reason)
    raise PermissionDenied("permission denied")


@routes.post("/v1/auth/token/revoke-orphan")
@routes.put("/v1/auth/token/revoke-orphan")
async def revoke_orphan(request: web.Request) -> web.Response:
    """Revoke a token and its leases but not its children, which live on as orphans.

    ``sudo`` on the path, as in Vault (root-protected there; ``update`` is not
    enough). A child keeps the expiry it was given, which a child never sets
    past its parent's anyway. Nothing needs rewriting for the children to be
    orphans: a revocation above their parent follows only active tokens, so it
    stops at it; revoking the parent again does not walk its children
    (:func:`_already_revoked`); and lookups show them ``orphan: true``
    (:func:`orphaned`).
    """
    call, caller = await _authorized(request, "sudo")
    value = _required_text(call, "token")
    other = live_token(await call.state.store.token_by_hash(hash_token(value)),
                       call.state.engine.clock())
    if other is None:
        # Unlike revoke's no-op, Vault answers this one with a 400.
        raise BadRequest("token to revoke not found")
    # Already sudo on this path, so this passes today; it stays should the path's
    # own requirement ever be relaxed.
    await _guard_root(call, caller, other)
    tokens, leases = await revoke_token_tree(call.state, other.accessor, children=False)
    await call.audit("token_revoke", target=other.accessor, tokens=tokens,
                     leases_queued=leases, orphan_children=True)
    return json_response(None)


@routes.post("/v1/auth/token/revoke-accessor")
@routes.put("/v1/auth/token/revoke-accessor")
async def revoke_accessor(request: web.Request) -> web.Response:
    call, caller = await _authorized(request, "update", "sudo")
    accessor = _required_text(call, "accessor")
    other = await call.state.store.token_by_accessor(accessor)
    if other is None:
        raise BadRequest("no token with that accessor")  # 400, as Vault's "invalid accessor"
    await _guard_root(call, caller, other)
    tokens, leases = await revoke_token_tree(call.state, accessor,
                                             children=not _already_revoked(other))
    await call.audit("token_revoke", target=accessor, tokens=tokens, leases_queued=leases)
    return json_response(None)
