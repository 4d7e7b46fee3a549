"""End to end through the HTTP API and hvac: MariaDB/MySQL users and AWS credentials."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomysql
import hvac
import hvac.exceptions
import pymysql
import pytest
from botocore.exceptions import ClientError

from tests.conftest import run
from tests.integration.aws_fixtures import aws_broker, aws_role, create_role
from tests.integration.broker_harness import (
    BrokerThread,
    aws_client,
    aws_mount,
    config_url,
    spawn_broker,
    wait_healthy,
    write_config,
)

pytestmark = pytest.mark.integration

#: The iam_user role of both the in-process broker and the DEBUG-logging daemon.
IAM_USER_ROLE = aws_role("ci-user", "iam_user", policy_document=json.dumps(
    {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:List*", "Resource": "*"}]}))


@pytest.fixture
def broker(tmp_path: Path, mysql_dsn: str, moto_endpoint: str,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerThread]:
    url = urlsplit(mysql_dsn)
    (tmp_path / "my.pw").write_text(url.password or "")
    role_arn = create_role(moto_endpoint, f"broker-e2e-{uuid.uuid4().hex[:8]}")["Arn"]
    monkeypatch.setenv("BROKER_TEST_AWS_SECRET", "testing")
    body = f"""
[mounts.my]
plugin = "mysql"
connection_url = "mysql://{url.username}@{url.hostname}:{url.port or 3306}{url.path}"
{'password_file = "my.pw"' if url.password else ''}

[mounts.my.roles.readonly]
database = "{url.path.lstrip('/') or 'test'}"
default_ttl = "1h"
max_ttl = "2h"

[mounts.my.roles.short]
database = "{url.path.lstrip('/') or 'test'}"
default_ttl = "2s"
max_ttl = "1m"

{aws_mount(moto_endpoint)}
{aws_role("deploy", "assumed_role", role_arns=[role_arn])}
[policies.sts-only]
"aws/sts/deploy" = ["read", "update"]

{IAM_USER_ROLE}"""
    with aws_broker(tmp_path, body, prefixes=("my/", "aws/")) as server:
        yield server


async def mysql_connect(dsn: str, user: str, password: str) -> aiomysql.Connection:
    url = urlsplit(dsn)
    return await aiomysql.connect(host=url.hostname, port=url.port or 3306, user=user,
                                  password=password, db=url.path.lstrip("/") or None)


def test_mysql_issue_connect_revoke_kills_session(broker: BrokerThread, mysql_dsn: str) -> None:
    """A MySQL user from hvac connects; revoking it kills the open connection and drops it."""
    client = hvac.Client(url=broker.url, token=broker.root_token)
    resp = client.secrets.database.generate_credentials("readonly", mount_point="my")
    user, password = resp["data"]["username"], resp["data"]["password"]
    assert len(user) <= 32

    async def scenario() -> tuple[int, bool]:
        conn = await mysql_connect(mysql_dsn, user, password)
        try:
            async with conn.cursor() as cur:
                await cur.execute("SELECT 1")
                (one,) = await cur.fetchone()
            await asyncio_to_thread(client.sys.revoke_lease, resp["lease_id"])
            try:
                async with conn.cursor() as cur:
                    await cur.execute("SELECT 1")
                return one, False
            except (pymysql.err.OperationalError, pymysql.err.InterfaceError):
                return one, True
        finally:
            conn.close()

    one, killed = run(scenario())
    assert one == 1 and killed, "the open MySQL session outlived the revoked lease"
    assert not can_login(mysql_dsn, user, password)


def test_mysql_expiry_is_enforced_by_the_broker(broker: BrokerThread, mysql_dsn: str) -> None:
    """MySQL has no server-side expiry: the sweeper drops the user about when the lease ends."""
    client = hvac.Client(url=broker.url, token=broker.root_token)
    resp = client.secrets.database.generate_credentials("short", mount_point="my")
    user, password = resp["data"]["username"], resp["data"]["password"]
    assert can_login(mysql_dsn, user, password)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and can_login(mysql_dsn, user, password):
        time.sleep(0.2)
    assert not can_login(mysql_dsn, user, password), \
        "the MySQL user still logs in 6s after a 2s lease"


def can_login(dsn: str, user: str, password: str) -> bool:
    url = urlsplit(dsn)
    try:
        pymysql.connect(host=url.hostname, port=url.port or 3306, user=user,
                        password=password, connect_timeout=5).close()
        return True
    except pymysql.err.OperationalError:
        return False


def test_aws_assumed_role_via_api(broker: BrokerThread, moto_endpoint: str) -> None:
    """hvac's AWS call returns STS credentials that work; the lease is honest about revocation."""
    client = hvac.Client(url=broker.url, token=broker.root_token)
    resp = client.secrets.aws.generate_credentials("deploy", mount_point="aws")
    data = resp["data"]
    assert {"access_key", "secret_key", "security_token"} <= set(data)
    arn = aws_client(moto_endpoint, "sts", data).get_caller_identity()["Arn"]
    assert ":assumed-role/" in arn
    assert resp["renewable"] is False  # STS credentials cannot be extended
    assert resp["lease_duration"] == 900  # 15m role default; AWS's minimum is 900s
    with pytest.raises(hvac.exceptions.InvalidRequest, match="not renewable"):
        client.sys.renew_lease(resp["lease_id"], increment=60)


def test_aws_sts_path_is_checked_against_the_policy_on_that_path(broker: BrokerThread) -> None:
    """``aws/sts/deploy`` needs a grant on aws/sts/deploy, as in Vault (it was checked
    against aws/creds/deploy, so docs/auth.md's ``aws/sts/...`` example granted nothing)."""
    root = hvac.Client(url=broker.url, token=broker.root_token)
    token = root.auth.token.create(policies=["sts-only"], ttl="10m")["auth"]["client_token"]
    client = hvac.Client(url=broker.url, token=token)
    resp = client.secrets.aws.generate_credentials("deploy", endpoint="sts", mount_point="aws")
    assert resp["data"]["access_key"]
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.aws.generate_credentials("deploy", endpoint="creds", mount_point="aws")


def test_aws_iam_user_revoked_through_api(broker: BrokerThread, moto_endpoint: str) -> None:
    """An iam_user credential is a real IAM user, renewable in the broker; revoking deletes it."""
    client = hvac.Client(url=broker.url, token=broker.root_token)
    resp = client.secrets.aws.generate_credentials("ci-user", mount_point="aws")
    assert resp["renewable"] is True
    iam = aws_client(moto_endpoint, "iam")
    user = _user_for_key(iam, resp["data"]["access_key"])
    assert user is not None
    renewed = client.sys.renew_lease(resp["lease_id"], increment=1800)
    assert renewed["lease_duration"] == 1800
    iam.get_user(UserName=user)  # renewing sent nothing to AWS that could harm the user
    client.sys.revoke_lease(resp["lease_id"])
    with pytest.raises(ClientError, match="NoSuchEntity"):
        iam.get_user(UserName=user)


def _user_for_key(iam: Any, key_id: str) -> str | None:
    for page in iam.get_paginator("list_users").paginate(PathPrefix="/broker/"):
        for u in page["Users"]:
            ids = [k["AccessKeyId"] for k in
                   iam.list_access_keys(UserName=u["UserName"])["AccessKeyMetadata"]]
            if key_id in ids:
                return str(u["UserName"])
    return None


async def asyncio_to_thread(fn: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args)


def test_debug_logging_never_prints_issued_aws_secrets(tmp_path: Path, moto_endpoint: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """BROKER_LOG_LEVEL=DEBUG on a real daemon: the SDK's response bodies stay out of the log."""
    monkeypatch.setenv("BROKER_TEST_AWS_SECRET", "testing")
    config = write_config(tmp_path, aws_mount(moto_endpoint) + IAM_USER_ROLE)
    init = subprocess.run([sys.executable, "-m", "broker.cli", "operator", "init", "--config",
                           str(config)], capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    token = init.stdout.strip().splitlines()[-1]
    url = config_url(config)
    proc = spawn_broker(config, env={"BROKER_LOG_LEVEL": "DEBUG"})
    try:
        wait_healthy(url)
        client = hvac.Client(url=url, token=token)
        resp = client.secrets.aws.generate_credentials("ci-user", mount_point="aws")
        client.sys.revoke_lease(resp["lease_id"])
    finally:
        proc.terminate()
        proc.wait(30)
    log = (tmp_path / "server.log").read_text()
    assert "[DEBUG]" in log, "the daemon did not log at DEBUG at all"
    assert resp["data"]["secret_key"] not in log
    assert token not in log
