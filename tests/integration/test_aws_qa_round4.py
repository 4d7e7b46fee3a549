"""QA round 4 of the aws plugin: an STS TTL under AWS's 900 s minimum is raised, and said so.

Vault hands the requested TTL to AWS (builtin/logical/aws path_user.go passes
``ttl`` as ``DurationSeconds``), and AWS refuses anything under 900 s. The
broker asks for 900 s instead; it used to do that silently, so the caller
believed its credential lived as long as it asked. Now the issue answer's
top-level ``warnings`` says so (``NewUserResponse.warnings``), the lease lasts
what the credential really lives, and a lease capped below it (role max_ttl,
token expiry) says that it ends first. Against moto in server mode, through
the HTTP API with hvac.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import hvac
import pytest

from broker.backend import NewUserRequest, RoleSpec
from plugins.aws import AWSBackend
from tests.conftest import run
from tests.integration.aws_fixtures import READ_ONLY, aws_broker, aws_role, moto_role, mount_spec
from tests.integration.broker_harness import BrokerThread, aws_mount

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _aws_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_TEST_AWS_SECRET", "testing")


@pytest.fixture
def broker(tmp_path: Path, moto_endpoint: str) -> Iterator[BrokerThread]:
    with moto_role(moto_endpoint, f"r4{uuid.uuid4().hex[:8]}-role") as arn:
        body = (aws_mount(moto_endpoint) + 'iam_path = "/broker-r4/"\n'
                + aws_role("assumed", "assumed_role", role_arns=[arn])
                + aws_role("fed", "federation_token", policy_document=READ_ONLY)
                + aws_role("session", "session_token")
                + aws_role("short", "federation_token", policy_document=READ_ONLY,
                           default_ttl="2m", max_ttl="5m")
                + aws_role("user", "iam_user", policy_document=READ_ONLY))
        with aws_broker(tmp_path, body, force=True) as server:
            yield server


def _lookup(client: hvac.Client, lease_id: str) -> dict[str, Any]:
    data: dict[str, Any] = client.sys.read_lease(lease_id)["data"]
    return data


def _ts(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize("role", ["assumed", "fed", "session"])
def test_a_ttl_under_the_sts_minimum_is_raised_with_a_warning(broker: BrokerThread,
                                                               role: str) -> None:
    """ttl=60s on an STS role: the answer's top-level ``warnings`` names AWS's 900 s
    minimum; lease_duration and the lease's expiry are the credential's 900 s, not 60 s."""
    client = hvac.Client(url=broker.url, token=broker.root_token)
    resp = client.secrets.aws.generate_credentials(role, ttl="60s", endpoint="sts",
                                                   mount_point="aws")
    warnings = resp["warnings"] or []
    assert any("at least 900s" in w and "asked for 60s" in w for w in warnings), resp
    assert 895 <= resp["lease_duration"] <= 900, resp
    data = _lookup(client, resp["lease_id"])
    assert 895 <= _ts(data["expire_time"]) - _ts(data["issue_time"]) <= 901, data
    # Nothing secret in a warning.
    assert not any(resp["data"]["secret_key"] in w or resp["data"]["access_key"] in w
                   for w in warnings)
    # Nothing raised, nothing said.
    full = client.secrets.aws.generate_credentials(role, ttl="15m", endpoint="sts",
                                                   mount_point="aws")
    assert full["warnings"] is None and full["lease_duration"] == 900, full


def test_a_lease_capped_below_the_sts_minimum_says_it_ends_first(broker: BrokerThread) -> None:
    """A role max_ttl of 5m: the 900 s credential outlives its lease, and the answer says
    both that AWS raised the TTL and that the lease ends before the credential."""
    client = hvac.Client(url=broker.url, token=broker.root_token)
    resp = client.secrets.aws.generate_credentials("short", endpoint="sts", mount_point="aws")
    warnings = resp["warnings"] or []
    assert resp["lease_duration"] <= 300, resp
    assert any("at least 900s" in w for w in warnings), resp
    assert any("max_ttl (300s)" in w and "before the credential's own expiry" in w
               for w in warnings), resp
    # IAM users have no AWS minimum (the broker's expiry deletes them): no warning.
    user = client.secrets.aws.generate_credentials("user", ttl="60s", mount_point="aws")
    assert user["warnings"] is None and user["lease_duration"] == 60, user


def test_the_backend_reports_the_raise_in_new_user_response_warnings(
        moto_endpoint: str) -> None:
    """The plugin itself: ``NewUserResponse.warnings`` holds the raise, empty otherwise."""
    mount = mount_spec(moto_endpoint, {})
    role = RoleSpec(name="s", default_ttl=900, max_ttl=3600,
                    options={"credential_type": "session_token"})

    async def scenario() -> tuple[list[str], list[str]]:
        backend = AWSBackend.from_config(mount)
        await backend.initialize()
        try:
            out = []
            for ttl in (120, 1800):
                req = NewUserRequest(
                    role=role, username=f"r4-{uuid.uuid4().hex[:8]}", password="unused",
                    expiration=datetime.fromtimestamp(time.time() + ttl).astimezone(),
                    lease_id=f"aws/sts/s/{uuid.uuid4().hex}")
                out.append(list((await backend.new_user(req)).warnings))
            return out[0], out[1]
        finally:
            await backend.close()

    short, long = run(scenario())
    assert len(short) == 1 and "at least 900s" in short[0] and "asked for 120s" in short[0]
    assert long == []
