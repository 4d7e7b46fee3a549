"""A secret sent in the query string is refused: a URL lands in access and proxy logs.

Every parameter was read from the query as well as the body, on every method,
so ``POST auth/NAME/login?jwt=...`` logged in and ``auth/token/lookup?token=...``
looked a token up with the secret in the URL (security QA). Parameters that
are no secret still may come in the query.
"""

from __future__ import annotations

import pytest
import requests

from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, noop_broker_fixture

pytestmark = pytest.mark.integration

CONFIG = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.r]
default_ttl = "1h"
"""


broker = noop_broker_fixture(CONFIG, "secrets-in-urls")


def _call(broker: BrokerThread, method: str, path: str) -> requests.Response:
    return requests.request(method, f"{broker.url}/v1/{path}",
                            headers={"X-Vault-Token": ROOT_TOKEN}, timeout=30)


@pytest.mark.parametrize(("method", "path", "name"), [
    ("POST", "auth/github/login?role=deploy&jwt=eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "jwt"),
    ("POST", "auth/token/lookup?token=brk.somebodys-token", "token"),
    ("POST", "auth/token/create?id=my-chosen-token-id", "id"),
    ("POST", "auth/token/create?client_token=brk.x", "client_token"),
    ("GET", "noop/creds/r?password=hunter2", "password"),
])
def test_a_secret_in_the_query_is_a_400_naming_it(broker: BrokerThread, method: str,
                                                   path: str, name: str) -> None:
    resp = _call(broker, method, path)
    assert resp.status_code == 400, resp.text
    assert resp.json() == {"errors": [
        f"send {name} in the request body, not in the URL: a query string ends up in "
        "access logs"]}


def test_parameters_that_are_no_secret_still_come_in_the_query(broker: BrokerThread) -> None:
    made = _call(broker, "POST", "auth/token/create?policies=default&ttl=60")
    assert made.status_code == 200, made.text
    assert made.json()["auth"]["lease_duration"] == 60
    issued = _call(broker, "GET", "noop/creds/r?ttl=120")
    assert issued.status_code == 200 and issued.json()["lease_duration"] == 120, issued.text
