"""Vault compatibility, round 7, against a real broker over HTTP with hvac: a database
role's read names its connection (``db_name``), rotate-root at Vault's
``{mount}/rotate-root/{connection}`` takes only the mount's connection name,
``sys/auth/NAME/tune`` answers (read-only, with Vault's grant), and a 405 on
``sys/leases/lookup`` lists every method the path serves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, noop_broker
from tests.integration.test_api_postgres import pg_mount
from tests.integration.test_openapi import CHECKS, schema
from tests.integration.token_fixtures import audit_events, client, made_by_root
from tests.oidc_issuer import SigningKey

pytestmark = pytest.mark.integration

#: [tokens] max_ttl here: every auth method's max_lease_ttl.
TOKENS_MAX = 48 * 3600
KEY = SigningKey.generate("RS256")

CONFIG = f"""
[tokens]
max_ttl = "48h"

[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.r]

[auth.jwt.github]
bound_issuer = "https://token.actions.githubusercontent.com"
jwt_validation_pubkeys = ['''
{KEY.public_pem()}''']

[auth.jwt.github.roles.deploy]
bound_audiences = ["broker"]
token_policies = ["app"]

[policies.rotator]
"noop/rotate-root/*" = ["update", "sudo"]

[policies.tune-read]
"sys/auth/+/tune" = ["read"]

[policies.tune-sudo]
"sys/auth/+/tune" = ["read", "sudo"]

[policies.auth-lister]
"sys/auth" = ["read"]
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, postgres_dsn: str
           ) -> Iterator[BrokerThread]:
    # The postgres mount is named "pgc": its connection's name is the mount's, not "pg".
    body = pg_mount(postgres_dsn, name="pgc") + CONFIG
    with noop_broker(tmp_path_factory.mktemp("vault-compat-round7"), body) as server:
        yield server


@pytest.fixture(scope="module")
def root(broker: BrokerThread) -> hvac.Client:
    return client(broker, ROOT_TOKEN)


def raw(broker: BrokerThread, method: str, path: str, token: str = ROOT_TOKEN,
        **kwargs: Any) -> requests.Response:
    return requests.request(method, f"{broker.url}/v1/{path}",
                            headers={"X-Vault-Token": token}, timeout=30, **kwargs)


def conforms(template: str, method: str, resp: requests.Response, **params: str) -> None:
    """``resp`` matches docs/openapi.yaml's answer for ``method template``."""
    schema[template][method].Case(path_parameters=params).validate_response(resp,
                                                                          checks=CHECKS)


# -- 1. read_role's db_name ---------------------------------------------------------------
def test_a_database_role_read_names_its_connection(broker: BrokerThread,
                                                   root: hvac.Client) -> None:
    """hvac's read_role on a postgres mount has Vault's db_name: the mount's one
    connection, which read_connection then finds; a non-database mount's role has none."""
    data = root.secrets.database.read_role("readonly", mount_point="pgc")["data"]
    assert data["db_name"] == "pgc"
    connection = root.secrets.database.read_connection(data["db_name"], mount_point="pgc")
    assert connection["data"]["plugin_name"] == "postgresql-database-plugin"
    conforms("/v1/{mount}/roles/{role}", "GET", raw(broker, "GET", "pgc/roles/readonly"),
             mount="pgc", role="readonly")
    assert "db_name" not in raw(broker, "GET", "noop/roles/r").json()["data"]


# -- 2. rotate-root/{connection} ------------------------------------------------------------
def test_rotate_root_at_another_connection_name_is_a_404_naming_the_mounts(
        broker: BrokerThread, root: hvac.Client) -> None:
    """rotate_root_credentials("other") on mount noop rotates nothing: 404 saying the
    connection is named as the mount, audited; the mount's name rotates."""
    before = len(audit_events(broker, "admin"))
    with pytest.raises(hvac.exceptions.InvalidPath) as wrong:
        root.secrets.database.rotate_root_credentials("other", mount_point="noop")
    (message,) = json.loads(wrong.value.text)["errors"]
    assert "'other'" in message and "noop/rotate-root/noop" in message, message
    (event,) = audit_events(broker, "admin")[before:]
    assert (event["action"], event["outcome"], event["connection"]) == \
        ("rotate_root", "error", "other")
    rotated = root.secrets.database.rotate_root_credentials("noop", mount_point="noop")
    assert rotated["data"]["new_password"]
    assert audit_events(broker, "admin")[-1]["outcome"] == "ok"


def test_rotate_root_checks_the_grant_before_the_connection_name(
        broker: BrokerThread, root: hvac.Client) -> None:
    """A token without update/sudo on the path gets 403 for a wrong name too (it learns
    nothing); one with the grant gets the 404; an unknown mount is the 404 naming it."""
    reader = made_by_root(root, ["tune-read"])
    assert raw(broker, "POST", "noop/rotate-root/other", reader).status_code == 403
    rotator = made_by_root(root, ["rotator"])
    assert raw(broker, "POST", "noop/rotate-root/other", rotator).status_code == 404
    unknown = raw(broker, "POST", "nomount/rotate-root/nomount")
    assert unknown.status_code == 404
    assert unknown.json()["errors"] == ["no mount named 'nomount'"]


# -- 3. sys/auth/NAME/tune ------------------------------------------------------------------
def test_auth_method_tuning_reads_the_token_ttls(broker: BrokerThread,
                                                 root: hvac.Client) -> None:
    """hvac's read_auth_method_tuning: [tokens] max_ttl as max_lease_ttl, the TTL a token
    gets when nothing sets one as default_lease_ttl, under data and at the top level."""
    github = root.sys.read_auth_method_tuning("github")
    expected = {"description": "JWT/OIDC login", "default_lease_ttl": 3600,
                "max_lease_ttl": TOKENS_MAX, "force_no_cache": False,
                "token_type": "default-service"}
    assert github["data"] == expected
    assert {key: github[key] for key in expected} == expected
    token = root.sys.read_auth_method_tuning("token/")  # a trailing slash is ignored
    assert token["data"]["default_lease_ttl"] == token["data"]["max_lease_ttl"] == TOKENS_MAX
    assert token["data"]["description"] == "token based credentials"
    conforms("/v1/sys/auth/{path}/tune", "GET", raw(broker, "GET", "sys/auth/github/tune"),
             path="github")
    with pytest.raises(hvac.exceptions.InvalidPath, match="no auth method named 'gitlab'"):
        root.sys.read_auth_method_tuning("gitlab")


def test_auth_method_tuning_needs_read_and_sudo_as_in_vault(broker: BrokerThread,
                                                            root: hvac.Client) -> None:
    """Read alone on sys/auth/+/tune is refused (Vault's path is root-protected); read and
    sudo, or read on sys/auth, are allowed; the default policy gets 403 for any method."""
    for policies, status in ((["tune-read"], 403), (["tune-sudo"], 200),
                             (["auth-lister"], 200), (["default"], 403)):
        token = made_by_root(root, policies)
        for method in ("github", "no-such-method"):
            resp = raw(broker, "GET", f"sys/auth/{method}/tune", token)
            want = 404 if status == 200 and method == "no-such-method" else status
            assert resp.status_code == want, (policies, method, resp.text)


def test_auth_method_tuning_is_read_only(broker: BrokerThread, root: hvac.Client) -> None:
    """hvac's tune_auth_method is a 405 (Allow: GET) saying where auth methods are set; a
    GET ?list=true is a 405 too."""
    with pytest.raises(hvac.exceptions.UnexpectedError, match=r"config file \(\[auth.jwt"):
        root.sys.tune_auth_method("github", default_lease_ttl="1h")
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        resp = raw(broker, method, "sys/auth/github/tune", json={"max_lease_ttl": "1h"})
        assert resp.status_code == 405 and resp.headers["Allow"] == "GET", (method, resp.text)
    listed = raw(broker, "GET", "sys/auth/github/tune", params={"list": "true"})
    assert listed.status_code == 405 and listed.headers["Allow"] == "GET"


# -- 4. sys/leases/lookup's Allow -----------------------------------------------------------
def test_a_405_on_lease_lookup_lists_every_method_it_serves(broker: BrokerThread,
                                                            root: hvac.Client) -> None:
    """DELETE or a plain GET on sys/leases/lookup: 405 whose Allow is PUT,POST,LIST,GET,
    and each of those is served there (a lookup, or the top-level listing)."""
    for method in ("DELETE", "PATCH", "GET"):
        resp = raw(broker, method, "sys/leases/lookup")
        assert resp.status_code == 405, (method, resp.text)
        assert resp.headers["Allow"] == "PUT,POST,LIST,GET", method
    assert "?list=true" in raw(broker, "GET", "sys/leases/lookup").json()["errors"][0]
    lease = root.read("noop/creds/r")["lease_id"]
    for method in ("PUT", "POST"):
        looked = raw(broker, method, "sys/leases/lookup", json={"lease_id": lease})
        assert looked.status_code == 200 and looked.json()["data"]["id"] == lease
    for method, params in (("LIST", {}), ("GET", {"list": "true"})):
        listed = raw(broker, method, "sys/leases/lookup", params=params)
        assert listed.status_code == 200 and "noop/" in listed.json()["data"]["keys"]
    root.sys.revoke_lease(lease)
