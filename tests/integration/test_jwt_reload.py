"""A config reload (SIGHUP) keeps the JWT methods' cached keys, so logins survive an issuer outage.

A real broker process and a real OIDC issuer (tests/oidc_issuer.py). Before,
every reload built the auth methods anew with empty key caches: the first
login after it fetched the JWKS again, and while the issuer was down every
login after a reload failed, although the keys were cached a moment before.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from tests.integration.broker_harness import config_url, spawn_broker, wait_healthy, write_config
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration


def method(issuer: OIDCIssuer, *, roles: tuple[str, ...] = ("deploy",), cache_ttl: str = "10m"
           ) -> str:
    body = f"""
[auth.jwt.github]
oidc_discovery_url = "{issuer.url}"
jwks_cache_ttl = "{cache_ttl}"
"""
    for role in roles:
        body += f"""
[auth.jwt.github.roles.{role}]
bound_audiences = ["broker"]
bound_claims = {{ repository = "acme/*" }}
token_policies = ["default"]
"""
    return body


@pytest.fixture
def issuer() -> Iterator[OIDCIssuer]:
    with OIDCIssuer() as it:
        yield it


def login(url: str, issuer: OIDCIssuer, role: str) -> hvac.Client:
    client = hvac.Client(url=url)
    client.auth.jwt.jwt_login(role=role, jwt=issuer.github_token(repository="acme/app"),
                              path="github")
    return client


def reload(proc: subprocess.Popen[bytes], config: Path, body: str, reloads: int) -> None:
    """Rewrite the config's auth part, SIGHUP, and wait for the ``reloads``-th reload's log line."""
    head = config.read_text().split("\n[auth.jwt.github]", 1)[0]
    config.write_text(head + body)
    proc.send_signal(signal.SIGHUP)
    log = config.parent / "server.log"
    deadline = time.monotonic() + 15
    while log.read_text().count("config reloaded from") < reloads:
        assert time.monotonic() < deadline, "the broker did not reload"
        time.sleep(0.05)


def test_reload_keeps_cached_keys_while_the_issuer_is_down(tmp_path: Path,
                                                           issuer: OIDCIssuer) -> None:
    config = write_config(tmp_path, method(issuer))
    proc = spawn_broker(config)
    url = config_url(config)
    try:
        wait_healthy(url)
        login(url, issuer, "deploy")  # fetches discovery and the JWKS once
        fetched = issuer.count("/jwks")
        assert fetched == 1
        issuer.outage = "error"

        # A role added by a reload: the method's key settings did not change,
        # so it keeps its key source and the keys cached before the outage.
        reload(proc, config, method(issuer, roles=("deploy", "release")), reloads=1)
        assert login(url, issuer, "release").token
        assert login(url, issuer, "deploy").token
        assert issuer.count("/jwks") == fetched  # nothing fetched (or tried) again

        # Changed key settings make a new key source, with its own (empty) cache:
        # it asks the issuer, and during the outage it cannot log anyone in.
        discovery = "/.well-known/openid-configuration"
        asked = issuer.count(discovery)
        reload(proc, config, method(issuer, roles=("deploy",), cache_ttl="5m"), reloads=2)
        with pytest.raises(hvac.exceptions.VaultDown):
            login(url, issuer, "deploy")
        assert issuer.count(discovery) == asked + 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
