"""QA round 6, the aws side: against moto in server mode, through the HTTP API and the CLI.

1. A forced revoke of a federation_token / session_token lease is audited as what it
   is: the lease ended, the keys did not (``outcome: forced``, ``backend_revoked:
   false``, ``credential_valid_until``), not as a clean revoke.
2. ``broker creds`` issues on the STS path (``MOUNT/sts/ROLE``) and passes ``role_arn``
   (``--role-arn``), so an assumed_role role with several role_arns can be issued.
3. The CLI shows the server's whole error, not one cut mid-word.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import hvac
import pytest

from broker.cli import main
from tests.integration.aws_fixtures import (
    READ_ONLY,
    aws_broker,
    aws_role,
    create_role,
    delete_role,
)
from tests.integration.broker_harness import BrokerThread, aws_mount

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _aws_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_TEST_AWS_SECRET", "testing")


@pytest.fixture
def arns(moto_endpoint: str) -> Iterator[list[str]]:
    """Two assumable IAM roles in moto (deleted after, with any deny policy)."""
    names = [f"r6{uuid.uuid4().hex[:8]}-{n}" for n in range(2)]
    made = [str(create_role(moto_endpoint, name)["Arn"]) for name in names]
    try:
        yield made
    finally:
        for name in names:
            delete_role(moto_endpoint, name)


@pytest.fixture
def broker(tmp_path: Path, moto_endpoint: str, arns: list[str]) -> Iterator[BrokerThread]:
    body = (aws_mount(moto_endpoint)
            + aws_role("fed", "federation_token", policy_document=READ_ONLY)
            + aws_role("session", "session_token")
            + aws_role("two", "assumed_role", role_arns=arns)
            + aws_role("one", "assumed_role", role_arns=arns[:1]))
    # force: the STS leases of a test that failed half-way cannot be revoked otherwise.
    with aws_broker(tmp_path, body, force=True) as server:
        yield server


def _events(broker: BrokerThread, lease_id: str) -> list[dict[str, Any]]:
    lines = Path(broker.audit_path).read_text().splitlines()
    return [ev for ev in map(json.loads, lines)
            if (ev.get("lease") or {}).get("id") == lease_id]


def _ended_line(broker: BrokerThread, lease_id: str) -> dict[str, Any]:
    """The lease's ``revoke`` (or forced ``admin``) line, waited for (generous deadline)."""
    deadline = time.monotonic() + 30
    while True:
        ended = [ev for ev in _events(broker, lease_id)
                 if ev["type"] == "revoke" or ev.get("action") == "revoke_force"]
        if ended:
            return ended[-1]
        assert time.monotonic() < deadline, _events(broker, lease_id)
        time.sleep(0.1)


def _cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
         broker: BrokerThread, *args: str) -> tuple[int, str, str]:
    """``broker ARGS`` in-process against ``broker`` as root: (exit code, stdout, stderr)."""
    monkeypatch.setenv("BROKER_ADDR", broker.url)
    monkeypatch.setenv("BROKER_TOKEN", broker.root_token)
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# -- 1. a forced STS lease is not audited as revoked -----------------------------------------


@pytest.mark.parametrize("role", ["fed", "session"])
def test_a_forced_sts_token_is_audited_as_still_valid(
        broker: BrokerThread, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, role: str) -> None:
    """`broker lease revoke --prefix LEASE --force` of a federation/session token: the
    revoke line says outcome forced, backend_revoked false and the AWS expiry; it used
    to be a plain revoke with outcome ok, as if the keys were dead."""
    client = hvac.Client(url=broker.url, token=broker.root_token)
    resp = client.read(f"aws/creds/{role}")
    assert resp is not None
    lease_id = resp["lease_id"]
    code, _, err = _cli(capsys, monkeypatch, broker, "lease", "revoke", "--prefix", lease_id,
                        "--force")
    assert code == 0, err
    line = _ended_line(broker, lease_id)
    assert line["type"] == "revoke" and line["reason"] == "force", line
    assert line["outcome"] == "forced", line
    assert line["backend_revoked"] is False, line
    until = datetime.fromisoformat(line["credential_valid_until"].replace("Z", "+00:00"))
    # The credential's own AWS expiry: the role's 15m default TTL from the issue.
    assert 800 < until.timestamp() - time.time() <= 901, line
    # The lease itself is over.
    with pytest.raises(hvac.exceptions.InvalidRequest, match="is revoked"):
        client.sys.read_lease(lease_id)


def test_a_forced_assumed_role_session_is_revoked_for_real(broker: BrokerThread) -> None:
    """An assumed_role lease forced off is denied by the role's deny policy: its revoke
    line stays a plain ok revoke (nothing outlives it)."""
    client = hvac.Client(url=broker.url, token=broker.root_token)
    lease_id = client.read("aws/creds/one")["lease_id"]
    client.adapter.put(f"/v1/sys/leases/revoke-force/{lease_id}", json={"sync": True})
    line = _ended_line(broker, lease_id)
    assert (line["type"], line["outcome"]) == ("revoke", "ok"), line
    assert "backend_revoked" not in line and "credential_valid_until" not in line


# -- 2. broker creds on the STS path, with role_arn ------------------------------------------


def _role_name(arn: str) -> str:
    return arn.rsplit("/", 1)[-1]


def test_creds_on_the_sts_path_with_a_role_arn(
        broker: BrokerThread, arns: list[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`broker creds aws/sts/two --role-arn ARN --ttl 20m` issues on aws/sts/two, assumes
    the ARN asked for, for 20m; it used to call aws/sts/creds/two (HTTP 404) and had no
    way to pass role_arn."""
    code, out, err = _cli(capsys, monkeypatch, broker, "creds", "aws/sts/two",
                          "--role-arn", arns[1], "--ttl", "20m", "--format", "json")
    assert code == 0, err
    resp = json.loads(out)
    assert resp["lease_id"].startswith("aws/sts/two/"), resp
    assert f":assumed-role/{_role_name(arns[1])}/" in resp["data"]["arn"], resp
    assert 1190 <= resp["lease_duration"] <= 1200, resp
    # The creds path takes --role-arn too, and the env format still works.
    code, out, err = _cli(capsys, monkeypatch, broker, "creds", "aws/two",
                          "--role-arn", arns[0], "--format", "env")
    assert code == 0, err
    assert "AWS_SESSION_TOKEN=" in out


def test_creds_role_arn_refusals_are_the_servers_one_line(
        broker: BrokerThread, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --role-arn a role with several ARNs is Vault's 400, said in one line; an ARN
    outside the list is refused too; and exec points at MOUNT/ROLE for an sts spec."""
    code, out, err = _cli(capsys, monkeypatch, broker, "creds", "aws/sts/two")
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "did not supply a role_arn parameter" in err, err
    code, _, err = _cli(capsys, monkeypatch, broker, "creds", "aws/two", "--role-arn",
                        "arn:aws:iam::123456789012:role/admin")
    assert code == 1 and "is not one of this role's role_arns" in err, err
    code, _, err = _cli(capsys, monkeypatch, broker, "creds", "aws/")
    assert code == 2 and "expected MOUNT/ROLE or MOUNT/sts/ROLE" in err, err
    code, _, err = _cli(capsys, monkeypatch, broker, "exec", "aws/sts/two", "--", "true")
    assert code == 2 and "give aws/two" in err, err
    found = hvac.Client(url=broker.url, token=broker.root_token).adapter.get(
        "/v1/sys/leases/search", params={"prefix": "aws/"})
    assert found["data"]["leases"] == []


# -- 3. the CLI shows the server's error whole -----------------------------------------------


def test_the_cli_shows_the_servers_error_whole(
        broker: BrokerThread, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`broker lease revoke` of a federation_token lease: the server's whole reason, down to
    its last words; it used to be cut mid-word ("(GET sys/leases/irrev... (HTTP 502)")."""
    client = hvac.Client(url=broker.url, token=broker.root_token)
    lease_id = client.read("aws/creds/fed")["lease_id"]
    code, _, err = _cli(capsys, monkeypatch, broker, "lease", "revoke", lease_id)
    assert code == 1, err
    assert err.count("\n") == 1, err
    assert "cannot be revoked before AWS expires them" in err, err
    assert "..." not in err, err
    assert "sys/leases/irrevocable" in err, err
