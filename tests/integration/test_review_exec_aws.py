"""Review of ``broker exec`` with AWS credentials: a real broker on moto, exec as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.aws_fixtures import READ_ONLY, aws_broker, aws_role, create_role
from tests.integration.broker_harness import BrokerThread, aws_client, aws_mount

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

#: argv: OUT ENDPOINT. Reports the AWS_* variables it got and who AWS says it is.
CHILD = r'''
import json, os, sys
import boto3
out, endpoint = sys.argv[1], sys.argv[2]
names = sorted(k for k in os.environ if k.startswith("AWS_") or k == "BROKER_LEASE_IDS")
sts = boto3.session.Session(region_name="us-east-1").client("sts", endpoint_url=endpoint)
arn = sts.get_caller_identity()["Arn"]
with open(out, "w") as fh:
    json.dump({"names": names, "arn": arn,
               "token": os.environ.get("AWS_SESSION_TOKEN"),
               "lease_ids": os.environ.get("BROKER_LEASE_IDS")}, fh)
'''


@pytest.fixture
def broker(tmp_path: Path, moto_endpoint: str,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerThread]:
    monkeypatch.setenv("BROKER_TEST_AWS_SECRET", "testing")
    role_arn = create_role(moto_endpoint, f"broker-exec-{uuid.uuid4().hex[:8]}")["Arn"]
    body = (aws_mount(moto_endpoint)
            + aws_role("ci", "iam_user", policy_document=READ_ONLY)
            + aws_role("deploy", "assumed_role", role_arns=[role_arn]))
    with aws_broker(tmp_path, body) as server:
        (tmp_path / "child.py").write_text(CHILD)
        yield server


def run_exec(broker: BrokerThread, tmp: Path, endpoint: str, *specs: str,
             extra_env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp / "out.json"
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("BROKER_", "VAULT_", "AWS_"))}
    environ |= {"BROKER_ADDR": broker.url, "BROKER_TOKEN": broker.root_token,
                "PYTHONPATH": str(REPO), **extra_env}
    done = subprocess.run([sys.executable, "-m", "broker.cli", "exec", *specs, "--",
                           sys.executable, str(tmp / "child.py"), str(out), endpoint],
                          env=environ, capture_output=True, text=True, timeout=60, cwd=tmp)
    assert done.returncode == 0, done.stderr
    return done, json.loads(out.read_text())


#: What a CI runner that already holds AWS credentials of its own has exported.
RUNNER_AWS = {"AWS_ACCESS_KEY_ID": "ASIARUNNERKEY0000000", "AWS_SECRET_ACCESS_KEY": "runner",
              "AWS_SESSION_TOKEN": "runner-session-token"}


def test_iam_user_key_is_not_paired_with_an_inherited_session_token(
    broker: BrokerThread, tmp_path: Path, moto_endpoint: str
) -> None:
    """An iam_user credential has no session token: exec must not let the job's own
    AWS_SESSION_TOKEN through, or every AWS call with the new key fails; the user is
    deleted when exec returns."""
    _, seen = run_exec(broker, tmp_path, moto_endpoint, "aws/ci", extra_env=RUNNER_AWS)
    assert "AWS_SESSION_TOKEN" not in seen["names"], seen
    assert ":user/broker/" in seen["arn"]
    user = seen["arn"].rsplit("/", 1)[-1]
    with pytest.raises(ClientError, match="NoSuchEntity"):
        aws_client(moto_endpoint, "iam").get_user(UserName=user)


def test_assumed_role_credential_replaces_the_inherited_one(
    broker: BrokerThread, tmp_path: Path, moto_endpoint: str
) -> None:
    """An STS credential sets all three variables; exec warns it is not renewable and
    its revoke at the end succeeds (the deny policy)."""
    done, seen = run_exec(broker, tmp_path, moto_endpoint, "aws/deploy",
                          extra_env=RUNNER_AWS)
    assert seen["token"] and seen["token"] != RUNNER_AWS["AWS_SESSION_TOKEN"]
    assert ":assumed-role/" in seen["arn"]
    assert "is not renewable" in done.stderr
    assert "could not revoke" not in done.stderr
    assert broker.state is not None
    lease = broker.call(broker.state.store.get(seen["lease_ids"]))
    assert lease is not None and lease.state.value == "revoked"


def test_iam_user_then_sts_never_mix_in_the_plain_names(
    broker: BrokerThread, tmp_path: Path, moto_endpoint: str
) -> None:
    """aws/ci then aws/deploy: the plain AWS_* names are the IAM user's alone (no session
    token of the assumed role next to its key); the role's triple is suffixed."""
    _, seen = run_exec(broker, tmp_path, moto_endpoint, "aws/ci", "aws/deploy", extra_env={})
    assert "AWS_SESSION_TOKEN" not in seen["names"], seen
    assert {"AWS_ACCESS_KEY_ID_AWS_DEPLOY", "AWS_SECRET_ACCESS_KEY_AWS_DEPLOY",
            "AWS_SESSION_TOKEN_AWS_DEPLOY"} <= set(seen["names"])
    assert ":user/broker/" in seen["arn"]


def test_a_jwt_login_token_is_not_cut_down_under_a_non_renewable_lease(
    tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """exec cuts its JWT login token down to three heartbeats only when the heartbeat
    renews every lease: an assumed_role lease cannot be renewed and lives its 15m, and
    a lease never outlives its token, so cutting the token would end the lease (and
    the broker's record of a credential AWS keeps honouring) at about 90 s. With a
    renewable lease the token is cut down as before (the control)."""
    from tests.integration.test_exec import github_auth
    from tests.oidc_issuer import OIDCIssuer

    monkeypatch.setenv("BROKER_TEST_AWS_SECRET", "testing")
    role_arn = create_role(moto_endpoint, f"broker-exec-{uuid.uuid4().hex[:8]}")["Arn"]
    with OIDCIssuer() as issuer:
        body = (aws_mount(moto_endpoint)
                + aws_role("deploy", "assumed_role", role_arns=[role_arn])
                + aws_role("ci", "iam_user", policy_document=READ_ONLY)
                + '\n[policies.app]\n"aws/creds/*" = ["read"]\n'
                + github_auth(issuer))
        with aws_broker(tmp_path, body) as server:
            (tmp_path / "child.py").write_text(CHILD)

            def token_renewals(spec: str) -> list[dict[str, Any]]:
                """Audit lines of exec renewing its login token (``token_renew``)."""
                audit = Path(server.audit_path)
                before = len(audit.read_text().splitlines())
                environ = {k: v for k, v in os.environ.items()
                           if not k.startswith(("BROKER_", "VAULT_", "AWS_", "CI_JWT"))}
                environ |= {"BROKER_ADDR": server.url, "PYTHONPATH": str(REPO),
                            "CI_JWT": issuer.github_token(repository="acme/app")}
                done = subprocess.run(
                    [sys.executable, "-m", "broker.cli", "exec", "--jwt-env", "CI_JWT",
                     "--auth-role", "deploy", "--auth-path", "github", spec, "--",
                     sys.executable, str(tmp_path / "child.py"), str(tmp_path / "out.json"),
                     moto_endpoint], env=environ, capture_output=True, text=True,
                    timeout=60, cwd=tmp_path)
                assert done.returncode == 0, done.stderr
                events = [json.loads(line) for line in
                          audit.read_text().splitlines()[before:]]
                return [e for e in events if e.get("type") == "token_renew"]

            assert token_renewals("aws/deploy") == []  # not renewable: the token keeps its TTL
            assert token_renewals("aws/ci") != []  # renewable: cut down to three heartbeats
