"""Lease groups by metadata: revoke-by, search, and meta.KEY filters on stats and list.

Two "CI runs" log in as two tokens carrying different ``run_id`` metadata; the
leases they issue (real PostgreSQL roles) inherit it. Revoking one run must
kill exactly that run's roles and no other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import run
from tests.integration.broker_harness import BrokerThread, start_broker, write_config
from tests.integration.test_api_postgres import pg_mount, role_exists

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Api:
    broker: BrokerThread

    def call(self, method: str, path: str, *, token: str | None = None,
             **kwargs: Any) -> requests.Response:
        return requests.request(method, f"{self.broker.url}/v1/{path}",
                                headers={"X-Vault-Token": token or self.broker.root_token},
                                timeout=60, **kwargs)

    def ok(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        resp = self.call(method, path, **kwargs)
        assert resp.status_code == 200, resp.text
        data: dict[str, Any] = resp.json()
        return data

    def run_token(self, run_id: str) -> str:
        """A CI run's token: policy app, metadata run_id (copied into every lease it issues)."""
        auth = self.ok("POST", "auth/token/create",
                       json={"policies": ["app"], "meta": {"run_id": run_id}})["auth"]
        return str(auth["client_token"])

    def own_run_token(self, run_id: str) -> str:
        """A run's token whose policy may revoke-by its own run_id only."""
        auth = self.ok("POST", "auth/token/create",
                       json={"policies": ["own-run"], "meta": {"run_id": run_id}})["auth"]
        return str(auth["client_token"])

    def issue(self, token: str, role: str = "readonly") -> tuple[str, str]:
        body = self.ok("GET", f"pg/creds/{role}", token=token)
        return str(body["lease_id"]), str(body["data"]["username"])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_"))}
        env |= {"BROKER_ADDR": self.broker.url, "BROKER_TOKEN": self.broker.root_token,
                "PYTHONPATH": str(REPO)}
        return subprocess.run([sys.executable, "-m", "broker.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)


@pytest.fixture
def api(tmp_path: Path, postgres_dsn: str) -> Iterator[Api]:
    # "short" gets statements too, so two roles of one run can differ by prefix.
    config = pg_mount(postgres_dsn).replace('[mounts.pg.roles.short]\n', '''[mounts.pg.roles.short]
creation_statements = ["CREATE ROLE \\"{{name}}\\" WITH LOGIN PASSWORD '{{password}}'"]
''').replace('"pg/creds/readonly" = ["read"]', '"pg/creds/*" = ["read"]')
    # A CI role's cleanup policy: revoke-by limited to the token's own run.
    config += """
[policies.own-run]
"pg/creds/*" = ["read"]
"sys/leases/revoke-by/run_id/{{identity.metadata.run_id}}" = ["update"]

# The same, where two CI systems number their runs alike: the site must match too.
[policies.own-site-run]
"pg/creds/*" = ["read"]
"sys/leases/revoke-by/site/{{identity.metadata.site}}/run_id/{{identity.metadata.run_id}}" = ["update"]
"""
    server = start_broker(write_config(tmp_path, config))
    yield Api(server)
    requests.put(f"{server.url}/v1/sys/leases/revoke-prefix/pg/", json={"sync": True},
                 headers={"X-Vault-Token": server.root_token}, timeout=120)
    server.stop()


def exists(dsn: str, user: str) -> bool:
    return bool(run(role_exists(dsn, user)))


def test_revoke_by_run_id_kills_exactly_that_runs_leases(api: Api, postgres_dsn: str) -> None:
    """revoke-by metadata run_id=A revokes A's roles and leaves B's alive; stats agree."""
    a, b = api.run_token("A"), api.run_token("B")
    a_users = [api.issue(a)[1] for _ in range(2)]
    b_lease, b_user = api.issue(b)
    looked = api.ok("PUT", "sys/leases/lookup", json={"lease_id": b_lease})
    assert looked["data"]["metadata"] == {"run_id": "B"}

    body = api.ok("PUT", "sys/leases/revoke-by", json={"metadata": {"run_id": "A"}, "sync": True})
    assert body["data"] == {"queued": 2, "still_revoking": 0}
    assert [exists(postgres_dsn, u) for u in a_users] == [False, False]
    assert exists(postgres_dsn, b_user)

    stats_a = api.ok("GET", "sys/leases/stats", params={"meta.run_id": "A"})["data"]
    stats_b = api.ok("GET", "sys/leases/stats", params={"meta.run_id": "B"})["data"]
    assert (stats_a["active"], stats_a["revoked"]) == (0, 2)
    assert (stats_b["active"], stats_b["revoked"]) == (1, 0)
    audit = [json.loads(line) for line in Path(api.broker.audit_path).read_text().splitlines()]
    admin = [e for e in audit if e["type"] == "admin" and e.get("action") == "revoke-by"]
    assert len(admin) == 1 and admin[0]["metadata"] == {"run_id": "A"}
    assert admin[0]["queued"] == 2


def test_prefix_narrows_a_metadata_selector(api: Api, postgres_dsn: str) -> None:
    """metadata plus prefix revokes only the run's leases under that prefix."""
    token = api.run_token("C")
    _, ro_user = api.issue(token, "readonly")
    _, short_user = api.issue(token, "short")
    body = api.ok("POST", "sys/leases/revoke-by",
                  json={"metadata": {"run_id": "C"}, "prefix": "pg/creds/short/", "sync": True})
    assert body["data"]["queued"] == 1
    assert not exists(postgres_dsn, short_user) and exists(postgres_dsn, ro_user)


def test_search_and_list_filter_by_metadata(api: Api) -> None:
    """search returns full rows of one run only (paged); the LIST endpoint filters too."""
    a, b = api.run_token("A"), api.run_token("B")
    a_ids = sorted(api.issue(a)[0] for _ in range(3))
    b_id, _ = api.issue(b)

    rows = api.ok("GET", "sys/leases/search", params={"meta.run_id": "A"})["data"]["leases"]
    assert [r["lease_id"] for r in rows] == a_ids
    assert {(r["mount"], r["role"], r["state"]) for r in rows} == {("pg", "readonly", "active")}
    assert all(r["metadata"] == {"run_id": "A"} and r["owner"] and r["expire_time"]
               for r in rows)
    first = api.ok("GET", "sys/leases/search", params={"meta.run_id": "A", "limit": 2})["data"]
    assert [r["lease_id"] for r in first["leases"]] == a_ids[:2]
    rest = api.ok("GET", "sys/leases/search",
                  params={"meta.run_id": "A", "limit": 2, "after": first["next_after"]})["data"]
    assert [r["lease_id"] for r in rest["leases"]] == a_ids[2:] and rest["next_after"] is None

    keys = api.ok("GET", "sys/leases/lookup/pg/creds/readonly/",
                  params={"list": "true", "meta.run_id": "B"})["data"]["keys"]
    assert keys == [b_id.rsplit("/", 1)[1]]
    listed = api.ok("LIST", "sys/leases/lookup/pg/creds/readonly",
                    params={"meta.run_id": "A"})["data"]["keys"]
    assert sorted(listed) == [i.rsplit("/", 1)[1] for i in a_ids]
    none = api.call("GET", "sys/leases/lookup/pg/", params={"list": "true", "meta.run_id": "Z"})
    assert none.status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "needle"),
    [
        ("PUT", "sys/leases/revoke-by", {"json": {}}, "empty selector"),
        ("PUT", "sys/leases/revoke-by", {"json": {"metadata": {}, "prefix": ""}},
         "empty selector"),
        ("PUT", "sys/leases/revoke-by", {"json": {"metadata": {"bad key": "x"}}},
         "metadata key"),
        ("PUT", "sys/leases/revoke-by", {"json": {"metadata": {"run_id": ["1"]}}},
         "must be a string"),
        ("PUT", "sys/leases/revoke-by", {"json": {"metadata": "run_id=1"}}, "must be an object"),
        ("GET", "sys/leases/stats", {"params": {"meta.bad'key": "x"}}, "metadata key"),
        ("GET", "sys/leases/search", {"params": {"meta.$x": "x"}}, "metadata key"),
        ("GET", "sys/leases/search", {"params": {"meta.": "x"}}, "empty metadata key"),
        ("GET", "sys/leases/search", {"params": {"state": "alive"}}, "state must be"),
        ("GET", "sys/leases/search", {"params": [("meta.a", "1"), ("meta.a", "2")]},
         "more than once"),
        ("GET", "sys/leases/lookup/pg/", {"params": {"list": "true", "meta.a b": "1"}},
         "metadata key"),
    ],
)
def test_bad_selectors_are_400(api: Api, method: str, path: str, kwargs: dict[str, Any],
                               needle: str) -> None:
    """An empty selector, a bad metadata key or value is a 400 with a reason, never a 500."""
    resp = api.call(method, path, **kwargs)
    assert resp.status_code == 400, resp.text
    assert needle in resp.json()["errors"][0]


def test_revoke_by_and_search_need_their_capabilities(api: Api, postgres_dsn: str) -> None:
    """A run's own token may not revoke-by or search (403); nothing is revoked."""
    token = api.run_token("A")
    _, user = api.issue(token)
    denied = api.call("PUT", "sys/leases/revoke-by", token=token,
                      json={"metadata": {"run_id": "A"}})
    assert denied.status_code == 403
    # A malformed body is 403 too for a caller without the capability (400 is for root).
    malformed = api.call("PUT", "sys/leases/revoke-by", token=token, json={"metadata": "A"})
    assert malformed.status_code == 403, malformed.text
    assert api.call("GET", "sys/leases/search", token=token).status_code == 403
    assert exists(postgres_dsn, user)


def test_a_templated_policy_limits_revoke_by_to_the_tokens_own_run(
    api: Api, postgres_dsn: str
) -> None:
    """update on sys/leases/revoke-by/run_id/{{identity.metadata.run_id}} lets a run end its
    own leases; another run's selector, force, and a selector without that pair are 403."""
    mine, theirs = api.own_run_token("R1"), api.own_run_token("R2")
    _, my_user = api.issue(mine)
    _, their_user = api.issue(theirs)

    for body in ({"metadata": {"run_id": "R2"}},  # another run
                 {"metadata": {"run_id": "R1"}, "force": True},  # break-glass needs more
                 {"prefix": "pg/"},  # no run_id in the selector
                 {"metadata": {"run_id": "R1/../R2"}}):  # a "/" never takes the narrow path
        denied = api.call("PUT", "sys/leases/revoke-by", token=mine, json=body)
        assert denied.status_code == 403, (body, denied.text)
        assert "sys/leases/revoke-by" in denied.json()["errors"][0]
    assert exists(postgres_dsn, my_user) and exists(postgres_dsn, their_user)

    # Its own run, narrowed further by a prefix: still only its own leases.
    ok = api.call("PUT", "sys/leases/revoke-by", token=mine,
                  json={"metadata": {"run_id": "R1"}, "prefix": "pg/", "sync": True})
    assert ok.status_code == 200, ok.text
    assert ok.json()["data"] == {"queued": 1, "still_revoking": 0}
    assert not exists(postgres_dsn, my_user)
    assert exists(postgres_dsn, their_user)
    audit = [json.loads(line) for line in Path(api.broker.audit_path).read_text().splitlines()]
    denials = [e for e in audit if e["type"] == "policy_denied"
               and e.get("checked_path") == "sys/leases/revoke-by"]
    assert len(denials) == 4


def test_a_two_pair_grant_needs_both_pairs_in_the_selector(
    api: Api, postgres_dsn: str
) -> None:
    """update on sys/leases/revoke-by/site/{{..site}}/run_id/{{..run_id}}: two sites whose
    runs are numbered alike; a run of site a may end its own leases only with a selector
    naming both its site and its run (pairs in either order), never site b's run R1."""
    def token(site: str) -> str:
        auth = api.ok("POST", "auth/token/create",
                      json={"policies": ["own-site-run"], "meta": {"site": site, "run_id": "R1"}})
        return str(auth["auth"]["client_token"])

    mine, theirs = token("a"), token("b")
    _, my_user = api.issue(mine)
    _, their_user = api.issue(theirs)
    for meta in ({"run_id": "R1"},  # the run alone would reach site b's run R1 too
                 {"site": "a"},  # the site alone: every run of it
                 {"run_id": "R1", "site": "b"}):  # the other site's run
        denied = api.call("PUT", "sys/leases/revoke-by", token=mine, json={"metadata": meta})
        assert denied.status_code == 403, (meta, denied.text)
    assert exists(postgres_dsn, my_user) and exists(postgres_dsn, their_user)

    ok = api.call("PUT", "sys/leases/revoke-by", token=mine,
                  json={"metadata": {"run_id": "R1", "site": "a"}, "sync": True})
    assert ok.status_code == 200, ok.text
    assert ok.json()["data"]["queued"] == 1
    assert not exists(postgres_dsn, my_user)
    assert exists(postgres_dsn, their_user)


def test_cli_lease_revoke_and_list_by_meta(api: Api, postgres_dsn: str) -> None:
    """`broker lease list --meta` shows one run; `broker lease revoke --meta` revokes it
    with a summary, leaving the other run alone."""
    a, b = api.run_token("A"), api.run_token("B")
    a_id, a_user = api.issue(a)
    b_id, b_user = api.issue(b)

    listed = api.cli("lease", "list", "--meta", "run_id=A")
    assert (listed.returncode, listed.stdout) == (0, f"{a_id}\n"), listed.stderr
    rows = json.loads(api.cli("lease", "list", "--meta", "run_id=B", "--format", "json").stdout)
    assert [(r["lease_id"], r["metadata"]) for r in rows] == [(b_id, {"run_id": "B"})]

    done = api.cli("lease", "revoke", "--meta", "run_id=A")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("revoked 1, irrevocable 0, in ")
    assert not exists(postgres_dsn, a_user) and exists(postgres_dsn, b_user)
    assert api.cli("lease", "list", "--meta", "run_id=A").stdout == ""
    dead = json.loads(api.cli("lease", "list", "--meta", "run_id=A", "--all",
                              "--format", "json").stdout)
    assert [(r["lease_id"], r["state"]) for r in dead] == [(a_id, "revoked")]
