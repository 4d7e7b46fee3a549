"""Unauthenticated failures cannot flood the audit log: their lines pass a token bucket per
client address (BURST at once, then RATE a second), and what it holds back is written
as one ``auth_failure`` / ``suppressed`` summary line with the count. The answers do not
change, and authenticated actions are never held back.

A real broker (in-process, real HTTP). Each test sends from its own loopback address
(127.0.0.N: Linux routes all of 127/8 to lo), so each has its own bucket.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.api import audit_limit
from broker.api.audit_limit import BURST, RATE, SUMMARY_AFTER, client_key
from broker.audit import AuditLog
from broker.audit_verify import verify_file
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, noop_broker

pytestmark = pytest.mark.integration

CONFIG = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.a]
default_ttl = "1h"

[policies.nothing]
"secret/never" = ["read"]
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with noop_broker(tmp_path_factory.mktemp("hygiene-audit"), CONFIG) as server:
        yield server


class From:
    """HTTP/1.1 to the broker from source address ``source`` on one kept-alive connection."""

    def __init__(self, broker: BrokerThread, source: str) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", broker.config.server.port,
                                                timeout=30, source_address=(source, 0))

    def call(self, method: str, path: str, token: str | None = None,
             body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["X-Vault-Token"] = token
        self._conn.request(method, f"/v1/{path}", body=json.dumps(body or {}), headers=headers)
        resp = self._conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}

    def close(self) -> None:
        self._conn.close()


def events(broker: BrokerThread) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(broker.audit_path).read_text().splitlines()]


def of(source: str) -> Callable[[dict[str, Any]], bool]:
    """Whether an event came from ``source`` (its request block's remote_addr)."""
    return lambda e: (e.get("request") or {}).get("remote_addr") == source


def summaries(broker: BrokerThread, source: str) -> list[dict[str, Any]]:
    return [e for e in events(broker) if of(source)(e) and e["outcome"] == "suppressed"]


def wait_for_summary(broker: BrokerThread, source: str, timeout: float = 60) -> dict[str, Any]:
    """The (first) summary line of ``source``: written SUMMARY_AFTER seconds after the
    first held-back line; polled with a generous deadline."""
    deadline = time.monotonic() + timeout
    while not (found := summaries(broker, source)):
        assert time.monotonic() < deadline, "no summary line"
        time.sleep(0.2)
    return found[0]


def flood(client: From, n: int, send: Callable[[From], tuple[int, dict[str, Any]]],
          status: int) -> float:
    """Send ``n`` failing requests; every answer is ``status``. Returns the seconds taken."""
    start = time.monotonic()
    for _ in range(n):
        got, body = send(client)
        assert got == status and body.get("errors"), (got, body)
    return time.monotonic() - start


def test_a_bad_token_flood_is_summarised(broker: BrokerThread) -> None:
    """BURST*3 requests with a bad token, all 403: at most BURST (+ the refill while
    they ran) are audited line by line, each with its request line; one summary line
    counts the rest, so audited + summarised = sent; the chain still verifies."""
    source, n = "127.0.0.2", BURST * 3
    client = From(broker, source)
    took = flood(client, n, lambda c: c.call("GET", "noop/creds/a", token="not-a-token"), 403)
    client.close()
    summary = wait_for_summary(broker, source)
    mine = [e for e in events(broker) if of(source)(e)]
    audited = [e for e in mine if e["type"] == "auth_failure" and e["outcome"] == "denied"]
    assert len([e for e in mine if e["type"] == "request"]) == len(audited)
    assert BURST <= len(audited) <= BURST + RATE * took + 1, (len(audited), took)
    assert summary["type"] == "auth_failure" and summary["count"] == n - len(audited)
    assert summary["types"] == {"auth_failure": summary["count"]}
    assert summary["window"]["from"] <= summary["window"]["to"]
    assert summary["limit"] == {"burst": BURST, "per_second": RATE}
    assert len(summaries(broker, source)) == 1
    assert verify_file(broker.audit_path, None).ok


def test_a_failed_login_flood_is_summarised(broker: BrokerThread) -> None:
    """Failed logins (here to an auth method that does not exist: 404) go through the
    same limit and get the same summary; the answers do not change."""
    source = "127.0.0.3"
    client = From(broker, source)
    took = flood(client, BURST * 2, lambda c: c.call("POST", "auth/nosuch/login",
                                                     body={"role": "r", "jwt": "x.y.z"}), 404)
    client.close()
    summary = wait_for_summary(broker, source)
    audited = [e for e in events(broker) if of(source)(e) and e["type"] == "auth_failure"
               and e["outcome"] == "denied"]
    assert BURST <= len(audited) <= BURST + RATE * took + 1
    assert summary["count"] == BURST * 2 - len(audited)


def test_each_client_has_its_own_bucket(broker: BrokerThread) -> None:
    """One client's flood does not hold back another client's first failure."""
    flooder, other = From(broker, "127.0.0.4"), From(broker, "127.0.0.5")
    flood(flooder, BURST * 2, lambda c: c.call("GET", "noop/creds/a", token="bad"), 403)
    assert other.call("GET", "noop/creds/a", token="other-bad")[0] == 403
    flooder.close()
    other.close()
    failures = [e for e in events(broker) if of("127.0.0.5")(e) and e["type"] == "auth_failure"]
    assert [e["outcome"] for e in failures] == ["denied"]


def test_authenticated_actions_are_never_held_back(broker: BrokerThread) -> None:
    """Right after a flood empties this client's bucket: every issue, renew, revoke and
    every policy denial of a valid token is audited, line by line."""
    source, n = "127.0.0.6", BURST + 20
    client = From(broker, source)
    flood(client, BURST * 2, lambda c: c.call("GET", "noop/creds/a", token="bad"), 403)
    status, made = client.call("POST", "auth/token/create", ROOT_TOKEN,
                               {"policies": ["nothing"], "ttl": "1h"})
    assert status == 200, made
    weak = made["auth"]["client_token"]
    before = len(events(broker))
    for _ in range(n):
        status, issued = client.call("GET", "noop/creds/a", ROOT_TOKEN)
        assert status == 200, issued
        lease = {"lease_id": issued["lease_id"]}
        assert client.call("PUT", "sys/leases/renew", ROOT_TOKEN, lease)[0] == 200
        assert client.call("PUT", "sys/leases/revoke", ROOT_TOKEN, lease)[0] == 204
        assert client.call("GET", "noop/creds/a", weak)[0] == 403  # policy_denied
    client.close()
    new = [e for e in events(broker)[before:] if of(source)(e)]
    counts = {t: sum(1 for e in new if e["type"] == t)
              for t in ("issue", "renew", "revoke_request", "policy_denied")}
    assert counts == dict.fromkeys(counts, n), counts
    assert sum(1 for e in new if e["type"] == "request") == 4 * n


def test_held_back_lines_are_summarised_at_shutdown(tmp_path: Path) -> None:
    """A broker stopped before the summary is due writes it as it stops."""
    with noop_broker(tmp_path, CONFIG) as server:
        client = From(server, "127.0.0.7")
        took = flood(client, BURST * 2, lambda c: c.call("GET", "noop/creds/a", token="bad"),
                     403)
        client.close()
        if took < SUMMARY_AFTER / 2:  # (a very slow run may have reached the timer's)
            assert summaries(server, "127.0.0.7") == []
    summary = summaries(server, "127.0.0.7")
    assert len(summary) == 1 and summary[0]["count"] > 0
    audited = [e for e in events(server) if of("127.0.0.7")(e) and e["outcome"] == "denied"]
    assert len(audited) + summary[0]["count"] == BURST * 2


def test_client_addresses_share_a_bucket_as_one_host_would() -> None:
    """An IPv6 client is counted per /64 (one host owns all of it), an IPv4-mapped
    address as the IPv4 one, a transport without an address as "unknown"."""
    assert client_key("127.0.0.1") == "127.0.0.1"
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff:2") == "2001:db8::/64"
    assert client_key("2001:db8:0:1::1") != client_key("2001:db8::1")
    assert client_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert client_key(None) == "unknown"


def test_more_clients_than_buckets_share_the_overflow_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_CLIENTS busy buckets, new clients share one ("other clients"), and what
    it holds back still gets its summary line."""
    monkeypatch.setattr(audit_limit, "MAX_CLIENTS", 2)

    async def run() -> list[dict[str, Any]]:
        log = await AuditLog.open(str(tmp_path / "audit.jsonl"), str(tmp_path / "audit.key"),
                                  create_key=True)
        limiter = audit_limit.FailureAuditLimiter(log, burst=1, rate=0.001, summary_after=0.05)
        for client in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
            if not limiter.admit(client):
                limiter.hold(client, "auth_failure")
        deadline = time.monotonic() + 30
        while not (lines := [json.loads(line) for line in
                             (tmp_path / "audit.jsonl").read_text().splitlines()]):
            assert time.monotonic() < deadline, "no summary line"
            await asyncio.sleep(0.05)
        await limiter.close()
        await log.close()
        return lines

    lines = asyncio.run(run())
    assert [(e["request"]["remote_addr"], e["count"]) for e in lines] == [("other clients", 1)]


def test_a_revoked_tokens_use_is_never_held_back(broker: BrokerThread) -> None:
    """A flood of bad tokens empties the client's bucket; the use of a revoked token from
    the same address right after is still audited in full (reuse_attempt with its
    accessor's HMAC): the line that names a leaked token must not become a count."""
    source = "127.0.0.9"
    client = From(broker, source)
    status, body = client.call("POST", "auth/token/create", token=ROOT_TOKEN,
                               body={"policies": ["nothing"], "ttl": "1h"})
    assert status == 200, body
    stolen, accessor = body["auth"]["client_token"], body["auth"]["accessor"]
    assert client.call("POST", "auth/token/revoke-self", token=stolen)[0] == 204
    flood(client, BURST * 2, lambda c: c.call("GET", "noop/creds/a", token="not-a-token"), 403)
    status, body = client.call("GET", "noop/creds/a", token=stolen)
    client.close()
    assert status == 403 and "revoked" in body["errors"][0], body
    hashed = broker.state.audit.hmac(accessor) if broker.state else accessor
    reuse = [e for e in events(broker)
             if of(source)(e) and e["type"] == "reuse_attempt"]
    assert [e.get("token_accessor") for e in reuse] == [hashed], reuse
