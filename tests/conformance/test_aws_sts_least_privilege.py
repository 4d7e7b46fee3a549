"""The aws plugin's STS credentials, signed by an IAM user holding only docs/aws.md's actions.

moto here checks every call against the signer's policy (``moto_auth``), so
a call the plugin makes that the docs do not list fails. Every resource
below is ``*`` (moto does not match IAM resource ARNs the way AWS does), and
no role is assumed: with auth on, moto refuses ``sts:AssumeRole`` to any
signer, whatever its policy.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from broker.backend import DeleteUserRequest, MountSpec, NewUserRequest, RoleSpec
from plugins import aws_sts
from plugins.aws import AWSBackend
from tests.conformance.aws_harness import ACCOUNT, REGION, MotoAuth, _client

pytestmark = pytest.mark.integration

#: docs/aws.md, "Permissions the broker needs", for the three STS credential types.
STS_ACTIONS = [
    "sts:GetCallerIdentity",
    "sts:AssumeRole", "sts:TagSession",  # assumed_role
    "iam:GetRole", "iam:GetRolePolicy", "iam:PutRolePolicy", "iam:DeleteRolePolicy",  # its revoke
    "sts:GetFederationToken",  # federation_token
    "sts:GetSessionToken",  # session_token
]
TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
    "Action": ["sts:AssumeRole", "sts:TagSession"]}]}
SESSION_POLICY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]}


@pytest.fixture
def signer(moto_auth: MotoAuth) -> Iterator[tuple[str, str, str]]:
    """An IAM user with only STS_ACTIONS, its access key, and a role it may assume."""
    iam = _client(moto_auth.endpoint, "iam", moto_auth.access_key, moto_auth.secret_key)
    tag = secrets.token_hex(3)
    user, role = f"broker-sts-lp-{tag}", f"broker-sts-lp-role-{tag}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="broker", PolicyDocument=json.dumps(
        {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Action": STS_ACTIONS, "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    arn = iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(TRUST),
                          MaxSessionDuration=43200)["Role"]["Arn"]
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"], arn
    finally:
        for name in iam.list_role_policies(RoleName=role)["PolicyNames"]:
            iam.delete_role_policy(RoleName=role, PolicyName=name)
        iam.delete_role(RoleName=role)
        iam.delete_access_key(UserName=user, AccessKeyId=key["AccessKeyId"])
        iam.delete_user_policy(UserName=user, PolicyName="broker")
        iam.delete_user(UserName=user)
        iam.close()


ROLES: dict[str, dict[str, object]] = {
    "assumed": {"credential_type": "assumed_role"},
    "federated": {"credential_type": "federation_token", "policy_document": SESSION_POLICY},
    "session": {"credential_type": "session_token"},
}


def _roles(role_arn: str) -> dict[str, RoleSpec]:
    arns: dict[str, object] = {"role_arns": [role_arn]}
    return {name: RoleSpec(name=name, default_ttl=3600, max_ttl=86400,
                           options={**options, **(arns if name == "assumed" else {})})
            for name, options in ROLES.items()}


@pytest.fixture
async def backend(moto_auth: MotoAuth, signer: tuple[str, str, str]
                  ) -> AsyncIterator[AWSBackend]:
    key_id, secret, role_arn = signer
    mount = MountSpec(name="aws", plugin="aws", roles=_roles(role_arn), secret=secret,
                      options={"region": REGION, "endpoint_url": moto_auth.endpoint,
                               "access_key": key_id})
    made = AWSBackend.from_config(mount)
    await made.initialize()
    try:
        yield made
    finally:
        await made.close()


def _request(role: RoleSpec) -> NewUserRequest:
    return NewUserRequest(role=role, username=f"v-aws-{secrets.token_hex(5)}",
                          password="unused-by-aws",
                          expiration=datetime.now(UTC) + timedelta(hours=1),
                          lease_id=f"aws/creds/{role.name}/{secrets.token_hex(8)}")


async def test_sts_credentials_issue_and_revoke_with_the_documented_actions(
    backend: AWSBackend, moto_auth: MotoAuth, signer: tuple[str, str, str],
) -> None:
    role_arn = signer[2]
    roles = _roles(role_arn)
    # Issue: federation_token and session_token. (moto refuses AssumeRole to
    # any signer once auth is on, whatever its policy, so that one cannot be
    # issued here; tests/integration/test_aws_backend.py covers it without auth.)
    for name in ("federated", "session"):
        resp = await backend.new_user(_request(roles[name]))
        assert resp.data["access_key"] and resp.data["security_token"], name
    # Revoke an assumed-role session early: the role's deny policy, written with
    # the documented iam:GetRole / GetRolePolicy / PutRolePolicy.
    iam = _client(moto_auth.endpoint, "iam", moto_auth.access_key, moto_auth.secret_key)
    try:
        role_name = role_arn.rsplit("/", 1)[1]
        role_id = iam.get_role(RoleName=role_name)["Role"]["RoleId"]
        session = f"v-aws-{secrets.token_hex(5)}"
        await backend.delete_user(DeleteUserRequest(
            role=roles["assumed"], username=session, reason="revoke", revocation={
                "credential_type": "assumed_role", "role_arn": role_arn,
                "session_name": session, "assumed_role_id": f"{role_id}:{session}",
                "expires_at": (datetime.now(UTC) + timedelta(hours=1)).timestamp()}))
        assert iam.list_role_policies(RoleName=role_name)["PolicyNames"] == [
            aws_sts.DENY_POLICY_NAME]
    finally:
        iam.close()
