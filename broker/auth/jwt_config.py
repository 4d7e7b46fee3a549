"""``[auth.jwt.NAME]`` and ``[auth.jwt.NAME.roles.ROLE]``: parsed and checked at load time.

Everything that can be wrong in the config is caught here, so a login never
fails because of a typo the operator could have been told about at start-up.
Errors carry the dotted key below ``auth`` (``jwt.github.roles.deploy.bound_audiences``);
the config loader prefixes it with ``auth.`` and the file name.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.durations import parse_duration
from broker.lease import META_KEY

__all__ = [
    "ALLOWED_ALGORITHMS",
    "RESERVED_METADATA",
    "AuthConfigError",
    "JWTMethodConfig",
    "JWTRoleConfig",
    "PublicKey",
    "check_fetch_url",
    "parse_jwt_methods",
]

#: Asymmetric algorithms only. HS* would let anyone who knows the public key
#: (everyone) forge tokens if a key were ever used as an HMAC secret; ``none``
#: is no signature at all. Both are refused before any verification.
ALLOWED_ALGORITHMS: tuple[str, ...] = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")

#: metadata keys the login itself sets; a claim mapping may not overwrite them.
RESERVED_METADATA = frozenset({"role", "auth"})

#: auth paths the broker already uses.
_RESERVED_NAMES = frozenset({"token"})

#: every key of ``[auth.jwt.NAME]`` (``leeway``: the older name of clock_skew_leeway).
_METHOD_KEYS = frozenset({
    "jwks_url", "oidc_discovery_url", "jwt_validation_pubkeys", "bound_issuer",
    "jwt_supported_algs", "clock_skew_leeway", "leeway", "jwks_cache_ttl", "jwks_max_stale",
    "fetch_timeout", "jwks_ca_pem", "roles",
})
#: every key of ``[auth.jwt.NAME.roles.ROLE]``.
_ROLE_KEYS = frozenset({
    "bound_audiences", "bound_subject", "bound_claims", "bound_claims_type", "user_claim",
    "claim_mappings", "token_policies", "token_ttl", "token_max_ttl", "token_explicit_max_ttl",
    "token_num_uses", "token_period", "single_use",
})
#: what a role must bind (one at least): Vault's JWT roles need one bound constraint.
_ROLE_BOUNDS = ("bound_audiences", "bound_subject", "bound_claims")

_MIN_RSA_BITS = 2048

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class AuthConfigError(Exception):
    """``key`` is dotted below ``auth`` (``jwt.NAME.roles.ROLE.KEY``); one-line ``message``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class JWTRoleConfig:
    """What a token must look like to log in as this role, and what it gets."""

    name: str
    bound_audiences: tuple[str, ...] = ()
    bound_subject: str | None = None
    #: claim (or JSON pointer ``/a/b``) -> accepted values; any one matches.
    bound_claims: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    bound_claims_type: str = "glob"
    user_claim: str = "sub"
    #: claim -> metadata key.
    claim_mappings: Mapping[str, str] = field(default_factory=dict)
    token_policies: tuple[str, ...] = ()
    #: 0 for a periodic role (its tokens' TTL is token_period).
    token_ttl: int = 3600
    #: renewals never go past this (from login time); None: no cap (a periodic role's).
    token_max_ttl: int | None = 86400
    token_explicit_max_ttl: int | None = None
    #: requests a login's token may make (Vault's token_num_uses); 0: no limit.
    token_num_uses: int = 0
    #: a login's token is periodic (Vault's token_period, seconds): its TTL is this and
    #: every renewal sets it back; no cap but token_explicit_max_ttl. 0: not periodic.
    token_period: int = 0
    #: each JWT (by its ``jti``) logs in once: a replay of a leaked CI token is refused.
    single_use: bool = False

    @property
    def token_cap(self) -> int | None:
        """The hard limit on the token's life: the smaller of max and explicit max TTL."""
        caps = [c for c in (self.token_max_ttl, self.token_explicit_max_ttl) if c]
        return min(caps) if caps else None


@dataclass(frozen=True)
class JWTMethodConfig:
    """One JWT/OIDC auth method, mounted at ``auth/NAME``."""

    name: str
    bound_issuer: str
    jwks_url: str | None = None
    oidc_discovery_url: str | None = None
    #: parsed from ``jwt_validation_pubkeys``.
    public_keys: tuple[PublicKey, ...] = ()
    jwks_ca_pem: str | None = None
    leeway: int = 60
    jwks_cache_ttl: int = 600
    #: how long past jwks_cache_ttl the cached keys are still used while the issuer
    #: cannot be reached (broker/auth/jwks.py says why there is a limit).
    jwks_max_stale: int = 86400
    fetch_timeout: float = 5.0
    algorithms: tuple[str, ...] = ALLOWED_ALGORITHMS
    roles: Mapping[str, JWTRoleConfig] = field(default_factory=dict)


class _Table:
    """Typed reads from one TOML table; every error names the dotted key."""

    def __init__(self, prefix: str, table: Mapping[str, Any]) -> None:
        self.prefix, self.table = prefix, table
        self.used: set[str] = set()

    def error(self, name: str, message: str) -> AuthConfigError:
        return AuthConfigError(f"{self.prefix}.{name}", message)

    def get(self, name: str, typ: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
            want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise self.error(name, f"expected {want}, got {type(value).__name__}")
        return value

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.get(name, str, default)
        if value is not None and not value.strip():
            raise self.error(name, "must not be empty")
        return value  # type: ignore[no-any-return]

    def boolean(self, name: str, default: bool) -> bool:
        self.used.add(name)
        value = self.table.get(name, default)
        if not isinstance(value, bool):
            # A quoted "true" is a string in TOML: say what was found, not only its type.
            shown = repr(value) if isinstance(value, str | int | float) else type(value).__name__
            raise self.error(name, f"expected true or false (unquoted), got {shown[:60]}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.get(name, (list, str), [])
        items = [value] if isinstance(value, str) else value
        if not all(isinstance(v, str) and v for v in items):
            raise self.error(name, "expected a list of non-empty strings")
        return tuple(items)

    def duration(self, name: str, default: int | None, *aliases: str) -> int | None:
        present = [n for n in (name, *aliases) if n in self.table]
        self.used.update((name, *aliases))
        if len(present) > 1:
            raise self.error(present[1], f"set {present[0]} or {present[1]}, not both")
        if not present:
            return default
        value = self.table[present[0]]
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self.error(present[0], "expected a duration like '60s', '10m' or '1h'")
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.error(present[0], str(exc)) from None

    def reject_unknown(self, known: Collection[str] | None = None, *,
                       elsewhere: Collection[str] = (), where: str = "") -> None:
        """An error naming the first key not in ``known`` (default: the keys read).

        Checked before the values are, so a typo (``bound_isuer``) is reported as
        itself, with the key it most likely meant, not as the key it left missing.
        ``elsewhere``: keys that belong in another table, ``where`` (named in the hint).
        """
        allowed = self.used if known is None else known
        for name in self.table:
            if name in allowed:
                continue
            if name in elsewhere:
                raise self.error(name, f"unknown key here: {name} belongs in {where}")
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            raise self.error(name, f"unknown key (did you mean {close[0]}?)" if close
                             else "unknown key")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_fetch_url(url: str) -> str | None:
    """Why ``url`` may not be fetched for keys (None when it may): https, or http on loopback."""
    parts = urlsplit(url)
    if parts.scheme not in {"https", "http"} or not parts.hostname:
        return f"expected an https:// URL, got {url!r}"
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        # Keys fetched over plain HTTP can be swapped by anyone on the path.
        return f"{url!r} is plain http: use https (http is only allowed on loopback)"
    if parts.username or parts.password:
        return "must not contain credentials"
    return None


def _public_key(t: _Table, index: int, pem: str) -> PublicKey:
    key_name = f"jwt_validation_pubkeys[{index}]"
    try:
        key = serialization.load_pem_public_key(pem.strip().encode())
    except (ValueError, TypeError):
        raise t.error(key_name, "not a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise t.error(key_name, f"RSA key of {key.key_size} bits; at least 2048 needed")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise t.error(key_name, f"EC curve {key.curve.name} is not supported (P-256, P-384)")
        return key
    raise t.error(key_name, "only RSA and EC (P-256/P-384) public keys are supported")


def _ca_pem(t: _Table) -> str | None:
    pem = t.string("jwks_ca_pem")
    if pem is None:
        return None
    import ssl

    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError):
        raise t.error("jwks_ca_pem", "not a PEM CA certificate") from None
    return pem


def _method(name: str, table: Any, known: Collection[str] | None) -> JWTMethodConfig:
    prefix = f"jwt.{name}"
    if not isinstance(table, dict):
        raise AuthConfigError(prefix, "expected a table")
    if not name or "/" in name or name in _RESERVED_NAMES:
        raise AuthConfigError(prefix, f"'{name}' is reserved: it is the token auth method "
                              "(auth/token/...); choose another name" if name in _RESERVED_NAMES
                              else "auth method names must be one path segment")
    t = _Table(prefix, table)
    t.reject_unknown(_METHOD_KEYS, elsewhere=_ROLE_KEYS,
                     where=f"a role ([auth.{prefix}.roles.ROLE])")
    jwks_url = t.string("jwks_url")
    discovery = t.string("oidc_discovery_url")
    pems = t.strings("jwt_validation_pubkeys")
    sources = [n for n, v in (("jwks_url", jwks_url), ("oidc_discovery_url", discovery),
                              ("jwt_validation_pubkeys", pems)) if v]
    if len(sources) != 1:
        raise t.error(sources[1] if len(sources) > 1 else "jwks_url",
                      "set exactly one of jwks_url, oidc_discovery_url, jwt_validation_pubkeys")
    for key, url in (("jwks_url", jwks_url), ("oidc_discovery_url", discovery)):
        if url is not None and (problem := check_fetch_url(url)):
            raise t.error(key, problem)
    keys = tuple(_public_key(t, i, pem) for i, pem in enumerate(pems))
    # The OIDC discovery document names its issuer, which must be the URL it
    # was fetched from; for the other sources the operator must say it.
    issuer = t.string("bound_issuer", discovery)
    if issuer is None:
        raise t.error("bound_issuer", "missing: the exact 'iss' the tokens carry")
    algs = t.strings("jwt_supported_algs") or ALLOWED_ALGORITHMS
    bad = [a for a in algs if a not in ALLOWED_ALGORITHMS]
    if bad:
        raise t.error("jwt_supported_algs",
                      f"{bad[0]!r} is not allowed; use {', '.join(ALLOWED_ALGORITHMS)}")
    leeway = t.duration("clock_skew_leeway", 60, "leeway")
    cache_ttl = t.duration("jwks_cache_ttl", 600)
    max_stale = t.duration("jwks_max_stale", 86400)
    if pems and "jwks_max_stale" in table:
        raise t.error("jwks_max_stale", "only applies to jwks_url and oidc_discovery_url "
                      "(jwt_validation_pubkeys are never fetched, so never stale)")
    timeout = t.duration("fetch_timeout", 5)
    if not timeout:
        raise t.error("fetch_timeout", "must be at least 1s")
    ca_pem = _ca_pem(t)
    roles_raw = t.get("roles", dict, {})
    roles = {role: _role(f"{prefix}.roles.{role}", role, rt, known)
             for role, rt in roles_raw.items()}
    t.reject_unknown()
    return JWTMethodConfig(
        name=name,
        bound_issuer=issuer,
        jwks_url=jwks_url,
        oidc_discovery_url=discovery,
        public_keys=keys,
        jwks_ca_pem=ca_pem,
        leeway=leeway or 0,
        jwks_cache_ttl=cache_ttl or 0,
        jwks_max_stale=max_stale or 0,
        fetch_timeout=float(timeout),
        algorithms=algs,
        roles=roles,
    )


def _claim_values(t: _Table, claim: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, bool):
            out.append("true" if item else "false")
        elif isinstance(item, str | int):
            out.append(str(item))
        else:
            raise t.error(f"bound_claims.{claim}", "expected a string, number, boolean or a list")
    if not out:
        raise t.error(f"bound_claims.{claim}", "an empty list matches nothing")
    return tuple(out)


def _role(prefix: str, name: str, table: Any, known: Collection[str] | None) -> JWTRoleConfig:
    if not isinstance(table, dict):
        raise AuthConfigError(prefix, "expected a table")
    if not name or "/" in name:
        raise AuthConfigError(prefix, "role names must be one path segment")
    t = _Table(prefix, table)
    method = prefix.rsplit(".roles.", 1)[0]
    t.reject_unknown(_ROLE_KEYS, elsewhere=_METHOD_KEYS - {"roles"}, where=f"[auth.{method}]")
    audiences = t.strings("bound_audiences")
    subject = t.string("bound_subject")
    claims_raw = t.get("bound_claims", dict, {})
    bound = {claim: _claim_values(t, claim, v) for claim, v in claims_raw.items()}
    claims_type = t.get("bound_claims_type", str, "glob")
    if claims_type not in {"string", "glob"}:
        raise t.error("bound_claims_type", f"expected 'string' or 'glob', got {claims_type!r}")
    user_claim = t.string("user_claim", "sub") or "sub"
    mappings_raw = t.get("claim_mappings", dict, {})
    mappings: dict[str, str] = {}
    for claim, key in mappings_raw.items():
        if not isinstance(key, str) or not key:
            raise t.error(f"claim_mappings.{claim}", "expected a metadata key (a string)")
        if key in RESERVED_METADATA:
            raise t.error(f"claim_mappings.{claim}",
                          f"metadata key {key!r} is set by the login itself")
        if not META_KEY.fullmatch(key):
            # Leases carry it: sys/leases/revoke-by/KEY/VALUE and the lease filters
            # refuse any other key, so such a run's leases could not be selected.
            raise t.error(f"claim_mappings.{claim}",
                          f"metadata key {key!r} may hold only letters, digits, '_', '.' "
                          "and '-' (the lease APIs select leases by it)")
        if key in mappings.values():
            raise t.error(f"claim_mappings.{claim}", f"metadata key {key!r} is mapped twice")
        mappings[claim] = key
    policies = t.strings("token_policies")
    if "root" in policies:
        raise t.error("token_policies", "a login never gets the root policy")
    unknown = [p for p in policies if known is not None and p not in known and p != "default"]
    if unknown:
        # A typo here would silently grant nothing: say so at load time.
        raise t.error("token_policies", f"unknown policy {unknown[0]!r} (define [policies."
                      f"{unknown[0]}])")
    single_use = t.boolean("single_use", False)
    num_uses = t.get("token_num_uses", int, 0)
    if num_uses < 0:
        raise t.error("token_num_uses", "must not be negative (0: no limit)")
    period = t.duration("token_period", 0) or 0
    explicit = t.duration("token_explicit_max_ttl", None)
    if period:
        ttl, max_ttl = _periodic(t, period, explicit)
    else:
        ttl = t.duration("token_ttl", 3600) or 0
        max_ttl = t.duration("token_max_ttl", max(86400, ttl))
        if ttl < 1:
            raise t.error("token_ttl", "must be at least 1s")
        for key, cap in (("token_max_ttl", max_ttl), ("token_explicit_max_ttl", explicit)):
            if cap and ttl > cap:
                raise t.error("token_ttl", f"longer than {key} ({cap}s)")
    if not (audiences or subject is not None or bound):
        # Vault refuses such a role ("must have at least one bound constraint"): it would
        # take every token the issuer signs, for any repository, project or user.
        raise AuthConfigError(prefix, f"binds nothing: set at least one of "
                              f"{', '.join(_ROLE_BOUNDS)} (with none, any token from the "
                              "issuer, for anyone, logs in)")
    t.reject_unknown()
    return JWTRoleConfig(
        name=name,
        bound_audiences=audiences,
        bound_subject=subject,
        bound_claims=bound,
        bound_claims_type=claims_type,
        user_claim=user_claim,
        claim_mappings=mappings,
        token_policies=policies,
        token_ttl=ttl,
        token_max_ttl=max_ttl or None,
        token_explicit_max_ttl=explicit or None,
        token_num_uses=num_uses,
        token_period=period,
        single_use=single_use,
    )


def _periodic(t: _Table, period: int, explicit: int | None) -> tuple[int, None]:
    """A periodic role's token_ttl and token_max_ttl: none, both (0 and None).

    As in Vault, a periodic token's TTL is its period and it has no max TTL but its
    explicit one, so a ``token_ttl`` or ``token_max_ttl`` beside ``token_period``
    would not be used: refused, rather than left to look like a limit that holds.
    """
    for key, instead in (("token_ttl", "its TTL is token_period, at login and at every "
                                       "renewal"),
                         ("token_max_ttl", "it has no max TTL; token_explicit_max_ttl is "
                                           "the hard cap that still ends it")):
        if key in t.table:
            raise t.error(key, f"not used with token_period (a periodic token: {instead}); "
                               f"remove {key}")
        t.used.add(key)
    if explicit and period > explicit:
        raise t.error("token_period", f"longer than token_explicit_max_ttl ({explicit}s)")
    return 0, None


def parse_jwt_methods(
    table: Any, policies: Collection[str] | None = None
) -> dict[str, JWTMethodConfig]:
    """Parse the ``[auth.jwt]`` table (NAME -> method); raise AuthConfigError naming the key.

    With ``policies`` (the configured policy names), a role naming another one is an error.
    """
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise AuthConfigError("jwt", "expected a table of [auth.jwt.NAME] sections")
    return {name: _method(name, sub, policies) for name, sub in table.items()}
