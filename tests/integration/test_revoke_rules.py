"""revoke-prefix, revoke-by and token cascades answered by a revoke rule, over real HTTP.

A real broker (``BrokerThread``: the ``broker server`` wiring, bench no-op
backend) on SQLite and on a PostgreSQL store. ``rule_inline_max = 0`` makes
every revoke of many leases a rule, so a handful of leases exercise the path a
100,000-lease revoke takes. To look at the moment between the answer and the
expansion, a test holds the real store's ``expand_revoke_rule`` back until it
says go, then calls through.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.bench import noop
from broker.bench.harness import broker_config
from broker.config import load_config
from broker.lease import LeaseState
from tests.integration.api_fixtures import audit_lines
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread
from tests.integration.store_fixtures import broker_store_url

pytestmark = pytest.mark.integration

PREFIX = "bench/creds/r/"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return broker_store_url(request, tmp_path)


@pytest.fixture
def broker(tmp_path: Path, store_url: str) -> Iterator[BrokerThread]:
    noop.register()
    thread = BrokerThread(load_config(broker_config(tmp_path, store_url=store_url)),
                          root_token=ROOT_TOKEN).start()
    assert thread.state is not None
    thread.state.engine.rule_inline_max = 0
    try:
        yield thread
    finally:
        thread.stop()


class Session:
    def __init__(self, broker: BrokerThread, token: str = ROOT_TOKEN) -> None:
        self.url = broker.url
        self.http = requests.Session()
        self.http.headers["X-Vault-Token"] = token

    def put(self, path: str, body: dict[str, Any] | None = None) -> requests.Response:
        return self.http.put(f"{self.url}/v1/{path}", json=body or {}, timeout=30)

    def issue(self, token: str | None = None) -> str:
        headers = {"X-Vault-Token": token} if token else {}
        resp = self.http.get(f"{self.url}/v1/bench/creds/r", headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text
        return str(resp.json()["lease_id"])

    def state(self, lease_id: str) -> str:
        resp = self.put("sys/leases/lookup", {"lease_id": lease_id})
        assert resp.status_code == 200, resp.text
        return str(resp.json()["data"]["state"])


def hold_expansion(broker: BrokerThread) -> threading.Event:
    """Hold every expansion step of the real store until the returned event is set."""
    assert broker.state is not None
    store = broker.state.store
    real = store.expand_revoke_rule
    go = threading.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        await asyncio.to_thread(go.wait, 60)
        return await real(*args, **kwargs)

    store.expand_revoke_rule = held  # type: ignore[method-assign]
    return go


def store_states(broker: BrokerThread, ids: list[str]) -> dict[str, str]:
    assert broker.state is not None

    async def read() -> dict[str, str]:
        out = {}
        for lease_id in ids:
            lease = await broker.state.store.get(lease_id)  # type: ignore[union-attr]
            out[lease_id] = "gone" if lease is None else lease.state.value
        return out

    return broker.call(read())


def test_revoke_prefix_by_rule_keeps_its_semantics(broker: BrokerThread) -> None:
    """Between the answer and the expansion: covered leases look up as revoking, their
    renew fails as a revoking lease's does (and is audited), a lease issued after the
    call is untouched, and ``sync=true`` waits until every covered lease has ended."""
    s = Session(broker)
    covered = [s.issue() for _ in range(5)]
    go = hold_expansion(broker)
    answer: dict[str, Any] = {}

    def revoke() -> None:
        resp = s.put(f"sys/leases/revoke-prefix/{PREFIX}", {"sync": True})
        answer.update(status=resp.status_code, body=resp.json())

    caller = threading.Thread(target=revoke)
    caller.start()
    for _ in range(200):
        if s.state(covered[0]) == "revoking":
            break
        caller.join(0.05)
    assert [s.state(i) for i in covered] == ["revoking"] * 5
    later = s.issue()
    assert s.state(later) == "active"

    resp = s.put("sys/leases/renew", {"lease_id": covered[1], "increment": "1h"})
    assert resp.status_code == 400
    assert resp.json()["errors"] == [f"lease {covered[1]} is revoking; it cannot be renewed"]
    renews = [e for e in audit_lines(broker) if e["type"] == "renew"]
    assert [(e["lease"]["id"], e["outcome"]) for e in renews] == [(covered[1], "error")]
    assert s.put("sys/leases/renew", {"lease_id": later}).status_code == 200

    caller.join(1.0)
    assert caller.is_alive(), "sync=true answered before the covered leases had ended"
    go.set()
    caller.join(30)
    assert answer["status"] == 200
    assert answer["body"]["data"] == {"queued": 5, "still_revoking": 0}
    assert answer["body"]["warnings"] is None and answer["body"]["auth"] is None
    assert store_states(broker, [*covered, later]) == {
        **{i: LeaseState.REVOKED.value for i in covered}, later: "active"}


def test_revoke_by_and_token_cascade_by_rule(broker: BrokerThread) -> None:
    """Owner and metadata selectors work through rules: revoke-by a token's metadata,
    and revoking a token revokes its leases (the owner filter)."""
    s = Session(broker)
    made = []
    for run_id in ("7", "7", "8"):
        resp = s.http.post(f"{s.url}/v1/auth/token/create", timeout=30, json={
            "policies": ["root"], "ttl": "1h", "meta": {"run_id": run_id}})
        assert resp.status_code == 200, resp.text
        made.append(resp.json()["auth"])
    leases = [[s.issue(auth["client_token"]) for _ in range(3)] for auth in made]

    resp = s.put("sys/leases/revoke-by", {"metadata": {"run_id": "7"}, "sync": True})
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"] == {"queued": 6, "still_revoking": 0}
    assert set(store_states(broker, leases[0] + leases[1]).values()) == {"revoked"}
    assert set(store_states(broker, leases[2]).values()) == {"active"}

    assert s.put("auth/token/revoke-accessor",
                 {"accessor": made[2]["accessor"]}).status_code in (200, 204)
    assert broker.state is not None
    broker.call(broker.state.engine.expand_revoke_rules())
    for _ in range(200):
        if set(store_states(broker, leases[2]).values()) == {"revoked"}:
            break
        threading.Event().wait(0.05)
    assert set(store_states(broker, leases[2]).values()) == {"revoked"}
