"""The JWKS cache when the issuer is down: stale keys answer at once, within a hard limit.

A real OIDC issuer (tests/oidc_issuer.py) serves discovery and JWKS over HTTP on
loopback and is taken down mid-test: ``outage = "hang"`` holds every request
(a blackholed issuer), ``"error"`` answers 503. The key cache's age runs on a
fake monotonic clock, so "stale" and "past jwks_max_stale" need no waiting; the
fetches themselves are real, with a fetch timeout far longer than any test may
take, so a login that waited for a hung fetch shows up as a test failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from broker.auth import JWTAuthMethod, LoginResult, parse_jwt_methods
from broker.auth.jwks import JWKSKeys
from broker.errors import PermissionDenied, ServiceUnavailable
from tests.oidc_issuer import OIDCIssuer
from tests.unit.test_jwt_validation import FakeClock, deploy_role

#: how long a fetch may take before it fails: no test may ever wait for it.
FETCH_TIMEOUT = 120.0
#: a login "answered at once" returns within this (generous: it takes milliseconds).
FAST = 10.0
CACHE_TTL = 600
MAX_STALE = 3600
DISCOVERY = "/.well-known/openid-configuration"


@pytest.fixture
def issuer() -> Iterator[OIDCIssuer]:
    with OIDCIssuer() as issuer:
        yield issuer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def method(issuer: OIDCIssuer, clock: FakeClock) -> AsyncIterator[JWTAuthMethod]:
    """A discovery-based method whose keys are fetched over HTTP from ``issuer``."""
    cfg = parse_jwt_methods({"gh": {
        "oidc_discovery_url": issuer.url,
        "jwks_cache_ttl": f"{CACHE_TTL}s",
        "jwks_max_stale": f"{MAX_STALE}s",
        "fetch_timeout": f"{int(FETCH_TIMEOUT)}s",
        "roles": {"deploy": deploy_role()},
    }})["gh"]
    keys = JWKSKeys(issuer=cfg.bound_issuer, discovery_url=cfg.oidc_discovery_url,
                    timeout=cfg.fetch_timeout, cache_ttl=cfg.jwks_cache_ttl,
                    max_stale=cfg.jwks_max_stale, monotonic=clock)
    method = JWTAuthMethod(cfg, keys=keys)
    yield method
    await method.close()


def keys_of(method: JWTAuthMethod) -> JWKSKeys:
    assert isinstance(method.keys, JWKSKeys)
    return method.keys


async def fast_login(method: JWTAuthMethod, token: str) -> LoginResult:
    """Log in; fail the test if the login waited for the (hung) issuer."""
    return await asyncio.wait_for(method.login("deploy", token), FAST)


async def until(condition: Callable[[], bool]) -> None:
    """Wait (a bounded while) for something the issuer's thread or a task will do."""
    async with asyncio.timeout(FAST):
        while not condition():  # noqa: ASYNC110 - the issuer's thread counts its requests
            await asyncio.sleep(0.01)


def refresh_logs(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "broker.auth.jwks" and r.levelno >= logging.WARNING
            and text in r.getMessage()]


async def test_stale_keys_answer_at_once_while_the_issuer_hangs(
        method: JWTAuthMethod, issuer: OIDCIssuer, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """Past jwks_cache_ttl with the issuer hung, logins with known kids never wait for the fetch."""
    caplog.set_level(logging.DEBUG, logger="broker.auth.jwks")
    keys = keys_of(method)
    await method.login("deploy", issuer.github_token())
    assert issuer.count(DISCOVERY) == 1 and keys.fetches == 1
    clock.now += CACHE_TTL + 1
    issuer.outage = "hang"
    token = issuer.github_token()
    assert (await fast_login(method, token)).role.name == "deploy"
    # It answered while the refresh it started is still held by the issuer.
    await until(lambda: issuer.count(DISCOVERY) == 2)
    assert keys.refreshing
    # One refresh at a time: more logins, even past the 10 s refetch interval, add none.
    for signer in (issuer.rsa_key, issuer.ec_key, issuer.rsa_key):
        await fast_login(method, issuer.github_token(key=signer))
        clock.now += 11
    assert keys.refreshing and keys.fetches == 2 and issuer.count(DISCOVERY) == 2
    # The issuer answers 503: the refresh fails, and that is logged once, not per login.
    issuer.outage = "error"
    await keys.wait_refreshed()
    for _ in range(5):
        clock.now += 11  # each login may start one more (failing) refresh
        await fast_login(method, issuer.github_token())
        await keys.wait_refreshed()
    assert keys.fetches == 7
    (warning,) = refresh_logs(caplog, "serving the cached keys")
    assert "HTTP 503" in warning.getMessage() and issuer.url in warning.getMessage()
    assert token not in caplog.text and token.split(".")[2] not in caplog.text


async def test_background_refresh_picks_up_the_issuers_new_document(
        method: JWTAuthMethod, issuer: OIDCIssuer, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """Once the issuer is back, a background refresh loads its new keys and drops withdrawn ones."""
    keys = keys_of(method)
    old = issuer.rsa_key
    await method.login("deploy", issuer.github_token(key=old))
    clock.now += CACHE_TTL + 1
    issuer.outage = "hang"
    await fast_login(method, issuer.github_token(key=old))
    issuer.outage = "error"  # the held refresh fails
    await keys.wait_refreshed()
    assert keys.fetches == 2
    # Back, with a rotated key set: rsa-1 withdrawn, a new key published.
    new = issuer.rotate()
    issuer.published = [new, issuer.ec_key]
    issuer.outage = None
    clock.now += 11
    await fast_login(method, issuer.github_token(key=old))  # still served, from the cache
    await keys.wait_refreshed()
    assert keys.fetches == 3 and issuer.count("/jwks") == 2
    await fast_login(method, issuer.github_token(key=new))
    with pytest.raises(PermissionDenied, match="unknown signing key id 'rsa-1'"):
        await method.login("deploy", issuer.github_token(key=old))
    assert keys.fetches == 3  # the new kid needed no fetch; rsa-1 was refused rate-limited
    assert refresh_logs(caplog, "reachable again after 1 failed key refresh")


async def test_unknown_kid_still_waits_for_a_fetch(
        method: JWTAuthMethod, issuer: OIDCIssuer, clock: FakeClock) -> None:
    """A rotated kid waits for the fresh document (stale cache or not); known kids never do."""
    keys = keys_of(method)
    await method.login("deploy", issuer.github_token())
    rotated = issuer.rotate()
    clock.now += CACHE_TTL + 1
    issuer.outage = "hang"
    await fast_login(method, issuer.github_token())  # known kid: at once
    await until(lambda: issuer.count(DISCOVERY) == 2)
    # The rotated kid is only in the document being fetched: that login waits for it.
    waiting = asyncio.create_task(method.login("deploy", issuer.github_token(key=rotated)))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    issuer.outage = None
    assert (await asyncio.wait_for(waiting, FAST)).role.name == "deploy"
    assert keys.fetches == 2  # it joined the refresh in flight rather than starting another
    # Stale again and nothing in flight: a newly rotated kid is fetched in the foreground.
    newer = issuer.rotate()
    clock.now += CACHE_TTL + 1
    await method.login("deploy", issuer.github_token(key=newer))
    assert keys.fetches == 3 and not keys.refreshing
    # Made-up kids are still rate-limited: one fetch per 10 s, however many tokens.
    clock.now += 11
    for _ in range(10):
        with pytest.raises(PermissionDenied, match="unknown signing key id 'rogue-"):
            await method.login("deploy", issuer.github_token(signing="unknown-key"))
    assert keys.fetches == 4


async def test_keys_past_max_stale_are_refused_with_503(
        method: JWTAuthMethod, issuer: OIDCIssuer, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """Cached keys older than jwks_cache_ttl + jwks_max_stale are not used: 503 until the issuer is back."""
    keys = keys_of(method)
    await method.login("deploy", issuer.github_token())
    issuer.outage = "error"
    clock.now += CACHE_TTL + MAX_STALE - 1
    await fast_login(method, issuer.github_token())  # stale, but within the limit
    await keys.wait_refreshed()
    clock.now += 11  # past the limit, and past the 10 s refetch interval: this login fetches
    with pytest.raises(ServiceUnavailable) as info:
        await method.login("deploy", issuer.github_token())
    assert info.value.status == 503
    message = str(info.value)
    assert message.startswith("cannot load the signing keys: ")
    assert "HTTP 503" in message and "past jwks_max_stale (1h after jwks_cache_ttl)" in message
    assert refresh_logs(caplog, "logins answer 503 until the issuer is back")
    # Rate-limited as before: the next logins get the 503 without another fetch.
    fetches = keys.fetches
    with pytest.raises(ServiceUnavailable):
        await method.login("deploy", issuer.github_token())
    assert keys.fetches == fetches
    # The issuer is back: the next fetch (10 s later) restores logins.
    issuer.outage = None
    clock.now += 11
    await method.login("deploy", issuer.github_token())
    assert keys.fetches == fetches + 1 and not keys.refreshing


async def test_close_cancels_the_refresh_in_flight(
        method: JWTAuthMethod, issuer: OIDCIssuer, clock: FakeClock) -> None:
    """Closing the method cancels and awaits a hung background refresh; no new one starts."""
    keys = keys_of(method)
    await method.login("deploy", issuer.github_token())
    clock.now += CACHE_TTL + 1
    issuer.outage = "hang"
    await fast_login(method, issuer.github_token())
    await until(lambda: issuer.count(DISCOVERY) == 2)
    assert keys.refreshing
    await asyncio.wait_for(method.close(), FAST)
    assert not keys.refreshing
    issuer.outage = None
    clock.now += 11
    await fast_login(method, issuer.github_token())
    assert not keys.refreshing and issuer.count(DISCOVERY) == 2
