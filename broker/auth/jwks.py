"""Where a JWT auth method gets its verification keys: PEM keys, a JWKS URL or OIDC discovery.

Remote key sets are cached for ``jwks_cache_ttl``. A token whose ``kid`` is not
in the cache triggers one refresh (the issuer may have rotated its keys), but
refreshes of one method are at least :data:`MIN_REFRESH_INTERVAL` apart
whatever triggers them: otherwise anyone could make the broker hammer the
issuer by sending tokens with made-up key ids.

Once the cached key set is older than ``jwks_cache_ttl`` (stale) a login whose
key is in it is answered from it at once, and the key set is refreshed in the
background: one task per method at a time, so an issuer that hangs costs the
logins nothing (before, every ~10 s one login waited ``fetch_timeout`` for the
fetch to fail, and an IdP blip turned into slow or failed CI logins). An
unknown ``kid`` still waits for a fetch in the foreground, because a rotated
key is only in the fresh document.

Stale keys are served for at most ``jwks_max_stale`` (default
:data:`DEFAULT_MAX_STALE`) past ``jwks_cache_ttl``. The bound exists because
the issuer's JWKS is also how it *withdraws* a key: without a limit, a key the
issuer removed (say, after it leaked) would stay trusted for as long as someone
can keep the broker from reaching the issuer. A day rides out an IdP outage or
a network blip and still ends trust in a withdrawn key the same day. Past the
bound the cached keys are not used; logins wait for a fetch and answer 503 if
it fails, as with no key set at all.

Only public key material is ever read from a JWKS: symmetric (``oct``) keys,
keys for encryption, unsupported curves and RSA keys under 2048 bits are
skipped. Keys named in a token's header (``jku``, ``jwk``, ``x5u``) are never
fetched or used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

from broker.auth.jwt_config import ALLOWED_ALGORITHMS, PublicKey, check_fetch_url
from broker.durations import format_duration
from broker.errors import ServiceUnavailable

__all__ = [
    "DEFAULT_MAX_STALE",
    "MIN_REFRESH_INTERVAL",
    "FetchError",
    "JWKSKeys",
    "KeySource",
    "StaticKeys",
    "VerificationKey",
    "fetch_json",
    "parse_jwks",
]

log = logging.getLogger(__name__)

#: seconds between two fetches of one method's keys, whatever asks for them.
MIN_REFRESH_INTERVAL = 10.0
#: seconds past the cache TTL that a key set is still served while the issuer cannot be reached.
DEFAULT_MAX_STALE = 86400.0
#: while refreshes keep failing, a reminder is logged at most this often (seconds).
_WARN_EVERY = 600.0
#: a JWKS or discovery document larger than this is refused (real ones are a few KiB).
MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_KEYS = 100
_MIN_RSA_BITS = 2048
_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1}
_JWK_CURVES = {"P-256", "P-384"}

FetchJSON = Callable[[str], Awaitable[Any]]


class FetchError(Exception):
    """A key document could not be fetched or understood; the message is one line."""


@dataclass(frozen=True)
class VerificationKey:
    """A public key that may verify a token's signature."""

    kid: str | None
    key: PublicKey
    #: the JWK's own ``alg``, when it names one: then only that algorithm may use it.
    alg: str | None = None

    def fits(self, alg: str) -> bool:
        """Whether this key may verify a signature made with ``alg``."""
        if self.alg is not None and self.alg != alg:
            return False
        if alg.startswith(("RS", "PS")):
            return isinstance(self.key, rsa.RSAPublicKey)
        curve = _CURVES.get(alg)
        return (curve is not None and isinstance(self.key, ec.EllipticCurvePublicKey)
                and isinstance(self.key.curve, curve))


class KeySource(Protocol):
    async def candidates(self, kid: str | None, alg: str) -> list[VerificationKey]:
        """Keys that may have signed a token with this ``kid`` and ``alg`` (maybe none)."""
        ...

    def why_none(self, kid: str | None, alg: str) -> str:
        """Why :meth:`candidates` found no key, for the refusal message."""
        ...

    async def close(self) -> None:
        """Stop background work (a key refresh in flight); the broker is shutting down."""
        ...


class StaticKeys:
    """``jwt_validation_pubkeys``: PEM keys from the config, tried in order (they have no kid)."""

    def __init__(self, keys: Sequence[PublicKey]) -> None:
        self.keys = [VerificationKey(None, k) for k in keys]

    async def candidates(self, kid: str | None, alg: str) -> list[VerificationKey]:
        return [k for k in self.keys if k.fits(alg)]

    def why_none(self, kid: str | None, alg: str) -> str:
        return f"no configured key can verify {alg} signatures"

    async def close(self) -> None:
        return None


def _public_jwk(jwk: dict[str, Any]) -> PublicKey:
    """The public key of one JWK, read from its public members only."""
    kty = jwk.get("kty")
    if kty == "RSA":
        key = RSAAlgorithm.from_jwk({"kty": "RSA", "n": jwk.get("n"), "e": jwk.get("e")})
        if not isinstance(key, rsa.RSAPublicKey):
            raise InvalidKeyError("not an RSA public key")
        if key.key_size < _MIN_RSA_BITS:
            raise InvalidKeyError(f"RSA key of {key.key_size} bits is too small")
        return key
    if kty == "EC":
        if jwk.get("crv") not in _JWK_CURVES:
            raise InvalidKeyError(f"curve {jwk.get('crv')!r} is not supported")
        ec_key = ECAlgorithm.from_jwk({"kty": "EC", "crv": jwk["crv"], "x": jwk.get("x"),
                                       "y": jwk.get("y")})
        if not isinstance(ec_key, ec.EllipticCurvePublicKey):
            raise InvalidKeyError("not an EC public key")
        return ec_key
    raise InvalidKeyError(f"key type {kty!r} is not accepted (RSA and EC only)")


def parse_jwks(doc: Any, source: str) -> list[VerificationKey]:
    """The usable signing keys of a JWKS document; FetchError when there are none."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise FetchError(f"{source}: not a JWKS document (no 'keys' list)")
    keys: list[VerificationKey] = []
    for i, jwk in enumerate(doc["keys"][:MAX_KEYS]):
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        alg = jwk.get("alg")
        label = f"{source} key {kid if isinstance(kid, str) else i!r}"
        if kid is not None and not isinstance(kid, str):
            log.warning("%s: skipped, kid is not a string", label)
            continue
        if jwk.get("use") not in (None, "sig"):
            continue  # an encryption key: never for signatures
        if alg is not None and alg not in ALLOWED_ALGORITHMS:
            log.info("%s: skipped, algorithm %r is not accepted", label, alg)
            continue
        try:
            keys.append(VerificationKey(kid, _public_jwk(jwk), alg))
        except (InvalidKeyError, ValueError, TypeError, KeyError) as exc:
            log.warning("%s: skipped, %s", label, str(exc)[:200])
    if not keys:
        raise FetchError(f"{source}: no usable signing key (RSA >= 2048 bits or EC P-256/P-384)")
    return keys


async def fetch_json(url: str, *, timeout: float, ca_pem: str | None = None) -> Any:
    """GET ``url`` and parse its JSON body; FetchError with a one-line reason otherwise.

    Redirects are not followed: the configured URL (over TLS) is what is trusted.
    """
    ctx: ssl.SSLContext | bool = ssl.create_default_context(cadata=ca_pem) if ca_pem else True
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url, ssl=ctx, allow_redirects=False,
                             headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise FetchError(f"{url}: HTTP {resp.status}")
                # content.read(n) returns what has arrived so far, not n bytes:
                # read to the end, stopping as soon as the limit is passed.
                body = bytearray()
                async for chunk in resp.content.iter_any():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        break
    except TimeoutError:
        raise FetchError(f"{url}: no answer within {timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise FetchError(f"{url}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise FetchError(f"{url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise FetchError(f"{url}: not JSON") from None


class JWKSKeys:
    """Keys from ``jwks_url``, or from the ``jwks_uri`` of an OIDC discovery document."""

    def __init__(
        self,
        *,
        issuer: str,
        jwks_url: str | None = None,
        discovery_url: str | None = None,
        ca_pem: str | None = None,
        timeout: float = 5.0,
        cache_ttl: float = 600.0,
        max_stale: float = DEFAULT_MAX_STALE,
        fetch: FetchJSON | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        min_refresh_interval: float = MIN_REFRESH_INTERVAL,
    ) -> None:
        if (jwks_url is None) == (discovery_url is None):
            raise ValueError("give exactly one of jwks_url and discovery_url")
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.discovery_url = discovery_url
        self.cache_ttl = cache_ttl
        self.max_stale = max_stale
        self.min_refresh_interval = min_refresh_interval
        self._fetch = fetch or (lambda url: fetch_json(url, timeout=timeout, ca_pem=ca_pem))
        self._monotonic = monotonic
        self._keys: list[VerificationKey] = []
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._last_error: str | None = None
        self._lock = asyncio.Lock()
        #: the background refresh in flight, if any: held here so it is neither
        #: garbage-collected mid-fetch nor left running by close().
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Refreshes failed in a row, and when that was last logged (not once per login,
        # nor once per attempt: an outage of a day would be thousands of lines).
        self._failures = 0
        self._warned_at: float | None = None
        self._warned_usable: bool | None = None
        #: how many times the key set was fetched (successfully or not).
        self.fetches = 0

    @property
    def source(self) -> str:
        return self.jwks_url or f"{self.discovery_url} (OIDC discovery)"

    def _age(self) -> float | None:
        return None if self._fetched_at is None else self._monotonic() - self._fetched_at

    def _stale(self) -> bool:
        age = self._age()
        return age is None or age >= self.cache_ttl

    def _limit(self) -> float:
        # Never shorter than the refresh interval: a key set just fetched must stay
        # usable until the next fetch is allowed (with jwks_cache_ttl = "5s" and
        # jwks_max_stale = "0s" logins would otherwise fail for 5 s in every 10).
        return max(self.cache_ttl + self.max_stale, self.min_refresh_interval)

    def _usable(self) -> bool:
        """Whether the cached key set may verify tokens: fresh, or stale within jwks_max_stale."""
        age = self._age()
        return bool(self._keys) and age is not None and age < self._limit()

    def _may_fetch(self) -> bool:
        return self._attempted_at is None or (
            self._monotonic() - self._attempted_at >= self.min_refresh_interval)

    def _known(self, kid: str | None) -> bool:
        return any(k.kid == kid for k in self._keys)

    async def _jwks_url(self) -> str:
        if self.jwks_url is not None:
            return self.jwks_url
        assert self.discovery_url is not None
        url = self.discovery_url.rstrip("/") + "/.well-known/openid-configuration"
        doc = await self._fetch(url)
        if not isinstance(doc, dict):
            raise FetchError(f"{url}: not an OpenID configuration document")
        if doc.get("issuer") != self.issuer:
            # OIDC Discovery 4.3: the document's issuer must be the one we trust.
            raise FetchError(f"{url}: issuer {str(doc.get('issuer'))[:200]!r} is not the "
                             f"bound issuer {self.issuer!r}")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise FetchError(f"{url}: no jwks_uri")
        problem = check_fetch_url(jwks_uri)
        if problem:
            raise FetchError(f"{url}: jwks_uri {problem}")
        return jwks_uri

    async def _refresh(self, want: Callable[[], bool]) -> None:
        """Fetch the key set if ``want()`` still holds once we hold the lock and may fetch."""
        async with self._lock:
            if not want() or not self._may_fetch():
                return
            self._attempted_at = self._monotonic()
            self.fetches += 1
            try:
                url = await self._jwks_url()
                keys = parse_jwks(await self._fetch(url), url)
            except FetchError as exc:
                self._last_error = str(exc)
                self._failed(exc)
                return
            self._keys = keys
            self._fetched_at = self._monotonic()
            self._last_error = None
            if self._failures:
                log.warning("%s: reachable again after %d failed key refresh(es)", self.source,
                            self._failures)
            self._failures, self._warned_at, self._warned_usable = 0, None, None
            log.info("loaded %d signing key(s) from %s: %s", len(keys), url,
                     ", ".join(str(k.kid) for k in keys))

    def _failed(self, exc: FetchError) -> None:
        """Log a failed refresh: on the first failure, when what logins get changes, and then
        every _WARN_EVERY seconds, never once per login."""
        self._failures += 1
        now, usable = self._monotonic(), self._usable()
        if (self._warned_at is not None and usable == self._warned_usable
                and now - self._warned_at < _WARN_EVERY):
            log.debug("%s: key refresh failed again (%d in a row): %s", self.source,
                      self._failures, exc)
            return
        self._warned_at, self._warned_usable = now, usable
        age = self._age()
        if usable and age is not None:
            left = self._limit() - age
            log.warning("%s: key refresh failed (%d in a row), serving the cached keys fetched "
                        "%s ago for at most %s more: %s", self.source, self._failures,
                        format_duration(int(age)), format_duration(int(left)), exc)
        elif self._keys and age is not None:
            log.error("%s: key refresh failed (%d in a row) and the cached keys, fetched %s ago, "
                      "are past jwks_cache_ttl + jwks_max_stale: logins answer 503 until the "
                      "issuer is back: %s", self.source, self._failures,
                      format_duration(int(age)), exc)
        else:
            log.error("cannot load signing keys: %s", exc)

    def _refresh_in_background(self) -> None:
        """Start refreshing the stale key set unless a refresh is running or not yet allowed."""
        if self._closed or self.refreshing or self._lock.locked() or not self._may_fetch():
            return
        self._task = asyncio.get_running_loop().create_task(
            self._background_refresh(), name=f"jwks refresh {self.source}")

    async def _background_refresh(self) -> None:
        try:
            await self._refresh(self._stale)
        except Exception:  # nobody awaits this task: say what went wrong here
            log.exception("%s: key refresh failed", self.source)

    @property
    def refreshing(self) -> bool:
        """Whether a background refresh is in flight."""
        return self._task is not None and not self._task.done()

    async def wait_refreshed(self) -> None:
        """Wait for the background refresh in flight, if any, to end."""
        task = self._task
        if task is not None:
            await asyncio.wait([task])

    async def close(self) -> None:
        """Cancel the background refresh in flight and wait for it; no new one starts."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            # asyncio.wait, not `await task`: the task's CancelledError is not ours, but
            # if close() itself is cancelled, that still propagates.
            await asyncio.wait([task])

    async def candidates(self, kid: str | None, alg: str) -> list[VerificationKey]:
        if not self._usable():
            # No key set, or one past jwks_max_stale: nothing to answer from but the issuer.
            await self._refresh(lambda: not self._usable())
        elif kid is not None and not self._known(kid):
            # Maybe the issuer rotated its keys since we cached them: only a fresh
            # document has the new key, so this login waits for it (rate-limited).
            await self._refresh(lambda: not self._known(kid))
        if not self._usable():
            raise ServiceUnavailable(self._unavailable())
        if self._stale():
            self._refresh_in_background()
        return [k for k in self._keys if (kid is None or k.kid == kid) and k.fits(alg)]

    def _unavailable(self) -> str:
        reason = self._last_error or "not fetched yet"
        age = self._age()
        if self._keys and age is not None:
            reason += (f"; the cached keys, fetched {format_duration(int(age))} ago, are past "
                       f"jwks_max_stale ({format_duration(int(self.max_stale))} after "
                       "jwks_cache_ttl)")
        return f"cannot load the signing keys: {reason}"

    def _unknown_kid(self, kid: str) -> str:
        """Why a kid is not in the key set, and when asking again may help.

        A key the issuer has just published (a rotation) is only seen at the next
        fetch, and fetches are rate-limited: within MIN_REFRESH_INTERVAL of the
        last one the key set is not fetched again, so the message must not read
        as final. It stays a 403, not a retryable 503: a made-up kid gets the
        same answer, and must not look like a broker outage to monitoring.
        """
        shown = f"unknown signing key id {kid[:200]!r}"
        age = self._age()
        attempted = self._attempted_at
        if age is None or attempted is None:
            return f"{shown} (not in the issuer's keys)"
        since = self._monotonic() - attempted
        wait = self.min_refresh_interval - since
        if wait <= 0:
            return f"{shown} (not in the issuer's keys)"
        fetched = f"fetched {format_duration(max(1, int(age)))} ago" if age >= 1 else \
            "fetched less than 1s ago"
        failed = f" (the last refresh failed: {self._last_error})" if self._last_error else ""
        return (f"{shown}: not in the issuer's keys as {fetched}{failed}; they are fetched "
                f"again at most every {format_duration(int(self.min_refresh_interval))}: if "
                f"the issuer has just rotated its keys, retry in {math.ceil(wait)}s")

    def why_none(self, kid: str | None, alg: str) -> str:
        if kid is None:
            return f"the JWT names no key id and no key of the issuer can verify {alg}"
        if not self._known(kid):
            return self._unknown_kid(kid)
        return f"key id {kid[:200]!r} cannot verify {alg} signatures"
