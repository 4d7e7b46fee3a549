"""Vault read paths hvac users hit, round 6, against a real broker over HTTP: the audit
devices (``sys/audit``) and a database mount's connection (``{mount}/config``), with a
postgres mount on PostgreSQL, a mysql mount on MariaDB and an aws mount on moto.

Both are read-only: the audit log and the mounts are set in the config file, so
enabling, configuring, deleting and resetting answer 405 saying where. Neither
answer ever carries a secret: not the admin password (from a ``password_file`` or
a ``password_env``), nor the audit key.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import hvac.exceptions
import pytest
import requests

from broker.api.db_config import redacted_url
from tests.integration.api_fixtures import conforms, raw
from tests.integration.broker_harness import (
    ROOT_TOKEN,
    BrokerThread,
    aws_mount,
    start_broker,
    write_config,
)
from tests.integration.db_fixtures import drop_mysql_accounts, mysql_query, mysql_url
from tests.integration.token_fixtures import audit_events, client, made_by_root

pytestmark = pytest.mark.integration

#: The MariaDB admin account the mysql mount logs in as (made and dropped here).
MY_ADMIN_PREFIX = "h14adm_"
MY_ADMIN_ENV = "BROKER_TEST_H14_MYSQL_ADMIN"

POLICIES = """
[policies.conn-reader]
"pg/config/pg" = ["read"]
"pg/config" = ["list"]

# Written for Vault: a LIST is checked on "my/config/".
[policies.vault-conn-reader]
"my/config/*" = ["read", "list"]

[policies.aws-reader]
"aws/config/*" = ["read", "list"]
"aws/config" = ["list"]

[policies.audit-reader]
"sys/audit" = ["read", "sudo"]

[policies.audit-read-only]
"sys/audit" = ["read"]

[policies.audit-sudo-only]
"sys/audit" = ["sudo"]
"""


class Secrets:
    """The admin secrets the broker holds, which no answer may show."""

    def __init__(self) -> None:
        self.pg_file = f"h14-pg-file-secret-{secrets.token_hex(8)}"
        self.my_env = f"h14-my-env-secret-{secrets.token_hex(8)}"
        self.aws_env = "testing"  # moto's: any value works

    def absent_from(self, text: str) -> None:
        assert self.pg_file not in text and self.my_env not in text, text


@pytest.fixture(scope="module")
def held() -> Secrets:
    return Secrets()


@pytest.fixture(scope="module")
def my_admin(mysql_dsn: str, held: Secrets) -> Iterator[str]:
    """A MariaDB account with a password (``held.my_env``) that may manage users."""
    name = MY_ADMIN_PREFIX + secrets.token_hex(4)
    drop_mysql_accounts(mysql_dsn, MY_ADMIN_PREFIX)
    mysql_query(mysql_dsn, "CREATE USER %s@%s IDENTIFIED BY %s", (name, "%", held.my_env))
    mysql_query(mysql_dsn, "GRANT ALL PRIVILEGES ON *.* TO %s@%s WITH GRANT OPTION",
                (name, "%"))
    try:
        yield name
    finally:
        drop_mysql_accounts(mysql_dsn, MY_ADMIN_PREFIX)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, postgres_dsn: str, mysql_dsn: str,
           moto_endpoint: str, my_admin: str, held: Secrets) -> Iterator[BrokerThread]:
    tmp = tmp_path_factory.mktemp("vault-reads-round6")
    pw = tmp / "pg.pw"
    pw.write_text(held.pg_file + "\n")  # trust auth: PostgreSQL does not ask for it
    pw.chmod(0o600)
    body = f"""
[mounts.pg]
plugin = "postgres"
connection_url = "{postgres_dsn}"
password_file = "{pw}"
max_open_connections = 3
connect_timeout = "5s"

[mounts.pg.roles.ro]
default_ttl = "1h"

[mounts.my]
plugin = "mysql"
connection_url = "{mysql_url(mysql_dsn, user=my_admin)}"
password_env = "{MY_ADMIN_ENV}"

[mounts.my.roles.ro]
database = "test"

{aws_mount(moto_endpoint)}
{POLICIES}"""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(MY_ADMIN_ENV, held.my_env)
        env.setenv("BROKER_TEST_AWS_SECRET", held.aws_env)
        server = start_broker(write_config(tmp, body))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def root(broker: BrokerThread) -> hvac.Client:
    return client(broker, ROOT_TOKEN)


def healthy(broker: BrokerThread, mount: str, timeout: float = 30) -> bool:
    """Whether ``mount`` is (or becomes, within ``timeout`` s) healthy in sys/health."""
    deadline = time.monotonic() + timeout
    while True:
        health = requests.get(f"{broker.url}/v1/sys/health", timeout=30).json()
        if health["mounts"][mount]["healthy"] or time.monotonic() > deadline:
            return bool(health["mounts"][mount]["healthy"])
        time.sleep(0.2)


# -- sys/audit ------------------------------------------------------------------------------
def test_sys_audit_lists_the_audit_log_as_vaults_file_device(broker: BrokerThread,
                                                            root: hvac.Client) -> None:
    """hvac's list_enabled_audit_devices: file/ with the log's path, in Vault's shape, under
    data and at the top level; the audit key (file or content) is nowhere in it."""
    answer = root.sys.list_enabled_audit_devices()
    expected = {
        "type": "file",
        "description": "",
        "options": {"file_path": broker.audit_path, "format": "json", "hmac_accessor": "true",
                    "log_raw": "false", "fsync": "false"},
        "local": False,
        "path": "file/",
    }
    assert answer["data"] == {"file/": expected}
    assert answer["file/"] == expected
    resp = raw(broker, "GET", "sys/audit")
    conforms("/v1/sys/audit", "GET", resp)
    key = Path(broker.config.audit.hmac_key_file)
    assert str(key) not in resp.text and key.name not in resp.text
    assert key.read_bytes().hex() not in resp.text
    assert key.read_bytes().decode("latin-1").strip() not in resp.text
    events = audit_events(broker, "audit_list")
    assert events and all(e["count"] == 1 for e in events)


def test_the_listed_device_is_the_one_audit_hash_takes(root: hvac.Client) -> None:
    """Every device sys/audit lists is a name sys/audit-hash accepts (hvac's calculate_hash)."""
    for path in root.sys.list_enabled_audit_devices()["data"]:
        digest = root.sys.calculate_hash(path.removesuffix("/"), "a value")
        assert digest["data"]["hash"].startswith("hmac-sha256:")


def test_sys_audit_needs_read_and_sudo(broker: BrokerThread, root: hvac.Client) -> None:
    """As in Vault (root-protected): the default policy, read alone and sudo alone are 403s;
    read and sudo together list the device."""
    for policies, missing in ((["default"], "read"), (["audit-read-only"], "sudo"),
                              (["audit-sudo-only"], "read")):
        caller = client(broker, made_by_root(root, policies))
        with pytest.raises(hvac.exceptions.Forbidden, match=f"{missing} on sys/audit"):
            caller.sys.list_enabled_audit_devices()
    reader = client(broker, made_by_root(root, ["audit-reader"]))
    assert list(reader.sys.list_enabled_audit_devices()["data"]) == ["file/"]


def test_audit_devices_are_not_enabled_or_disabled_over_the_api(broker: BrokerThread,
                                                                root: hvac.Client) -> None:
    """hvac's enable_audit_device and disable_audit_device: 405 saying [audit] sets the log,
    with an Allow header; a read of sys/audit/NAME and a LIST of sys/audit are 405s too."""
    with pytest.raises(hvac.exceptions.UnexpectedError, match=r"\[audit\]"):
        root.sys.enable_audit_device("file", options={"file_path": "elsewhere.log"})
    with pytest.raises(hvac.exceptions.UnexpectedError, match=r"\[audit\]"):
        root.sys.disable_audit_device("file")
    for method, path in (("PUT", "sys/audit/file"), ("POST", "sys/audit/other"),
                         ("DELETE", "sys/audit/file/"), ("GET", "sys/audit/file"),
                         ("PUT", "sys/audit")):
        resp = raw(broker, method, path, json={"type": "file"})
        assert resp.status_code == 405, (method, path, resp.text)
        assert "Allow" in resp.headers and resp.json()["errors"], resp.text
    listed = raw(broker, "GET", "sys/audit", params={"list": "true"})
    assert (listed.status_code, listed.headers["Allow"]) == (405, "GET")
    # The folder, with its slash, is the list itself.
    assert raw(broker, "GET", "sys/audit/").json()["data"] == \
        root.sys.list_enabled_audit_devices()["data"]


# -- {mount}/config: the database connection -----------------------------------------------
def test_read_connection_of_a_postgres_mount(broker: BrokerThread, root: hvac.Client,
                                             postgres_dsn: str, held: Secrets) -> None:
    """hvac's read_connection("pg", mount_point="pg"): Vault's shape, the mount's options as
    configured, the admin user; the password_file's secret is not in the answer."""
    data = root.secrets.database.read_connection("pg", mount_point="pg")["data"]
    assert data == {
        "plugin_name": "postgresql-database-plugin",
        "plugin_version": "",
        "connection_details": {"connection_url": postgres_dsn, "username": "postgres",
                               "max_open_connections": 3, "connect_timeout": "5s"},
        "allowed_roles": ["*"],
        "root_credentials_rotate_statements": [],
        "password_policy": "",
        "verify_connection": True,
    }
    resp = raw(broker, "GET", "pg/config/pg")
    conforms("/v1/{mount}/config/{name}", "GET", resp, mount="pg", name="pg")
    held.absent_from(resp.text)
    assert "password_file" not in resp.text and "pg.pw" not in resp.text
    assert any(e.get("mount") == "pg" and e.get("connection") == "pg" and e["outcome"] == "ok"
               for e in audit_events(broker, "config_read"))


def test_read_connection_of_a_mysql_mount(broker: BrokerThread, root: hvac.Client,
                                          mysql_dsn: str, my_admin: str,
                                          held: Secrets) -> None:
    """The mysql mount, healthy on its password_env secret: Vault's mysql plugin name, the
    pool size in force (the default the backend uses), no secret and no env var name."""
    assert healthy(broker, "my")  # the password_env secret is the real one
    data = root.secrets.database.read_connection("my", mount_point="my")["data"]
    assert data["plugin_name"] == "mysql-database-plugin"
    details = data["connection_details"]
    assert details == {"connection_url": mysql_url(mysql_dsn, user=my_admin),
                       "username": my_admin, "max_open_connections": 4}
    assert broker.state is not None
    assert details["max_open_connections"] == broker.state.engine.mount("my").backend._max_open
    resp = raw(broker, "GET", "my/config/my")
    held.absent_from(resp.text)
    assert MY_ADMIN_ENV not in resp.text and "password_env" not in resp.text


def test_list_connections_names_the_mount(broker: BrokerThread, root: hvac.Client) -> None:
    """hvac's list_connections: the mount's one connection, named as the mount; also as
    GET ?list=true and on the folder; a plain GET of the folder is a 405, as in Vault."""
    assert root.secrets.database.list_connections(mount_point="pg")["data"] == {"keys": ["pg"]}
    assert root.secrets.database.list_connections(mount_point="my")["data"] == {"keys": ["my"]}
    resp = raw(broker, "GET", "pg/config", params={"list": "true"})
    conforms("/v1/{mount}/config", "GET", resp, mount="pg")
    assert raw(broker, "LIST", "my/config/").json()["data"] == {"keys": ["my"]}
    plain = raw(broker, "GET", "pg/config")
    assert (plain.status_code, plain.headers["Allow"]) == (405, "GET,LIST")


def test_another_name_or_mount_is_a_404(broker: BrokerThread, root: hvac.Client) -> None:
    """A name other than the mount's: Vault's bare 404 (hvac's InvalidPath), audited; an
    unknown mount: 404 naming it; an aws mount has no such paths: 404 unsupported path."""
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.secrets.database.read_connection("my-postgresql-database", mount_point="pg")
    bare = raw(broker, "GET", "pg/config/my")
    assert (bare.status_code, bare.json()) == (404, {"errors": []})
    assert any(e["outcome"] == "error" and e.get("connection") == "my-postgresql-database"
               for e in audit_events(broker, "config_read"))
    unknown = raw(broker, "GET", "nope/config/nope")
    assert (unknown.status_code, unknown.json()) == (404, {"errors": ["no mount named 'nope'"]})
    for method, path in (("GET", "aws/config/aws"), ("LIST", "aws/config"),
                         ("GET", "aws/config/root"), ("DELETE", "aws/config/aws"),
                         ("POST", "aws/reset/aws")):
        resp = raw(broker, method, path)
        assert (resp.status_code, resp.json()) == (404, {"errors": ["unsupported path"]}), path
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.secrets.database.list_connections(mount_point="aws")


def test_reading_a_connection_needs_a_grant_checked_first(broker: BrokerThread,
                                                          root: hvac.Client) -> None:
    """The default policy may neither read nor list (403, the same for a name or mount that
    does not exist); read/list grants, and a Vault policy's my/config/*, may."""
    default = client(broker, made_by_root(root, ["default"]))
    for call in (lambda: default.secrets.database.read_connection("pg", mount_point="pg"),
                 lambda: default.secrets.database.read_connection("x", mount_point="pg"),
                 lambda: default.secrets.database.read_connection("x", mount_point="nope"),
                 lambda: default.secrets.database.list_connections(mount_point="pg")):
        with pytest.raises(hvac.exceptions.Forbidden):
            call()
    reader = client(broker, made_by_root(root, ["conn-reader"]))
    assert reader.secrets.database.read_connection("pg", mount_point="pg")["data"]
    assert reader.secrets.database.list_connections(mount_point="pg")["data"]["keys"] == ["pg"]
    with pytest.raises(hvac.exceptions.Forbidden, match="read on my/config/my"):
        reader.secrets.database.read_connection("my", mount_point="my")
    vault_style = client(broker, made_by_root(root, ["vault-conn-reader"]))
    assert vault_style.secrets.database.list_connections(mount_point="my")["data"]["keys"] \
        == ["my"]
    assert vault_style.secrets.database.read_connection("my", mount_point="my")["data"]


def test_connections_are_not_written_over_the_api(broker: BrokerThread, root: hvac.Client,
                                                  postgres_dsn: str) -> None:
    """hvac's configure, delete_connection and reset_connection: 405 naming [mounts.pg],
    with an Allow header; the connection reads the same afterwards."""
    before = root.secrets.database.read_connection("pg", mount_point="pg")["data"]
    database = root.secrets.database
    for write in (lambda: database.configure("pg", "postgresql-database-plugin",
                                             mount_point="pg", connection_url=postgres_dsn),
                  lambda: database.delete_connection("pg", mount_point="pg"),
                  lambda: database.reset_connection("pg", mount_point="pg")):
        with pytest.raises(hvac.exceptions.UnexpectedError, match=r"\[mounts\.pg\]"):
            write()
    for method, path, allow in (("POST", "pg/config/pg", "GET"),
                                ("DELETE", "pg/config/pg", "GET"),
                                ("PUT", "pg/config", "GET,LIST"),
                                ("POST", "pg/reset/pg", ""),
                                ("GET", "pg/reset/pg", "")):
        resp = raw(broker, method, path, json={})
        assert (resp.status_code, resp.headers.get("Allow")) == (405, allow), (method, path)
    assert root.secrets.database.read_connection("pg", mount_point="pg")["data"] == before


def test_config_rotate_root_is_still_rotate_roots_path(broker: BrokerThread) -> None:
    """{mount}/config/rotate-root takes a POST only (rotate-root): a GET there is the 405 it
    was, on a database mount and on the aws one, not a connection read."""
    for mount in ("pg", "aws"):
        resp = raw(broker, "GET", f"{mount}/config/rotate-root")
        assert (resp.status_code, resp.headers["Allow"]) == (405, "POST"), resp.text


def test_a_password_in_a_connection_url_is_shown_as_vault_shows_it() -> None:
    """Go's url.Redacted: the password becomes xxxxx; so does a secret-named (or passfile)
    query parameter; a URL without either is unchanged."""
    assert redacted_url("postgresql://admin:hunter2@db:5432/app?sslmode=require&password=s3"
                        "&passfile=%2Fpw") == \
        "postgresql://admin:xxxxx@db:5432/app?sslmode=require&password=xxxxx&passfile=xxxxx"
    plain = "mysql://admin@db:3306/app"
    assert redacted_url(plain) == plain


def test_every_answer_here_is_free_of_the_secrets(broker: BrokerThread, held: Secrets) -> None:
    """Whatever the method or path of this round, as root, no answer carries a secret."""
    for method, path in (("GET", "sys/audit"), ("GET", "pg/config/pg"), ("GET", "my/config/my"),
                         ("LIST", "pg/config"), ("LIST", "my/config"),
                         ("GET", "pg/config/nope"), ("POST", "pg/config/pg")):
        held.absent_from(raw(broker, method, path).text)
    held.absent_from(json.dumps(audit_events(broker, "config_read")))
