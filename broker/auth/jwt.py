"""JWT/OIDC login: check a CI system's signed token against a role's bindings.

The order is deliberate: the header is inspected first and ``alg: none`` or an
HMAC algorithm is refused before any key is looked at (an HMAC "signature"
made with our *public* key as the secret is the classic confusion attack);
then the signature is verified with a key of the right type, and only a token
whose signature holds has its claims read: expiry (required), not-before,
issued-at, issuer, audience, subject and the role's bound claims.

Claim semantics follow Vault's JWT auth method: when a role binds audiences the
token's ``aud`` must contain one of them, and a token that has an ``aud`` is
refused by a role that binds none (it was minted for someone else). Bound
claims accept any one of a list of values; with ``bound_claims_type = "glob"``
(the default) a ``*`` in a value matches any run of characters, ``/`` included.
A claim name starting with ``/`` is a JSON pointer into nested claims.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from jwt.api_jws import PyJWS
from jwt.exceptions import InvalidSignatureError, PyJWTError

from broker.audit import shown
from broker.auth.jwks import JWKSKeys, KeySource, StaticKeys
from broker.auth.jwt_config import (
    ALLOWED_ALGORITHMS,
    JWTMethodConfig,
    JWTRoleConfig,
    parse_jwt_methods,
)
from broker.errors import BadRequest, PermissionDenied, ReuseAttempt

if TYPE_CHECKING:
    from broker.config import Config
    from broker.store.base import LeaseStore

__all__ = [
    "MAX_JWT_LENGTH",
    "JWTAuthMethod",
    "JWTReplayed",
    "LoginResult",
    "build_auth_methods",
    "describe_token",
    "glob_match",
]

#: real CI tokens are 1-2 KiB; anything this long is not one.
MAX_JWT_LENGTH = 16 * 1024
log = logging.getLogger(__name__)
_MAX_SHOWN = 200
#: Seconds a ``single_use`` JWT's record outlives the JWT's exp + leeway: raising the
#: leeway (a reload, or a replica on a newer config) by up to this much cannot let a
#: used JWT log in again once its record has run out.
REPLAY_MARGIN = 600.0
#: stripped from around a presented JWT: a token read with ``open().read()`` or a
#: heredoc keeps its trailing newline. Vault's JWT method accepts such a token (go-jose's
#: ParseSigned strips whitespace before parsing); inside a token, whitespace is refused.
_ASCII_WHITESPACE = " \t\n\r\f\v"
_JWS = PyJWS(algorithms=list(ALLOWED_ALGORITHMS))
_MISSING = object()


@dataclass(frozen=True)
class LoginResult:
    """What a successful login grants: the token to create for the caller."""

    method: str
    role: JWTRoleConfig
    display_name: str
    metadata: dict[str, str]
    policies: list[str]
    ttl: int
    max_ttl: int | None
    #: a periodic role's period (``token_period``; the token's TTL at every renewal),
    #: else 0. With it, ``max_ttl`` is the role's ``token_explicit_max_ttl`` only.
    period: int = 0
    #: a ``single_use`` role's: the SHA-256 of the JWT's ``jti`` (hex), the key its
    #: use is recorded under; None for other roles.
    jti_hash: str | None = None
    #: a ``single_use`` role's: when the JWT stops logging in anyway (exp + leeway),
    #: so when the record of its use may go.
    use_until: float | None = None


class JWTReplayed(ReuseAttempt):
    """A ``single_use`` role's JWT presented again: 403, audited as a reuse attempt.

    The message says no more than that: not when, nor for whom, the JWT was used.
    """

    status = 403

    def __init__(self, first_accessor: str) -> None:
        super().__init__("permission denied: this JWT has already been used to log in and "
                         "the role accepts each JWT once (single_use); request a new JWT "
                         "from the CI system")
        #: the token accessor of the login that used it ("" if unknown), for the audit.
        self.first_accessor = first_accessor


def _deny(message: str) -> PermissionDenied:
    return PermissionDenied(f"permission denied: {message}")


def _shown(value: Any) -> str:
    """A claim value as it may appear in an error message: short, repr'd."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _b64json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return _json(base64.urlsafe_b64decode(padded.encode("ascii")))


def _json(data: bytes) -> Any:
    """Strict JSON; ValueError for anything else, deep nesting included.

    ``[[[[...`` a few thousand deep fits well within MAX_JWT_LENGTH and makes
    the json module raise RecursionError, which must be a refusal, not a 500.
    """
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _split(token: str) -> tuple[dict[str, Any], Any]:
    """The unverified header and payload; PermissionDenied if the token is not a compact JWS."""
    parts = token.split(".")
    if len(parts) == 5:
        raise _deny("encrypted JWTs (JWE) are not supported")
    if len(parts) != 3:
        raise _deny("malformed JWT: expected three dot-separated parts")
    try:
        header = _b64json(parts[0])
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise _deny("malformed JWT: the header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise _deny("malformed JWT: the header is not a JSON object")
    try:
        payload = _b64json(parts[1])
    except (ValueError, UnicodeDecodeError, binascii.Error):
        payload = None
    return header, payload


def describe_token(token: Any, hash_jti: Callable[[str], str] | None = None
                   ) -> dict[str, Any]:
    """Non-secret facts about a presented JWT for the audit log: never the token itself.

    The claims are unverified (as presented), which is what an investigator
    wants to see after a failed login. The ``jti`` is never in clear (the store
    keeps only its SHA-256): a string ``jti`` is shown as ``hash_jti(jti)``
    (the audit log's HMAC, which ``broker audit hash`` computes), and left out
    without ``hash_jti`` or when it is not a string.
    """
    if not isinstance(token, str) or len(token) > MAX_JWT_LENGTH:
        return {}
    token = token.strip(_ASCII_WHITESPACE)
    try:
        header, payload = _split(token)
    except PermissionDenied:
        return {}
    out: dict[str, Any] = {}
    hdr = {k: header[k] for k in ("alg", "kid", "typ") if isinstance(header.get(k), str)}
    if hdr:
        out["jwt_header"] = {k: v[:_MAX_SHOWN] for k, v in hdr.items()}
    if isinstance(payload, dict):
        claims: dict[str, Any] = {}
        for name in ("iss", "sub", "aud", "exp", "iat", "nbf"):
            value = payload.get(name)
            if isinstance(value, str):
                claims[name] = value[:_MAX_SHOWN]
            elif isinstance(value, int | float) and not isinstance(value, bool):
                claims[name] = value
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                claims[name] = [v[:_MAX_SHOWN] for v in value[:10]]
        jti = payload.get("jti")
        if hash_jti is not None and isinstance(jti, str) and jti:
            # The whole jti, not cut to _MAX_SHOWN: what an operator hashes to find it.
            claims["jti"] = hash_jti(jti)
        if claims:
            out["jwt_claims"] = claims
    return out


def glob_match(pattern: str, value: str) -> bool:
    """Whether ``value`` matches ``pattern`` where ``*`` matches any run of characters.

    Linear time (no regular expression): the literal pieces between stars are
    found left to right, which is exact for patterns whose only wildcard is ``*``.
    """
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return pattern == value
    head, tail = pieces[0], pieces[-1]
    if len(head) + len(tail) > len(value) or not value.startswith(head) \
            or not value.endswith(tail):
        return False
    pos, end = len(head), len(value) - len(tail)
    for piece in pieces[1:-1]:
        if not piece:
            continue
        found = value.find(piece, pos, end)
        if found < 0:
            return False
        pos = found + len(piece)
    return True


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by name, or by JSON pointer (``/a/b``) into nested objects; _MISSING if absent."""
    if not name.startswith("/"):
        return claims.get(name, _MISSING)
    node: Any = claims
    for raw in name[1:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _scalar(value: Any) -> str | None:
    """A claim value as text, if it is a scalar (string, number, boolean)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    return None


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _deny(f"the {name} claim is not a number")
    try:
        number = float(value)
    except OverflowError:  # an int of hundreds of digits: no float holds it
        raise _deny(f"the {name} claim is out of range") from None
    if not math.isfinite(number):
        raise _deny(f"the {name} claim is not a number")
    return number


def _when(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return str(ts)


class JWTAuthMethod:
    """One ``[auth.jwt.NAME]`` method: validates tokens and says what a login grants."""

    def __init__(
        self,
        config: JWTMethodConfig,
        *,
        keys: KeySource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.keys: KeySource = keys or _key_source(config)

    @property
    def name(self) -> str:
        return self.config.name

    async def close(self) -> None:
        """Stop the key source's background work (a JWKS refresh in flight); call at shutdown."""
        await self.keys.close()

    def role(self, name: Any) -> JWTRoleConfig:
        if not isinstance(name, str) or not name:
            raise BadRequest("missing required parameter 'role'")
        role = self.config.roles.get(name)
        if role is None:
            raise BadRequest(f"role {shown(name)!r} could not be found in auth method "
                             f"{self.name!r}")
        return role

    async def login(self, role_name: Any, token: Any) -> LoginResult:
        """Validate ``token`` for ``role_name``; BadRequest (400) or PermissionDenied (403)."""
        role = self.role(role_name)
        if isinstance(token, str):
            token = token.strip(_ASCII_WHITESPACE)
        if not isinstance(token, str) or not token:
            raise BadRequest("missing required parameter 'jwt'")
        if len(token) > MAX_JWT_LENGTH:
            raise _deny(f"the JWT is longer than {MAX_JWT_LENGTH} characters")
        if any(c.isspace() for c in token):
            # Base64 decoding skips it, so it would not even be noticed: a token is one
            # unbroken line, and a broken one was mangled on its way here.
            raise _deny("malformed JWT: it contains whitespace (a JWT is one unbroken line; "
                        "only whitespace around it is ignored)")
        claims = await self.verify(token)
        self.check_claims(role, claims)
        return self.grant(role, claims)

    async def record_use(self, store: LeaseStore, result: LoginResult, accessor: str) -> None:
        """For a ``single_use`` role: record that the JWT logged in (for the token
        ``accessor``), or JWTReplayed when it had. One atomic store write, before the
        token is made: of concurrent logins with one JWT, on any replica, one passes."""
        if result.jti_hash is None or result.use_until is None:
            return
        earlier = await store.record_jwt_use(self.name, result.jti_hash, accessor=accessor,
                                             until=result.use_until, now=self.clock())
        if earlier is not None:
            raise JWTReplayed(earlier)

    async def forget_use(self, store: LeaseStore, result: LoginResult, accessor: str) -> None:
        """Undo :meth:`record_use` for a login that made no token after all (the token's
        store write failed): a retry with the same JWT is no replay. Never raises: a
        record left behind only uses the JWT up, as before."""
        if result.jti_hash is None:
            return
        try:
            await store.forget_jwt_use(self.name, result.jti_hash, accessor=accessor)
        except Exception as exc:
            log.warning("auth %s: a failed login's single_use record stays (%s); the JWT "
                        "cannot log in again", self.name, type(exc).__name__)

    async def verify(self, token: str) -> dict[str, Any]:
        """The claims of ``token`` once its algorithm and signature are checked."""
        header, _ = _split(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise _deny("the JWT header names no algorithm (alg)")
        if alg.lower() == "none":
            raise _deny("unsigned JWT (alg none) refused")
        if alg.upper().startswith("HS"):
            raise _deny(f"symmetric algorithm {_shown(alg)} refused: only RS*, ES* and PS256 "
                        "signatures are accepted")
        if alg not in self.config.algorithms:
            raise _deny(f"algorithm {_shown(alg)} is not accepted "
                        f"(accepted: {', '.join(self.config.algorithms)})")
        if "crit" in header or "b64" in header:
            raise _deny("JWT header extensions (crit, b64) are not supported")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _deny("malformed JWT: kid is not a string")
        candidates = await self.keys.candidates(kid, alg)
        if not candidates:
            raise _deny(self.keys.why_none(kid, alg))
        payload: bytes | None = None
        for candidate in candidates:
            try:
                payload = _JWS.decode_complete(
                    token, key=candidate.key, algorithms=[alg],
                    options={"verify_signature": True, "enforce_minimum_key_length": True},
                )["payload"]
                break
            except InvalidSignatureError:
                continue
            except PyJWTError:
                raise _deny("malformed JWT: it cannot be decoded") from None
        if payload is None:
            raise _deny("JWT signature verification failed")
        try:
            claims = _json(payload)
        except (ValueError, UnicodeDecodeError):
            raise _deny("malformed JWT: the payload is not JSON") from None
        if not isinstance(claims, dict):
            raise _deny("malformed JWT: the payload is not a JSON object")
        return claims

    def check_claims(self, role: JWTRoleConfig, claims: Mapping[str, Any]) -> None:
        """Time, issuer, audience, subject and bound claims; PermissionDenied on the first miss."""
        now, leeway = self.clock(), self.config.leeway
        exp = _number(claims, "exp")
        if exp is None:
            raise _deny("the JWT has no exp claim (tokens must expire)")
        if now > exp + leeway:
            raise _deny(f"the JWT expired at {_when(exp)} (leeway {leeway}s)")
        nbf = _number(claims, "nbf")
        if nbf is not None and now + leeway < nbf:
            raise _deny(f"the JWT is not valid before {_when(nbf)} (leeway {leeway}s)")
        iat = _number(claims, "iat")
        if iat is not None and iat > now + leeway:
            raise _deny(f"the JWT was issued in the future ({_when(iat)}, leeway {leeway}s)")
        iss = claims.get("iss")
        if iss != self.config.bound_issuer:
            raise _deny(f"issuer {_shown(iss)} is not the bound issuer")
        self._check_audience(role, claims.get("aud", _MISSING))
        if role.bound_subject is not None and claims.get("sub") != role.bound_subject:
            raise _deny(f"sub {_shown(claims.get('sub'))} does not match the role's "
                        "bound_subject")
        for name, allowed in role.bound_claims.items():
            self._check_bound_claim(role, name, allowed, _claim(claims, name))

    def _check_audience(self, role: JWTRoleConfig, aud: Any) -> None:
        if aud is _MISSING or aud is None:
            if role.bound_audiences:
                raise _deny("the JWT has no aud claim but the role binds audiences")
            return
        values = [aud] if isinstance(aud, str) else aud
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise _deny("the aud claim is not a string or a list of strings")
        if not role.bound_audiences:
            raise _deny(f"role {role.name!r} has no bound_audiences but the JWT has an aud "
                        f"claim ({_shown(aud)}); set bound_audiences")
        if not set(values) & set(role.bound_audiences):
            raise _deny(f"audience {_shown(aud)} is not in the role's bound_audiences")

    @staticmethod
    def _check_bound_claim(role: JWTRoleConfig, name: str, allowed: tuple[str, ...],
                           value: Any) -> None:
        if value is _MISSING or value is None:
            raise _deny(f"claim {name!r} is missing from the JWT (bound by role {role.name!r})")
        values = value if isinstance(value, list) else [value]
        texts = [_scalar(v) for v in values]
        if not texts or any(t is None for t in texts):
            raise _deny(f"claim {name!r} is not a string, number, boolean or list of them")
        if role.bound_claims_type == "glob":
            ok = any(glob_match(p, t) for p in allowed for t in texts if t is not None)
        else:
            ok = any(t in allowed for t in texts)
        if not ok:
            raise _deny(f"claim {name!r} value {_shown(value)} does not match the role's "
                        "bound_claims")

    def grant(self, role: JWTRoleConfig, claims: Mapping[str, Any]) -> LoginResult:
        """The token a verified login gets: display name, metadata, policies, TTLs."""
        user = _scalar(_claim(claims, role.user_claim))
        if not user:
            raise _deny(f"user_claim {role.user_claim!r} is missing from the JWT or empty")
        if "\x00" in user:
            # Token rows keep it (display name): a PostgreSQL store cannot (a 500).
            raise _deny(f"user_claim {role.user_claim!r} holds a NUL character")
        metadata: dict[str, str] = {}
        for claim_name, key in role.claim_mappings.items():
            value = _claim(claims, claim_name)
            if value is _MISSING or value is None:
                continue
            text = _scalar(value)
            if text is None:
                raise _deny(f"claim {claim_name!r} (mapped to metadata {key!r}) is not a "
                            "string, number or boolean")
            if "\x00" in text:  # as for user_claim: not storable in PostgreSQL's JSONB
                raise _deny(f"claim {claim_name!r} (mapped to metadata {key!r}) holds a NUL "
                            "character")
            metadata[key] = text
        metadata.update(role=role.name, auth=self.name)
        jti_hash, use_until = self._single_use(role, claims)
        return LoginResult(
            method=self.name,
            role=role,
            display_name=f"{self.name}-{user}"[:256],
            metadata=metadata,
            policies=sorted(set(role.token_policies) | {"default"}),
            ttl=role.token_ttl,
            max_ttl=role.token_cap,
            period=role.token_period,
            jti_hash=jti_hash,
            use_until=use_until,
        )

    def _single_use(self, role: JWTRoleConfig, claims: Mapping[str, Any]
                    ) -> tuple[str | None, float | None]:
        """A ``single_use`` role's key for the JWT (its jti, hashed) and the time the
        JWT stops logging in anyway; (None, None) for other roles."""
        if not role.single_use:
            return None, None
        jti = claims.get("jti")
        if jti is None or jti == "":
            raise _deny(f"role {role.name!r} is single_use and the JWT has no jti claim: "
                        "without a unique token id a replay cannot be told from a first login")
        if not isinstance(jti, str):
            raise _deny("the jti claim is not a string")
        exp = _number(claims, "exp")
        if exp is None:  # check_claims refused it already; a role must never skip this
            raise _deny(f"role {role.name!r} is single_use but the JWT has no exp claim")
        # Hashed: the store (and its backups) never hold the jti in clear.
        digest = hashlib.sha256(jti.encode("utf-8", "surrogatepass")).hexdigest()
        # Kept past the JWT's own end by REPLAY_MARGIN: a reload (or a replica) with a
        # larger leeway accepts the JWT for longer, and must still find the record.
        return digest, exp + self.config.leeway + REPLAY_MARGIN


def _key_source(config: JWTMethodConfig) -> KeySource:
    if config.public_keys:
        return StaticKeys(config.public_keys)
    return JWKSKeys(
        issuer=config.bound_issuer,
        jwks_url=config.jwks_url,
        discovery_url=config.oidc_discovery_url,
        ca_pem=config.jwks_ca_pem,
        timeout=config.fetch_timeout,
        cache_ttl=config.jwks_cache_ttl,
        max_stale=config.jwks_max_stale,
    )


def _key_settings(config: JWTMethodConfig) -> tuple[Any, ...]:
    """What a method's key source is built from: equal settings, interchangeable sources."""
    return (config.public_keys, config.bound_issuer, config.jwks_url,
            config.oidc_discovery_url, config.jwks_ca_pem, config.fetch_timeout,
            config.jwks_cache_ttl, config.jwks_max_stale)


def build_auth_methods(config: Config, previous: Mapping[str, JWTAuthMethod] | None = None
                       ) -> dict[str, JWTAuthMethod]:
    """Every ``[auth.jwt.NAME]`` of ``config`` as a ready auth method, keyed by NAME.

    ``config.auth["jwt"]`` may hold the raw TOML tables (validated at load
    time) or already parsed :class:`JWTMethodConfig` objects.

    ``previous`` (the methods of the config a reload replaces): a method whose
    key settings did not change keeps its key source, and so its cached JWKS.
    A reload then neither makes the next login fetch the keys again nor, while
    the issuer is down, loses the keys that logins are being answered from.
    """
    section = config.auth.get("jwt") if config.auth else None
    if not section:
        return {}
    if all(isinstance(v, JWTMethodConfig) for v in section.values()):
        parsed: Mapping[str, JWTMethodConfig] = section
    else:
        parsed = parse_jwt_methods(section)
    methods: dict[str, JWTAuthMethod] = {}
    for name, cfg in parsed.items():
        old = (previous or {}).get(name)
        keep = old is not None and _key_settings(old.config) == _key_settings(cfg)
        methods[name] = JWTAuthMethod(cfg, keys=old.keys if keep and old else None)
    return methods
