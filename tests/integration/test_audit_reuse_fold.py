"""Whoever holds an ended (revoked or expired) token cannot write unlimited audit lines
with it: the first REUSE_BURST uses of one token accessor are audited line by line
(``request`` + ``reuse_attempt``), the rest of the window are counted, and ONE
``reuse_attempt`` / ``suppressed`` line (the accessor's HMAC, the count, the time
span, the client addresses) is written at the end of the window. The answer (403)
never changes, and the first use of every other ended token is still written in full.

A real broker (in-process, real HTTP), its reuse window shortened so that a summary
comes within the test.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.api import audit_limit
from broker.audit import AuditLog
from broker.audit_verify import verify_file
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, noop_broker
from tests.integration.test_security_hygiene_audit_limit import CONFIG, From, events, of

pytestmark = pytest.mark.integration

BURST = 20  # audit_limit.REUSE_BURST, as the brief and the docs state it
WINDOW = 4.0  # seconds: the test's reuse window (60 s in a real broker)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with pytest.MonkeyPatch.context() as patch:
        # Read when the broker's state makes its limiter (raising=False: the old code
        # had no such figure, and must fail on the assertions, not here).
        patch.setattr(audit_limit, "REUSE_BURST", BURST, raising=False)
        patch.setattr(audit_limit, "REUSE_WINDOW", WINDOW, raising=False)
        with noop_broker(tmp_path_factory.mktemp("reuse-fold"), CONFIG) as server:
            yield server


def ended_token(client: From) -> tuple[str, str]:
    """A token made and revoked at once: (its value, its accessor)."""
    status, body = client.call("POST", "auth/token/create", token=ROOT_TOKEN,
                               body={"policies": ["nothing"], "ttl": "1h"})
    assert status == 200, body
    token, accessor = body["auth"]["client_token"], body["auth"]["accessor"]
    assert client.call("POST", "auth/token/revoke-self", token=token)[0] == 204
    return token, accessor


def hashed(broker: BrokerThread, accessor: str) -> str:
    assert broker.state is not None
    return broker.state.audit.hmac(accessor)


def reuse_lines(broker: BrokerThread, accessor_hmac: str, outcome: str) -> list[dict[str, Any]]:
    return [e for e in events(broker) if e["type"] == "reuse_attempt"
            and e["outcome"] == outcome and e.get("token_accessor") == accessor_hmac]


def wait_for_count(broker: BrokerThread, accessor_hmac: str, expected: int,
                   timeout: float = 60) -> list[dict[str, Any]]:
    """The summary lines of ``accessor_hmac`` once their counts add up to ``expected``
    (one per window: a slow run may span two)."""
    deadline = time.monotonic() + timeout
    while True:
        found = reuse_lines(broker, accessor_hmac, "suppressed")
        if sum(e["count"] for e in found) >= expected:
            return found
        assert time.monotonic() < deadline, (expected, found)
        time.sleep(0.2)


def test_a_flood_with_one_ended_token_is_folded(broker: BrokerThread) -> None:
    """200 uses of one revoked token, all 403: about REUSE_BURST are audited in pairs
    (request + reuse_attempt), the rest are counted in reuse_attempt / suppressed lines
    naming the accessor's HMAC, the addresses and the window; audited + counted = sent.
    Another ended token used right after still gets its line; the chain verifies."""
    source, n = "127.0.0.41", 200
    client = From(broker, source)
    token, accessor = ended_token(client)
    other_token, other_accessor = ended_token(client)
    start = time.monotonic()
    for _ in range(n):
        status, body = client.call("GET", "noop/creds/a", token=token)
        assert status == 403 and "revoked" in body["errors"][0], body
    took = time.monotonic() - start
    status, body = client.call("GET", "noop/creds/a", token=other_token)
    assert status == 403 and "revoked" in body["errors"][0], body
    client.close()

    mine = hashed(broker, accessor)
    audited = reuse_lines(broker, mine, "denied")
    rate = BURST / WINDOW
    assert BURST <= len(audited) <= BURST + rate * took + 1, (len(audited), took)
    # Each audited use has its request line (same request id); the held ones have none.
    requests = {e["request"]["id"] for e in events(broker) if of(source)(e)
                and e["type"] == "request" and e["request"]["path"] == "noop/creds/a"}
    assert {e["request"]["id"] for e in audited} <= requests
    assert len(requests) == len(audited) + 1  # + the other token's
    summaries = wait_for_count(broker, mine, n - len(audited))
    assert sum(e["count"] for e in summaries) == n - len(audited)
    for summary in summaries:
        assert summary["types"] == {"reuse_attempt": summary["count"]}
        assert summary["token_state"] == "revoked"
        assert summary["remote_addrs"] == [source] and summary["remote_addrs_capped"] is False
        assert summary["window"]["from"] <= summary["window"]["to"]
        assert summary["limit"] == {"burst": BURST, "per_second": rate}
        assert "auth" not in summary or summary["auth"] is None
    # The other token's first use: in full, though the first one's bucket is empty.
    assert len(reuse_lines(broker, hashed(broker, other_accessor), "denied")) == 1
    # No accessor or token in clear anywhere in the file.
    text = Path(broker.audit_path).read_text()
    assert accessor not in text and token not in text
    assert verify_file(broker.audit_path, None).ok


def _small_limits(monkeypatch: pytest.MonkeyPatch, *, max_accessors: int) -> None:
    """One use per accessor at once, then none for 10 minutes; ``max_accessors`` tracked."""
    monkeypatch.setattr(audit_limit, "MAX_ACCESSORS", max_accessors, raising=False)
    monkeypatch.setattr(audit_limit, "REUSE_BURST", 1, raising=False)
    monkeypatch.setattr(audit_limit, "REUSE_WINDOW", 600.0, raising=False)


async def _fold_on(tmp_path: Path) -> tuple[AuditLog, audit_limit.ReuseAuditFold]:
    """An audit log in ``tmp_path`` and the reuse fold of its limiter (the module's
    limits as they are now)."""
    log = await AuditLog.open(str(tmp_path / "audit.jsonl"), str(tmp_path / "audit.key"),
                              create_key=True)
    return log, audit_limit.FailureAuditLimiter(log).reuse


def test_the_fold_is_bounded_and_summarised_at_shutdown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_ACCESSORS busy accessors, new ones share one bucket ("other tokens"),
    whose summary names no accessor; a summary lists at most MAX_REMOTES client
    addresses; closing the limiter (shutdown) writes what is still pending."""
    _small_limits(monkeypatch, max_accessors=2)

    async def run() -> list[dict[str, Any]]:
        log, fold = await _fold_on(tmp_path)
        for accessor in ("acc-1", "acc-2", "acc-3", "acc-4"):
            for n in range(3):
                if not fold.admit(accessor):
                    fold.hold(accessor, "reuse_attempt", remote=f"10.0.0.{n}",
                              token_state="expired")
        for n in range(audit_limit.MAX_REMOTES + 5):  # acc-1 from many addresses
            assert not fold.admit("acc-1")
            fold.hold("acc-1", "reuse_attempt", remote=f"10.0.1.{n}", token_state="revoked")
        await fold.close()  # long before the window ends
        await log.close()
        return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]

    lines = asyncio.run(run())
    by_count = sorted((e.get("other_tokens", False), e["count"]) for e in lines)
    # acc-1: 2 + 15, acc-2: 2, acc-3 and acc-4 share the overflow bucket (1 token): the
    # first use of each is written all the same (acc-4's found the bucket empty), 4 held.
    assert by_count == [(False, 2), (False, 17), (True, 4)], lines
    assert all(e["type"] == "reuse_attempt" and e["outcome"] == "suppressed" for e in lines)
    overflow = next(e for e in lines if e.get("other_tokens"))
    assert "token_accessor" not in overflow and "token_state" not in overflow
    busy = next(e for e in lines if e["count"] == 17)
    assert busy["token_accessor"].startswith("hmac-sha256:")
    assert len(busy["remote_addrs"]) == audit_limit.MAX_REMOTES
    assert busy["remote_addrs_capped"] is True
    assert busy["token_state"] == "revoked"  # the last held one's


def test_past_the_cap_every_token_s_first_use_is_still_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared bucket of the tokens past MAX_ACCESSORS holds back only uses of tokens
    it let through before: whoever fills the table with ended tokens of their own and
    empties the shared bucket cannot hide a leaked token's first use (it was held, and
    summed up with no accessor: security review)."""
    _small_limits(monkeypatch, max_accessors=1)

    async def run() -> list[tuple[str, bool]]:
        log, fold = await _fold_on(tmp_path)
        got = [(accessor, fold.admit(accessor))
               for accessor in ("mine-1", "mine-2", "mine-3", "leaked", "mine-2", "leaked")]
        await log.close()
        return got

    assert asyncio.run(run()) == [
        ("mine-1", True),   # its own bucket (the table is now full)
        ("mine-2", True),   # the shared bucket's one token
        ("mine-3", True),   # the shared bucket is empty: a first use all the same
        ("leaked", True),   # ...so the leaked token's first use is on record
        ("mine-2", False),  # repeat uses are held
        ("leaked", False),
    ]
