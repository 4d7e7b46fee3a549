"""Review of the aws plugin's iam_user leases through a real broker over HTTP, on moto."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError

from broker.backend import BackendError, DeleteUserRequest, NewUserRequest, RoleSpec
from plugins import aws_iam
from plugins.aws import AWSBackend, parse_role
from tests.conformance.aws_harness import moto_with_auth
from tests.conftest import run
from tests.integration.aws_fixtures import READ_ONLY, aws_broker, aws_role, mount_spec
from tests.integration.broker_harness import BrokerThread, aws_client, aws_mount

pytestmark = pytest.mark.integration


@pytest.fixture
def tag() -> str:
    return f"rv{uuid.uuid4().hex[:8]}"


@pytest.fixture
def broker(tmp_path: Path, moto_endpoint: str, tag: str,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerThread]:
    monkeypatch.setenv("BROKER_TEST_AWS_SECRET", "testing")
    body = (aws_mount(moto_endpoint)
            + aws_role("fixed", "iam_user", policy_document=READ_ONLY,
                       username_template=f"{tag}-{{{{role}}}}")
            + aws_role("ci", "iam_user", policy_document=READ_ONLY))
    with aws_broker(tmp_path, body) as server:
        yield server


def api(broker: BrokerThread, method: str, path: str, **kw: Any) -> requests.Response:
    return requests.request(method, f"{broker.url}/v1/{path}",
                            headers={"X-Vault-Token": broker.root_token}, timeout=60, **kw)


def test_name_collision_never_deletes_the_existing_iam_user(
    broker: BrokerThread, moto_endpoint: str, tag: str
) -> None:
    """A username_template that renders a taken name fails the issue and leaves the
    user of the live lease (and its key) alone."""
    iam = aws_client(moto_endpoint, "iam")
    first = api(broker, "GET", "aws/creds/fixed")
    assert first.status_code == 200, first.text
    name = f"{tag}-fixed"
    key = first.json()["data"]["access_key"]
    second = api(broker, "GET", "aws/creds/fixed")
    assert second.status_code == 400, second.text
    assert "EntityAlreadyExists" in second.text
    # The first lease's user and key survive the failed second issue.
    keys = [k["AccessKeyId"] for k in iam.list_access_keys(UserName=name)["AccessKeyMetadata"]]
    assert keys == [key]
    assert iam.list_user_policies(UserName=name)["PolicyNames"] == ["broker-policy"]
    # The failed issue left no lease behind, and the first one still revokes its user.
    listed = api(broker, "LIST", "sys/leases/lookup/aws/creds/fixed/").json()["data"]["keys"]
    assert listed == [first.json()["lease_id"].rsplit("/", 1)[-1]]
    assert api(broker, "PUT", "sys/leases/revoke",
               json={"lease_id": first.json()["lease_id"]}).status_code == 204
    with pytest.raises(ClientError, match="NoSuchEntity"):
        iam.get_user(UserName=name)


def test_existing_user_of_another_lease_is_refused_but_a_retried_create_is_ours(
    moto_endpoint: str
) -> None:
    """EntityAlreadyExists: a user tagged with another lease id (or none) means
    "created nothing"; one tagged with this lease's id (CreateUser retried after a lost
    answer) is this issue's own and is left to the rollback."""
    iam = aws_client(moto_endpoint, "iam")
    role = parse_role(RoleSpec(name="ci", default_ttl=60, max_ttl=60, options={
        "credential_type": "iam_user", "policy_document": READ_ONLY}))
    name = f"v-aws-ci-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=name, Path="/broker/",
                    Tags=[{"Key": aws_iam.LEASE_ID_TAG, "Value": "aws/creds/ci/first"}])
    other = [{"Key": aws_iam.LEASE_ID_TAG, "Value": "aws/creds/ci/second"}]
    with pytest.raises(BackendError) as info:
        aws_iam.create_user(iam, name, "/broker/", role, other)
    assert info.value.created_nothing and not info.value.retryable
    assert "EntityAlreadyExists" in str(info.value)
    same = [{"Key": aws_iam.LEASE_ID_TAG, "Value": "aws/creds/ci/first"}]
    with pytest.raises(ClientError, match="EntityAlreadyExists"):
        aws_iam.create_user(iam, name, "/broker/", role, same)
    assert iam.get_user(UserName=name)["User"]["UserName"] == name
    aws_iam.delete_user(iam, name, "/broker/")


def test_revoke_of_a_user_deleted_by_hand_succeeds(
    broker: BrokerThread, moto_endpoint: str
) -> None:
    """Someone deleted the lease's IAM user: the revoke is done (204, lease revoked),
    not irrevocable."""
    iam = aws_client(moto_endpoint, "iam")
    issued = api(broker, "GET", "aws/creds/ci").json()
    user = issued["data"]["arn"].rsplit("/", 1)[-1]
    aws_iam.delete_user(iam, user, "/broker/")
    resp = api(broker, "PUT", "sys/leases/revoke", json={"lease_id": issued["lease_id"]})
    assert resp.status_code == 204, resp.text
    assert broker.state is not None
    lease = broker.call(broker.state.store.get(issued["lease_id"]))
    assert lease is not None and lease.state.value == "revoked"


def test_metadata_cannot_override_or_crowd_out_the_lease_id_tag(moto_endpoint: str) -> None:
    """tag_metadata: a metadata key named broker-lease-id is dropped (no duplicate key,
    which IAM refuses), and 60 metadata keys still leave the user at IAM's 50 tags."""
    spec = RoleSpec(name="ci", default_ttl=60, max_ttl=60, options={
        "credential_type": "iam_user", "policy_document": READ_ONLY, "tag_metadata": True})
    backend = AWSBackend.from_config(mount_spec(moto_endpoint, {"ci": spec}))
    metadata = {"Broker-Lease-Id": "spoofed", **{f"k{i:02}": "v" for i in range(60)}}
    req = NewUserRequest(role=spec, username=f"v-aws-ci-{uuid.uuid4().hex[:8]}", password="x",
                         expiration=datetime.now(UTC) + timedelta(minutes=5),
                         lease_id="aws/creds/ci/tags", metadata=metadata)

    async def scenario() -> list[dict[str, str]]:
        try:
            resp = await backend.new_user(req)
            tags: list[dict[str, str]] = aws_client(moto_endpoint, "iam").list_user_tags(
                UserName=req.username, MaxItems=100)["Tags"]
            await backend.delete_user(DeleteUserRequest(
                role=spec, username=req.username, revocation=resp.revocation))
            return tags
        finally:
            await backend.close()

    tags = run(scenario())
    assert len(tags) == 50
    assert [t["Value"] for t in tags if t["Key"].lower() == "broker-lease-id"] == [req.lease_id]


# -- plugin level, on a moto that enforces IAM policies --------------------------------------


def test_revoke_failing_half_way_is_retryable_and_the_key_is_already_gone() -> None:
    """A revoke that cannot detach a policy (permission missing) fails retryably with the
    user's key already deleted, and the retry after the fix deletes the user."""
    deny_detach = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "*", "Resource": "*"},
        {"Effect": "Deny", "Action": "iam:DetachUserPolicy", "Resource": "*"}]}
    allow_all = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    with moto_with_auth() as auth:
        admin = aws_client(auth.endpoint, "iam",
                           {"access_key": auth.access_key, "secret_key": auth.secret_key})
        admin.create_user(UserName="broker-mount")
        admin.put_user_policy(UserName="broker-mount", PolicyName="p",
                              PolicyDocument=json.dumps(deny_detach))
        key = admin.create_access_key(UserName="broker-mount")["AccessKey"]
        managed = admin.create_policy(PolicyName="ci", PolicyDocument=READ_ONLY)["Policy"]["Arn"]
        role = RoleSpec(name="ci", default_ttl=3600, max_ttl=3600,
                        options={"credential_type": "iam_user", "policy_arns": [managed]})
        backend = AWSBackend.from_config(mount_spec(
            auth.endpoint, {"ci": role}, secret=key["SecretAccessKey"],
            access_key=key["AccessKeyId"]))

        async def scenario() -> None:
            try:
                req = NewUserRequest(role=role, username="v-aws-ci-halfway", password="x",
                                     expiration=datetime.now(UTC) + timedelta(hours=1),
                                     lease_id="aws/creds/ci/halfway", metadata={})
                resp = await backend.new_user(req)
                delete = DeleteUserRequest(role=role, username=req.username,
                                           revocation=resp.revocation, reason="revoke")
                with pytest.raises(BackendError) as info:
                    await backend.delete_user(delete)
                assert info.value.retryable, info.value
                assert "AccessDenied" in str(info.value)
                assert admin.list_access_keys(UserName=req.username)["AccessKeyMetadata"] == []
                admin.put_user_policy(UserName="broker-mount", PolicyName="p",
                                      PolicyDocument=json.dumps(allow_all))
                await backend.delete_user(delete)
                with pytest.raises(ClientError, match="NoSuchEntity"):
                    admin.get_user(UserName=req.username)
            finally:
                await backend.close()

        run(scenario())
