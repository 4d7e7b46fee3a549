"""Vault's response envelope on every enveloped answer, and Vault's 204 for a lease
that is already gone, against a real broker issuing real PostgreSQL roles.

Vault writes ``request_id``, ``lease_id``, ``renewable``, ``lease_duration``,
``data``, ``wrap_info``, ``warnings`` and ``auth`` on every answer
(sdk/logical/translate_response.go); strict clients (vaultrs' ``EndpointResult``)
fail to parse an answer without them, where hvac did not notice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from tests.integration.broker_harness import BrokerThread, start_broker, write_config
from tests.integration.test_api_postgres import pg_mount

pytestmark = pytest.mark.integration

ENVELOPE = ("request_id", "lease_id", "renewable", "lease_duration", "data", "wrap_info",
            "warnings", "auth")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, postgres_dsn: str) -> Iterator[BrokerThread]:
    server = start_broker(write_config(tmp_path_factory.mktemp("envelope"),
                                       pg_mount(postgres_dsn)))
    yield server
    # Leave no role behind on the shared server.
    requests.put(f"{server.url}/v1/sys/leases/revoke-prefix/pg/", json={"sync": True},
                 headers={"X-Vault-Token": server.root_token}, timeout=120)
    server.stop()


def call(broker: BrokerThread, method: str, path: str, token: str | None = None,
         **kwargs: Any) -> requests.Response:
    return requests.request(method, f"{broker.url}/v1/{path}",
                            headers={"X-Vault-Token": token or broker.root_token},
                            timeout=30, **kwargs)


def enveloped(resp: requests.Response) -> dict[str, Any]:
    """The answer's body, after checking it is a 2xx with every envelope field."""
    assert resp.ok, resp.text
    body: dict[str, Any] = resp.json()
    missing = [key for key in ENVELOPE if key not in body]
    assert not missing, f"{resp.request.method} {resp.url}: no {missing} in {body}"
    return body


def test_every_enveloped_answer_has_all_of_vaults_fields(broker: BrokerThread) -> None:
    lease = enveloped(call(broker, "GET", "pg/creds/readonly"))
    assert lease["lease_id"].startswith("pg/creds/readonly/") and lease["renewable"] is True
    assert lease["lease_duration"] == 3600 and lease["auth"] is None
    lease_id = lease["lease_id"]

    made = enveloped(call(broker, "POST", "auth/token/create",
                          json={"policies": ["app"], "ttl": "1h"}))
    token, accessor = made["auth"]["client_token"], made["auth"]["accessor"]
    assert made["data"] is None and made["lease_id"] == "" and made["lease_duration"] == 0

    answers = {
        "lease lookup": call(broker, "PUT", "sys/leases/lookup", json={"lease_id": lease_id}),
        "lease renew": call(broker, "PUT", "sys/leases/renew",
                            json={"lease_id": lease_id, "increment": 600}),
        "lease list": call(broker, "LIST", "sys/leases/lookup/pg/creds/readonly/"),
        "lease stats": call(broker, "GET", "sys/leases/stats"),
        "revoke-prefix": call(broker, "PUT", "sys/leases/revoke-prefix/pg/creds/short/"),
        "lookup-self": call(broker, "GET", "auth/token/lookup-self", token=token),
        "lookup": call(broker, "POST", "auth/token/lookup", json={"token": token}),
        "lookup-accessor": call(broker, "POST", "auth/token/lookup-accessor",
                                json={"accessor": accessor}),
        "renew-self": call(broker, "POST", "auth/token/renew-self", token=token),
        "accessors": call(broker, "LIST", "auth/token/accessors"),
        "roles": call(broker, "LIST", "pg/roles"),
        "role": call(broker, "GET", "pg/roles/readonly"),
        "sys/mounts": call(broker, "GET", "sys/mounts"),
        "sys/auth": call(broker, "GET", "sys/auth"),
        "capabilities-self": call(broker, "POST", "sys/capabilities-self",
                                  json={"paths": ["pg/creds/readonly"]}, token=token),
        "ui mounts": call(broker, "GET", "sys/internal/ui/mounts/pg", token=token),
    }
    bodies = {name: enveloped(resp) for name, resp in answers.items()}
    assert bodies["lease renew"]["lease_id"] == lease_id
    assert bodies["lease renew"]["lease_duration"] == 600
    assert bodies["renew-self"]["auth"]["accessor"] == accessor
    for name in ("lease lookup", "lease list", "roles", "role", "lookup-self"):
        assert bodies[name]["lease_id"] == "" and bodies[name]["renewable"] is False, name
        assert bodies[name]["auth"] is None and bodies[name]["wrap_info"] is None, name
    call(broker, "PUT", "sys/leases/revoke", json={"lease_id": lease_id})


def test_token_lookups_carry_vaults_entity_id_and_issue_time(broker: BrokerThread) -> None:
    made = call(broker, "POST", "auth/token/create", json={"policies": ["app"]}).json()["auth"]
    for resp in (call(broker, "GET", "auth/token/lookup-self", token=made["client_token"]),
                 call(broker, "POST", "auth/token/lookup-accessor",
                      json={"accessor": made["accessor"]})):
        data = enveloped(resp)["data"]
        assert data["entity_id"] == ""
        issued = datetime.fromisoformat(data["issue_time"].replace("Z", "+00:00"))
        assert abs(issued.timestamp() - data["creation_time"]) < 1
        assert abs(time.time() - issued.timestamp()) < 300


def test_sys_mounts_has_vaults_mount_fields_and_the_top_level_copy(
        broker: BrokerThread) -> None:
    body = enveloped(call(broker, "GET", "sys/mounts"))
    entry = body["data"]["pg/"]
    assert body["pg/"] == entry  # Vault's older clients read the top level
    for key in ("type", "description", "accessor", "uuid", "config", "local", "seal_wrap",
                "external_entropy_access", "options", "plugin_version"):
        assert key in entry, key
    assert entry["config"] == {"default_lease_ttl": 0, "max_lease_ttl": 0,
                               "force_no_cache": False}
    assert entry["type"] == "postgres" and entry["roles"] == ["readonly", "short"]
    # The same mount, the same identity, on the narrower path.
    ui = enveloped(call(broker, "GET", "sys/internal/ui/mounts/pg"))["data"]
    assert (ui["accessor"], ui["uuid"]) == (entry["accessor"], entry["uuid"])


def test_revoking_a_lease_that_is_gone_is_vaults_204(broker: BrokerThread) -> None:
    """Unknown (never issued, or its tombstone purged): 204 as in Vault, where it was a
    400 that hvac raised as InvalidRequest; strict=true keeps the 400 for the CLI."""
    client = hvac.Client(url=broker.url, token=broker.root_token)
    unknown = "pg/creds/readonly/no-such-lease"
    resp = client.sys.revoke_lease(unknown)
    assert resp.status_code == 204 and not resp.content
    strict = call(broker, "PUT", "sys/leases/revoke",
                  json={"lease_id": unknown, "strict": True})
    assert strict.status_code == 400
    assert strict.json() == {"errors": [f"invalid lease: {unknown} is not known"]}
    # sync=false: Vault's LazyRevoke answers 202 whatever it found.
    lazy = call(broker, "PUT", "sys/leases/revoke", json={"lease_id": unknown, "sync": False})
    assert lazy.status_code == 202 and enveloped(lazy)["data"] == {"queued": 0}
    audited = [json.loads(line) for line in Path(broker.audit_path).read_text().splitlines()]
    assert [e for e in audited if e["type"] == "revoke_request"
            and e.get("outcome") == "nothing_to_revoke"
            and (e.get("lease") or {}).get("id") == unknown]
    # Still no answer without a lease id, and nothing without a valid token: not an
    # invalid one, nor a revoked one (a dead token is a reuse attempt too, never a 204).
    missing = call(broker, "PUT", "sys/leases/revoke", json={})
    assert missing.status_code == 400 and "lease_id" in missing.text
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=broker.url, token="not-a-token").sys.revoke_lease(unknown)
    dead = client.auth.token.create(policies=["app"], ttl="10m")["auth"]["client_token"]
    client.auth.token.revoke(dead)
    with pytest.raises(hvac.exceptions.Forbidden, match="token is revoked"):
        hvac.Client(url=broker.url, token=dead).sys.revoke_lease(unknown)


def test_a_bad_strict_is_refused_on_a_live_lease_too(broker: BrokerThread) -> None:
    lease = call(broker, "GET", "pg/creds/readonly").json()["lease_id"]
    bad = call(broker, "PUT", "sys/leases/revoke", json={"lease_id": lease, "strict": "maybe"})
    assert bad.status_code == 400 and "strict" in bad.text
    assert call(broker, "PUT", "sys/leases/lookup",
                json={"lease_id": lease}).json()["data"]["state"] == "active"
    assert call(broker, "PUT", "sys/leases/revoke", json={"lease_id": lease}).status_code == 204


def test_a_live_lease_of_another_token_is_still_refused(broker: BrokerThread) -> None:
    """The 204 is for leases that are gone; someone else's live lease stays a 403."""
    root = hvac.Client(url=broker.url, token=broker.root_token)
    theirs = root.secrets.database.generate_credentials("readonly", mount_point="pg")
    app_token = root.auth.token.create(policies=["app"], ttl="10m")["auth"]["client_token"]
    app = hvac.Client(url=broker.url, token=app_token)
    with pytest.raises(hvac.exceptions.Forbidden, match="belongs to another token"):
        app.sys.revoke_lease(theirs["lease_id"])
    looked = root.sys.read_lease(theirs["lease_id"])
    assert looked["data"]["state"] == "active"
    root.sys.revoke_lease(theirs["lease_id"])
