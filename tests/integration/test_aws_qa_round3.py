"""QA round 3 of the aws plugin, against moto in server mode (real HTTP to the broker).

1. A lease keeps the IAM path its user was made in: a later ``iam_path`` change
   still revokes it, and still never deletes a user that is not the lease's.
2. rotate-root answers 400 for a refusal for good and 503 only when a retry may help.
3. An STS lease whose credential outlives it (capped by max_ttl or its token below
   AWS's 900 s minimum) does not claim the credential is over when it ends.
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

from broker.backend import BackendError, DeleteUserRequest, NewUserRequest, RoleSpec
from plugins import aws_iam, aws_sts
from plugins.aws import AWSBackend
from tests.integration.aws_fixtures import (
    READ_ONLY,
    aws_broker,
    aws_role,
    moto_role,
    mount_spec,
)
from tests.integration.broker_harness import (
    BrokerThread,
    aws_client,
    aws_mount,
    free_port,
    start_broker,
    write_config,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def tag() -> str:
    return f"r3{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def _aws_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_TEST_AWS_SECRET", "testing")


def _headers(broker: BrokerThread) -> dict[str, str]:
    return {"X-Vault-Token": broker.root_token}


def _lease_state(broker: BrokerThread, lease_id: str) -> str:
    resp = requests.get(f"{broker.url}/v1/sys/leases/search", headers=_headers(broker),
                        params={"prefix": lease_id}, timeout=30)
    assert resp.status_code == 200, resp.text
    rows = [r for r in resp.json()["data"]["leases"] if r["lease_id"] == lease_id]
    assert len(rows) == 1, rows
    return str(rows[0]["state"])


def _wait_state(broker: BrokerThread, lease_id: str, states: set[str],
                timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while (state := _lease_state(broker, lease_id)) not in states:
        assert time.monotonic() < deadline, f"{lease_id} stayed {state}"
        time.sleep(0.2)
    return state


def _audit(broker: BrokerThread, lease_id: str) -> list[dict[str, Any]]:
    lines = Path(broker.audit_path).read_text().splitlines()
    events = [json.loads(line) for line in lines]
    return [e for e in events if (e.get("lease") or {}).get("id") == lease_id]


# -- 1. iam_path recorded at creation --------------------------------------------------------


def _iam_user_config(tmp_path: Path, moto_endpoint: str, tag: str, path: str) -> Path:
    return write_config(tmp_path, aws_mount(moto_endpoint) + f'iam_path = "{path}"\n'
                        + aws_role("user", "iam_user", policy_document=READ_ONLY,
                                   username_template=f"{tag}-{{{{random 8}}}}"))


def test_iam_path_change_still_revokes_older_leases(tmp_path: Path, moto_endpoint: str,
                                                    tag: str) -> None:
    """A lease issued under iam_path A is revoked (its user deleted) after the mount moved
    to iam_path B; leases issued under B are revoked as before."""
    iam = aws_client(moto_endpoint, "iam")
    old_path, new_path = f"/broker/{tag}a/", f"/broker/{tag}b/"
    broker = start_broker(_iam_user_config(tmp_path, moto_endpoint, tag, old_path))
    try:
        old = hvac.Client(url=broker.url, token=broker.root_token).secrets.aws \
            .generate_credentials("user", mount_point="aws")
    finally:
        broker.stop()
    old_user = old["data"]["arn"].rsplit("/", 1)[-1]
    assert iam.get_user(UserName=old_user)["User"]["Path"] == old_path
    broker = start_broker(_iam_user_config(tmp_path, moto_endpoint, tag, new_path))
    try:
        client = hvac.Client(url=broker.url, token=broker.root_token)
        new = client.secrets.aws.generate_credentials("user", mount_point="aws")
        new_user = new["data"]["arn"].rsplit("/", 1)[-1]
        assert iam.get_user(UserName=new_user)["User"]["Path"] == new_path
        for lease in (old, new):
            resp = requests.put(f"{broker.url}/v1/sys/leases/revoke", headers=_headers(broker),
                                json={"lease_id": lease["lease_id"]}, timeout=60)
            assert resp.status_code == 204, resp.text
            assert _lease_state(broker, lease["lease_id"]) == "revoked"
        for name in (old_user, new_user):
            with pytest.raises(ClientError, match="NoSuchEntity"):
                iam.get_user(UserName=name)
    finally:
        broker.stop()


async def test_iam_path_change_never_deletes_another_user(moto_endpoint: str,
                                                          tag: str) -> None:
    """After an iam_path change, a user in the lease's old path that is untagged or tagged
    with another lease is left alone; so is the lease's own user moved to a third path."""
    role = RoleSpec(name="user", default_ttl=900, max_ttl=3600,
                    options={"credential_type": "iam_user", "policy_document": READ_ONLY})

    def backend(path: str) -> AWSBackend:
        return AWSBackend.from_config(mount_spec(moto_endpoint, {"user": role}, iam_path=path))

    old_path, new_path = f"/broker/{tag}a/", f"/broker/{tag}b/"
    first, second = backend(old_path), backend(new_path)
    iam = aws_client(moto_endpoint, "iam")
    name, lease_id = f"{tag}-fixed", f"aws/creds/user/{tag}"
    try:
        resp = await first.new_user(NewUserRequest(
            role=role, username=name, password="x", lease_id=lease_id,
            expiration=datetime.now(UTC) + timedelta(minutes=15)))
        assert resp.revocation["iam_path"] == old_path
        # By hand: the lease's user replaced by one of the same name.
        for foreign in ([], [{"Key": aws_iam.LEASE_ID_TAG, "Value": "aws/creds/user/other"}]):
            aws_iam.delete_user(iam, name, old_path)
            iam.create_user(UserName=name, Path=old_path, Tags=foreign)
            with pytest.raises(BackendError, match="outside the mount's iam_path") as info:
                await second.delete_user(DeleteUserRequest(
                    role=role, username=name, revocation=resp.revocation, lease_id=lease_id))
            assert not info.value.retryable
            assert iam.get_user(UserName=name)["User"]["Path"] == old_path
        # The lease's own tag, but not where the lease made it.
        aws_iam.delete_user(iam, name, old_path)
        iam.create_user(UserName=name, Path=f"/{tag}/",
                        Tags=[{"Key": aws_iam.LEASE_ID_TAG, "Value": lease_id}])
        with pytest.raises(BackendError, match="outside the mount's iam_path"):
            await second.delete_user(DeleteUserRequest(
                role=role, username=name, revocation=resp.revocation, lease_id=lease_id))
        assert iam.get_user(UserName=name)["User"]["Path"] == f"/{tag}/"
    finally:
        for path in (old_path, f"/{tag}/"):
            try:
                aws_iam.delete_user(iam, name, path)
            except BackendError:
                pass
        await first.close()
        await second.close()


# -- 2. rotate-root: 400 for a refusal for good, 503 when a retry may help -----------------


def _rotate_and_stop(broker: BrokerThread, status: int) -> str:
    """POST aws/rotate-root to ``broker``, then stop it: the answer must be ``status``;
    returns its error, which must be one line."""
    try:
        resp = requests.post(f"{broker.url}/v1/aws/rotate-root", headers=_headers(broker),
                             timeout=120)
        assert resp.status_code == status, resp.text
        return _one_line_error(resp)
    finally:
        broker.stop()


@pytest.fixture
def mount_user(moto_endpoint: str, tag: str) -> Iterator[tuple[str, dict[str, str]]]:
    """An IAM user with one access key, for a mount to sign with: (user name, key)."""
    iam = aws_client(moto_endpoint, "iam")
    name = f"{tag}-root"
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    yield name, {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    for k in iam.list_access_keys(UserName=name)["AccessKeyMetadata"]:
        iam.delete_access_key(UserName=name, AccessKeyId=k["AccessKeyId"])
    iam.delete_user(UserName=name)


def _signing_broker(tmp_path: Path, endpoint: str, key: dict[str, str],
                    monkeypatch: pytest.MonkeyPatch) -> BrokerThread:
    monkeypatch.setenv("BROKER_TEST_ROOT_SECRET", key["secret"])
    return start_broker(write_config(tmp_path, f"""
[mounts.aws]
plugin = "aws"
region = "us-east-1"
endpoint_url = "{endpoint}"
access_key = "{key["id"]}"
password_env = "BROKER_TEST_ROOT_SECRET"
"""))


def _one_line_error(resp: requests.Response) -> str:
    errors = resp.json()["errors"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return str(errors[0])


def test_rotate_root_with_a_second_key_already_is_a_400(
    tmp_path: Path, moto_endpoint: str, mount_user: tuple[str, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mount's user already holding AWS's two keys: 400 naming the unused key (a retry
    cannot help), both keys untouched."""
    name, key = mount_user
    iam = aws_client(moto_endpoint, "iam")
    second = iam.create_access_key(UserName=name)["AccessKey"]["AccessKeyId"]
    broker = _signing_broker(tmp_path, moto_endpoint, key, monkeypatch)
    error = _rotate_and_stop(broker, 400)
    assert "rotate-root refused" in error and second in error, error
    keys = {k["AccessKeyId"] for k in iam.list_access_keys(UserName=name)["AccessKeyMetadata"]}
    assert keys == {key["id"], second}


def test_rotate_root_without_access_key_is_a_400(tmp_path: Path, moto_endpoint: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount signing with boto3's own credentials (no access_key) cannot rotate them: 400."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    broker = start_broker(write_config(tmp_path, f"""
[mounts.aws]
plugin = "aws"
region = "us-east-1"
endpoint_url = "{moto_endpoint}"
"""))
    assert "needs the mount option access_key" in _rotate_and_stop(broker, 400)


def test_rotate_root_access_denied_is_a_400(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS refusing the mount's user iam:CreateAccessKey (moto with IAM auth on): 400 with
    AWS's AccessDenied and the permissions it needs, not a 503 that invites retries."""
    from tests.conformance.aws_harness import _client, moto_with_auth

    with moto_with_auth() as auth:
        admin = _client(auth.endpoint, "iam", auth.access_key, auth.secret_key)
        name = f"r3-{uuid.uuid4().hex[:8]}"
        admin.create_user(UserName=name)
        admin.put_user_policy(UserName=name, PolicyName="no-create", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Resource": "*",
                "Action": ["sts:GetCallerIdentity", "iam:GetUser", "iam:ListAccessKeys"]}]}))
        key = admin.create_access_key(UserName=name)["AccessKey"]
        broker = _signing_broker(tmp_path, auth.endpoint,
                                 {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]},
                                 monkeypatch)
        error = _rotate_and_stop(broker, 400)
        assert "AccessDenied" in error and "iam:CreateAccessKey" in error, error
        keys = admin.list_access_keys(UserName=name)["AccessKeyMetadata"]
        assert [k["AccessKeyId"] for k in keys] == [key["AccessKeyId"]]


def test_rotate_root_unreachable_endpoint_stays_a_503(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS out of reach: still 503 (trying again later may work)."""
    dead = f"http://127.0.0.1:{free_port()}"
    broker = _signing_broker(tmp_path, dead, {"id": "AKIADEAD", "secret": "dead"}, monkeypatch)
    assert "rotate-root failed" in _rotate_and_stop(broker, 503)


# -- 3. STS leases shorter than their credential ---------------------------------------------


@pytest.fixture
def sts_broker(tmp_path: Path, moto_endpoint: str, tag: str) -> Iterator[tuple[BrokerThread, str]]:
    """A broker whose STS roles have max_ttl 2s (under AWS's 900 s minimum): (broker, role
    name of the assumed_role role)."""
    role_name = f"{tag}-role"
    ttls = {"default_ttl": "2s", "max_ttl": "2s"}  # every role: under AWS's 900 s minimum
    with moto_role(moto_endpoint, role_name) as arn:
        leases = '\n[leases]\nrevoke_backoff_base = "1s"\n'
        body = (leases + aws_mount(moto_endpoint)
                + aws_role("assumed", "assumed_role", role_arns=[arn], **ttls)
                + aws_role("fed", "federation_token", policy_document=READ_ONLY, **ttls)
                + aws_role("session", "session_token", **ttls))
        with aws_broker(tmp_path, body, force=True) as server:
            yield server, role_name


def _issue_capped(broker: BrokerThread, role: str) -> dict[str, Any]:
    """GET aws/sts/ROLE on sts_broker's broker: the issue answer, whose lease is capped at
    the role's 2s (the credential itself lives AWS's 900 s)."""
    resp = requests.get(f"{broker.url}/v1/aws/sts/{role}", headers=_headers(broker),
                        timeout=60)
    assert resp.status_code == 200, resp.text
    issued: dict[str, Any] = resp.json()
    assert issued["lease_duration"] <= 2
    return issued


@pytest.mark.parametrize("role", ["fed", "session"])
def test_unrevocable_sts_lease_capped_below_its_credential_does_not_claim_it_ended(
    sts_broker: tuple[BrokerThread, str], role: str,
) -> None:
    """A federation/session token lease capped at 2s (AWS's minimum is 900s) goes irrevocable
    at its expiry, saying the credential works until its AWS expiry; only after that does
    the irrevocable retry end it as expired."""
    broker, _ = sts_broker
    lease_id = _issue_capped(broker, role)["lease_id"]
    assert _wait_state(broker, lease_id, {"irrevocable", "expired"}) == "irrevocable"
    events = _audit(broker, lease_id)
    assert not [e for e in events if e["type"] == "expire"], events
    gave_up = [e for e in events if e["type"] == "irrevocable"]
    assert len(gave_up) == 1, events
    assert "stays valid until its AWS expiry" in gave_up[0]["error"], gave_up[0]
    listed = requests.get(f"{broker.url}/v1/sys/leases/irrevocable", headers=_headers(broker),
                          timeout=30).text
    assert lease_id in listed
    # The irrevocable retry, once AWS's expiry has passed (the backend's clock moved on).
    assert broker.state is not None
    backend = broker.state.engine.mount("aws").backend
    assert isinstance(backend, AWSBackend)
    backend.clock = lambda: time.time() + 3600
    broker.call(broker.state.store.requeue_irrevocable(now=time.time(), limit=100))
    broker.loop.call_soon_threadsafe(broker.state.engine.wake, None)
    assert _wait_state(broker, lease_id, {"expired", "revoked"}) == "expired"
    assert [e["type"] for e in _audit(broker, lease_id)].count("expire") == 1


def test_assumed_role_lease_capped_below_its_credential_denies_the_session(
    sts_broker: tuple[BrokerThread, str], moto_endpoint: str,
) -> None:
    """An assumed-role lease capped at 2s: its expiry cuts the 900 s AWS session short with
    the role's deny policy on that session's aws:userid, and only then reads expired."""
    broker, role_name = sts_broker
    issued = _issue_capped(broker, "assumed")
    assert _wait_state(broker, issued["lease_id"], {"expired", "irrevocable"}) == "expired"
    doc = aws_client(moto_endpoint, "iam").get_role_policy(
        RoleName=role_name, PolicyName=aws_sts.DENY_POLICY_NAME)["PolicyDocument"]
    session = issued["data"]["arn"].rsplit("/", 1)[-1]
    denied = {uid for stmt in doc["Statement"]
              for uid in stmt["Condition"]["StringLike"]["aws:userid"]}
    assert any(uid.endswith(f":{session}") for uid in denied), doc
