"""QA fixes of the aws plugin, against moto in server mode (real HTTP).

A delaying HTTP proxy in front of moto makes chosen IAM actions slower than
``[leases] backend_timeout``, which is how an issue times out while its boto3
thread keeps going.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hvac
import pytest
import requests
from botocore.exceptions import ClientError

from broker.backend import DeleteUserRequest, NewUserRequest, RoleSpec
from plugins import aws_iam
from plugins.aws import AWSBackend
from tests.integration.aws_fixtures import (
    READ_ONLY,
    SlowProxy,
    aws_broker,
    aws_role,
    create_role,
    mount_spec,
)
from tests.integration.broker_harness import BrokerThread, aws_client, aws_mount

pytestmark = pytest.mark.integration

#: How long the proxy holds the actions a test makes slow: well over backend_timeout (1s).
DELAY = 3.0


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[SlowProxy]:
    server = SlowProxy(moto_endpoint, DELAY)
    yield server
    server.close()


@pytest.fixture
def tag() -> str:
    return f"qa{uuid.uuid4().hex[:8]}"


@pytest.fixture
def slow_broker(tmp_path: Path, proxy: SlowProxy, tag: str,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerThread]:
    """A broker whose aws mount talks to moto through the proxy; backend_timeout 1s."""
    monkeypatch.setenv("BROKER_TEST_AWS_SECRET", "testing")
    leases = """
[leases]
backend_timeout = "1s"
claim_timeout = "20s"
pending_timeout = "20s"
"""
    body = (leases + aws_mount(proxy.url)
            + aws_role("rnd", "iam_user", policy_document=READ_ONLY,
                       username_template=f"{tag}-{{{{random 8}}}}")
            + aws_role("fixed", "iam_user", policy_document=READ_ONLY,
                       username_template=f"{tag}-{{{{role}}}}"))
    with aws_broker(tmp_path, body) as server:
        yield server
        proxy.slow.clear()  # nothing is held any more while the leases are revoked


def users_named(moto_endpoint: str, prefix: str) -> list[str]:
    iam = aws_client(moto_endpoint, "iam")
    users = iam.list_users(PathPrefix="/broker/", MaxItems=1000)["Users"]
    return sorted(u["UserName"] for u in users if u["UserName"].startswith(prefix))


def settle_rollbacks(broker: BrokerThread, timeout: float = 20) -> None:
    """Run the stale-pending rollback until no pending row is left."""
    assert broker.state is not None
    engine, store = broker.state.engine, broker.state.store
    deadline = time.monotonic() + timeout
    while True:
        broker.call(engine.rollback_stale_pending(older_than=0))
        if not broker.call(store.stale_pending(before=time.time() + 60, limit=10)):
            return
        assert time.monotonic() < deadline, "a pending row is never rolled back"
        time.sleep(0.5)


def issue(broker: BrokerThread, role: str) -> tuple[int, dict[str, Any]]:
    resp = requests.get(f"{broker.url}/v1/aws/creds/{role}", timeout=60,
                        headers={"X-Vault-Token": broker.root_token})
    return resp.status_code, resp.json()


# -- 1. a timed-out iam_user issue leaves no user behind -----------------------------------


def test_timed_out_iam_user_issue_leaves_no_user(
    slow_broker: BrokerThread, proxy: SlowProxy, moto_endpoint: str, tag: str
) -> None:
    """CreateUser slower than backend_timeout: once the rollback is done, no IAM user (and so
    no access key) of the given-up issue exists, even though its thread outlived the issue."""
    proxy.slow.add("CreateUser")
    status, body = issue(slow_broker, "rnd")
    assert status == 503, body
    assert "timed out" in json.dumps(body)
    proxy.wait_answered("CreateUser")
    proxy.slow.clear()
    time.sleep(2)  # what the old thread did next (tag, policy, key) has happened by now
    settle_rollbacks(slow_broker)
    assert users_named(moto_endpoint, tag) == []


# -- 2. a rollback or revoke never deletes another lease's user -----------------------------


def test_timed_out_fixed_name_issue_keeps_the_live_lease_user(
    slow_broker: BrokerThread, proxy: SlowProxy, moto_endpoint: str, tag: str
) -> None:
    """A fixed-name issue that times out while lease A holds the name: its rollback leaves
    A's user and key alone, and A's revoke still deletes them."""
    status, first = issue(slow_broker, "fixed")
    assert status == 200, first
    name = f"{tag}-fixed"
    proxy.slow.add("CreateUser")
    status, body = issue(slow_broker, "fixed")
    assert status == 503, body
    proxy.wait_answered("CreateUser")
    proxy.slow.clear()
    settle_rollbacks(slow_broker)
    iam = aws_client(moto_endpoint, "iam")
    keys = [k["AccessKeyId"] for k in iam.list_access_keys(UserName=name)["AccessKeyMetadata"]]
    assert keys == [first["data"]["access_key"]]
    client = hvac.Client(url=slow_broker.url, token=slow_broker.root_token)
    client.sys.revoke_lease(first["lease_id"])
    with pytest.raises(ClientError, match="NoSuchEntity"):
        iam.get_user(UserName=name)


def _backend(moto_endpoint: str, role: RoleSpec) -> AWSBackend:
    return AWSBackend.from_config(mount_spec(moto_endpoint, {role.name: role}))


def _role(name: str, template: str | None) -> RoleSpec:
    return RoleSpec(name=name, default_ttl=60, max_ttl=60, username_template=template,
                    options={"credential_type": "iam_user", "policy_document": READ_ONLY})


def _tagged_user(moto_endpoint: str, name: str, lease_id: str) -> None:
    aws_client(moto_endpoint, "iam").create_user(
        UserName=name, Path="/broker/", Tags=[{"Key": aws_iam.LEASE_ID_TAG, "Value": lease_id}])


async def test_revoke_leaves_a_user_another_lease_made_since(moto_endpoint: str,
                                                             tag: str) -> None:
    """A revoke deletes the user only if its broker-lease-id tag names the lease being
    ended (DeleteUserRequest.lease_id): a user of the same name another lease made since
    is left alone; an untagged one (made by hand) still goes by name, as before."""
    role = _role("fixed", f"{tag}-{{{{role}}}}")
    backend = _backend(moto_endpoint, role)
    await backend.initialize()
    name = f"{tag}-fixed"
    iam = aws_client(moto_endpoint, "iam")
    try:
        req = NewUserRequest(role=role, username=name, password="x",
                             expiration=datetime.now(UTC) + timedelta(minutes=5),
                             lease_id="aws/creds/fixed/first")
        resp = await backend.new_user(req)
        # Its user went (by hand); the next lease of the name made its own.
        aws_iam.delete_user(iam, name, "/broker/")
        _tagged_user(moto_endpoint, name, "aws/creds/fixed/second")
        await backend.delete_user(DeleteUserRequest(role=role, username=name,
                                                    revocation=resp.revocation,
                                                    lease_id="aws/creds/fixed/first"))
        assert iam.get_user(UserName=name)["User"]
        # The lease it belongs to deletes it.
        await backend.delete_user(DeleteUserRequest(role=role, username=name,
                                                    revocation=resp.revocation,
                                                    lease_id="aws/creds/fixed/second"))
        with pytest.raises(ClientError, match="NoSuchEntity"):
            iam.get_user(UserName=name)
        iam.create_user(UserName=name, Path="/broker/")  # untagged
        await backend.delete_user(DeleteUserRequest(role=role, username=name,
                                                    revocation=resp.revocation,
                                                    lease_id="aws/creds/fixed/first"))
        with pytest.raises(ClientError, match="NoSuchEntity"):
            iam.get_user(UserName=name)
    finally:
        aws_iam.delete_user(iam, name, "/broker/")
        await backend.close()


async def test_stale_rollback_after_restart_keeps_a_fixed_name_user(moto_endpoint: str,
                                                                    tag: str) -> None:
    """The rollback of a pending row (the broker restarted mid-issue) deletes the user only
    if it is tagged with that pending lease: another lease's user of the same fixed name,
    or an untagged one, stays."""
    fixed = _role("fixed", f"{tag}-{{{{role}}}}")
    backend = _backend(moto_endpoint, fixed)
    await backend.initialize()
    name = f"{tag}-fixed"
    iam = aws_client(moto_endpoint, "iam")
    _tagged_user(moto_endpoint, name, "aws/creds/fixed/live")

    async def rollback(lease_id: str) -> None:
        await backend.delete_user(DeleteUserRequest(
            role=fixed, username=name, revocation={"username": name}, reason="rollback",
            lease_id=lease_id))

    try:
        await rollback("aws/creds/fixed/crashed")
        assert iam.get_user(UserName=name)["User"]
        aws_iam.delete_user(iam, name, "/broker/")
        iam.create_user(UserName=name, Path="/broker/")  # untagged: not an issue's
        await rollback("aws/creds/fixed/crashed")
        assert iam.get_user(UserName=name)["User"]
        aws_iam.delete_user(iam, name, "/broker/")
        _tagged_user(moto_endpoint, name, "aws/creds/fixed/crashed")  # its CreateUser went
        await rollback("aws/creds/fixed/crashed")
        with pytest.raises(ClientError, match="NoSuchEntity"):
            iam.get_user(UserName=name)
    finally:
        aws_iam.delete_user(iam, name, "/broker/")
        await backend.close()


# -- 3. Vault's role_arn request parameter --------------------------------------------------


@pytest.fixture
def sts_broker(tmp_path: Path, moto_endpoint: str,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[BrokerThread, list[str]]]:
    monkeypatch.setenv("BROKER_TEST_AWS_SECRET", "testing")
    arns = [str(create_role(moto_endpoint, f"qa-{uuid.uuid4().hex[:8]}")["Arn"])
            for _ in range(2)]
    body = (aws_mount(moto_endpoint)
            + aws_role("two", "assumed_role", role_arns=arns)
            + aws_role("one", "assumed_role", role_arns=[arns[0]])
            + aws_role("fed", "federation_token", policy_document=READ_ONLY)
            + aws_role("user", "iam_user", policy_document=READ_ONLY))
    # force: a federation_token lease cannot be revoked before it expires.
    with aws_broker(tmp_path, body, force=True) as server:
        yield server, arns


def _role_name(arn: str) -> str:
    return arn.rsplit("/", 1)[-1]


def test_role_arn_parameter_picks_the_role(sts_broker: tuple[BrokerThread, list[str]]) -> None:
    """role_arn (POST body on sts, GET query on creds) chooses among role_arns; the lease
    metadata records it."""
    broker, arns = sts_broker
    client = hvac.Client(url=broker.url, token=broker.root_token)
    for endpoint in ("sts", "creds"):
        resp = client.secrets.aws.generate_credentials("two", role_arn=arns[1],
                                                       endpoint=endpoint, mount_point="aws")
        assert f":assumed-role/{_role_name(arns[1])}/" in resp["data"]["arn"]
    found = client.adapter.get("/v1/sys/leases/search", params={"prefix": "aws/"})
    lease = next(x for x in found["data"]["leases"] if x["lease_id"] == resp["lease_id"])
    assert lease["metadata"] == {"role_arn": arns[1]}
    resp = client.secrets.aws.generate_credentials("one", endpoint="sts", mount_point="aws")
    assert f":assumed-role/{_role_name(arns[0])}/" in resp["data"]["arn"]
    # As in Vault, the lease id names the path asked on, and revoke-prefix finds it there.
    assert resp["lease_id"].startswith("aws/sts/one/"), resp["lease_id"]
    other = client.secrets.aws.generate_credentials("one", endpoint="creds", mount_point="aws")
    assert other["lease_id"].startswith("aws/creds/one/"), other["lease_id"]
    done = client.adapter.put("/v1/sys/leases/revoke-prefix/aws/sts/one", json={"sync": True})
    assert done["data"]["queued"] == 1, done


@pytest.mark.parametrize(("role", "params", "message"), [
    ("two", {"role_arn": "arn:aws:iam::123456789012:role/admin"}, "not one of this role's"),
    ("one", {"role_arn": "arn:aws:iam::123456789012:role/admin"}, "not one of this role's"),
    ("two", {}, "did not supply a role_arn parameter"),
    ("fed", {"role_arn": "arn:aws:iam::123456789012:role/admin"}, "assumed_role roles only"),
    ("one", {"role_session_name": "mine"}, "role_session_name is not supported"),
])
def test_role_arn_parameter_refusals(sts_broker: tuple[BrokerThread, list[str]], role: str,
                                     params: dict[str, str], message: str) -> None:
    """An ARN outside the list, none among several, a role_arn on another type, or a
    role_session_name: a 400 naming the problem, no credential (never another role)."""
    broker, _ = sts_broker
    client = hvac.Client(url=broker.url, token=broker.root_token)
    for endpoint in ("sts", "creds"):
        with pytest.raises(hvac.exceptions.InvalidRequest, match=message):
            client.secrets.aws.generate_credentials(role, endpoint=endpoint, mount_point="aws",
                                                    **params)
    found = client.adapter.get("/v1/sys/leases/search", params={"prefix": "aws/"})
    assert found["data"]["leases"] == []


def test_role_arn_parameter_cannot_override_token_metadata(
    sts_broker: tuple[BrokerThread, list[str]]
) -> None:
    """A token whose metadata pins role_arn gets that role; asking for another is a 400."""
    broker, arns = sts_broker
    root = hvac.Client(url=broker.url, token=broker.root_token)
    token = root.auth.token.create(policies=["root"], meta={"role_arn": arns[0]})
    client = hvac.Client(url=broker.url, token=token["auth"]["client_token"])
    resp = client.secrets.aws.generate_credentials("two", endpoint="sts", mount_point="aws")
    assert f":assumed-role/{_role_name(arns[0])}/" in resp["data"]["arn"]
    same = client.secrets.aws.generate_credentials("two", role_arn=arns[0], endpoint="sts",
                                                   mount_point="aws")
    assert f":assumed-role/{_role_name(arns[0])}/" in same["data"]["arn"]
    with pytest.raises(hvac.exceptions.InvalidRequest, match="token's metadata"):
        client.secrets.aws.generate_credentials("two", role_arn=arns[1], endpoint="sts",
                                                mount_point="aws")


def test_sts_path_refuses_an_iam_user_role(sts_broker: tuple[BrokerThread, list[str]]) -> None:
    """aws/sts/ROLE for an iam_user role is a 400 pointing at aws/creds/ROLE; creds works."""
    broker, _ = sts_broker
    client = hvac.Client(url=broker.url, token=broker.root_token)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="aws/creds/user"):
        client.secrets.aws.generate_credentials("user", endpoint="sts", mount_point="aws")
    resp = client.secrets.aws.generate_credentials("user", mount_point="aws")
    assert resp["data"]["security_token"] is None
