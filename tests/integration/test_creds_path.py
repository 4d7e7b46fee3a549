"""A creds path whose role name decodes to hold a "/" (``%2F``) is refused before
any policy is checked against it.

``/v1/noop/creds/acme-ro%2F..%2Fevil-ro`` used to reach the policy check as
``noop/creds/acme-ro/../evil-ro``, which a glob like ``noop/creds/acme-*``
grants, and only then fail as an unknown role. No role can hold a "/", so
nothing was issued; but a policy must never be matched against a path that
climbs, so the request is now a 400 first.
"""

from __future__ import annotations

import pytest
import requests

from tests.integration.broker_harness import BrokerThread, noop_broker_fixture

pytestmark = pytest.mark.integration

CONFIG = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.acme-ro]
default_ttl = "1h"

[mounts.noop.roles.evil-ro]
default_ttl = "1h"

[policies.acme]
"noop/creds/acme-*" = ["read"]
"""


broker = noop_broker_fixture(CONFIG, "creds-path")


def _get(broker: BrokerThread, token: str, raw_path: str) -> requests.Response:
    return requests.get(f"{broker.url}/v1/{raw_path}", headers={"X-Vault-Token": token},
                        timeout=30)


def test_a_role_name_with_an_encoded_slash_is_refused_before_the_policy(
        broker: BrokerThread) -> None:
    created = requests.post(f"{broker.url}/v1/auth/token/create", json={"policies": ["acme"]},
                            headers={"X-Vault-Token": broker.root_token}, timeout=30)
    token = created.json()["auth"]["client_token"]
    assert _get(broker, token, "noop/creds/acme-ro").status_code == 200
    assert _get(broker, token, "noop/creds/evil-ro").status_code == 403
    for raw in ("noop/creds/acme-ro%2F..%2Fevil-ro", "noop/creds/acme-ro%2fx",
                "noop%2Fx/creds/acme-ro"):
        resp = _get(broker, token, raw)
        assert resp.status_code == 400, (raw, resp.text)
        assert "holds no '/'" in resp.json()["errors"][0]
