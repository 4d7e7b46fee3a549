"""deploy/compose/postgres-init/10-broker-admin.sh, run against a real server.

The compose demo's PostgreSQL gives the broker a least-privilege admin made
by that script (no Docker engine here to run the image, so the script runs
as the image would run it: sh, psql, $POSTGRES_USER and $POSTGRES_DB). Then
a broker leases roles through that admin with the compose config's own
`readonly` creation statements: the role can read tables made before and
after the script ran, and its revocation leaves nothing behind.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import requests

from tests.conftest import run, server_missing
from tests.integration.broker_harness import pg_execute, pg_roles, start_broker, write_config
from tests.integration.test_api_postgres import fetchval

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "compose" / "postgres-init" / "10-broker-admin.sh"
COMPOSE_CONFIG = ROOT / "deploy" / "compose" / "broker.toml"
ADMIN = "broker_admin"  # the name the script and the compose config use
PREFIX = "dpl-"


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _in_db(dsn: str, database: str, user: str | None = None, password: str | None = None) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if user is not None:
        host = netloc.rpartition("@")[2]
        netloc = f"{user}:{password}@{host}" if password else f"{user}@{host}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}"))


@pytest.fixture
def app_database(postgres_dsn: str) -> Iterator[str]:
    """A fresh database ("app"), dropped afterwards with the admin the script made."""
    if run(fetchval(postgres_dsn, "SELECT 1 FROM pg_roles WHERE rolname = $1", ADMIN)):
        # Fails under CI, skips elsewhere: a fresh server has no such role.
        server_missing(f"a server without a role {ADMIN} (one exists: the test would take "
                       "it over)")
    name = f"broker_deploy_{secrets.token_hex(5)}"
    run(pg_execute(postgres_dsn, f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        async def cleanup() -> None:
            for role in await pg_roles(postgres_dsn, PREFIX):
                await pg_execute(postgres_dsn, f'DROP ROLE IF EXISTS "{role}"')
            # The database holds the admin's grants and default privileges: it goes first.
            await pg_execute(postgres_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
                       f'DROP ROLE IF EXISTS "{ADMIN}"')
        run(cleanup())


def test_the_compose_admin_script_makes_a_least_privilege_admin_that_works(
        tmp_path: Path, postgres_dsn: str, app_database: str) -> None:
    superuser_db = _in_db(postgres_dsn, app_database)
    run(pg_execute(superuser_db, "CREATE TABLE public.before_script (x int)",
             "INSERT INTO public.before_script VALUES (1)"))
    password = secrets.token_urlsafe(18)
    password_file = tmp_path / "pg-admin"
    password_file.write_text(password)
    parts = urlsplit(postgres_dsn)
    env = {**os.environ, "POSTGRES_USER": parts.username or "postgres",
           "POSTGRES_DB": app_database, "PGHOST": parts.hostname or "127.0.0.1",
           "PGPORT": str(parts.port or 5432), "BROKER_ADMIN_PASSWORD_FILE": str(password_file)}
    if parts.password:
        env["PGPASSWORD"] = parts.password
    done = subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr
    # Made later by the database's owner, as an application's migrations would.
    run(pg_execute(superuser_db, "CREATE TABLE public.after_script (x int)",
             "INSERT INTO public.after_script VALUES (2)"))

    assert run(fetchval(postgres_dsn,
                         "SELECT NOT rolsuper AND rolcreaterole AND NOT rolcreatedb"
                         " AND pg_has_role(oid, 'pg_signal_backend', 'MEMBER')"
                         " FROM pg_roles WHERE rolname = $1", ADMIN)) is True

    # The compose config's own mount: its creation statements, the admin's file secret.
    shipped = tomllib.loads(COMPOSE_CONFIG.read_text())["mounts"]["pg"]
    statements = shipped["roles"]["readonly"]["creation_statements"]
    assert shipped["connection_url"].startswith(f"postgresql://{ADMIN}@")
    toml_list = "[" + ", ".join(_toml_string(s) for s in statements) + "]"
    broker = start_broker(write_config(tmp_path, f"""
[mounts.pg]
plugin = "postgres"
connection_url = "{_in_db(postgres_dsn, app_database, ADMIN)}"
password_file = "{password_file}"

[mounts.pg.roles.readonly]
username_template = "{PREFIX}{{{{random 10}}}}"
creation_statements = {toml_list}
default_ttl = "1h"
max_ttl = "1h"
"""))
    headers = {"X-Vault-Token": broker.root_token}
    try:
        resp = requests.get(f"{broker.url}/v1/pg/creds/readonly", headers=headers, timeout=60)
        assert resp.status_code == 200, resp.text
        lease = resp.json()
        user, user_password = lease["data"]["username"], lease["data"]["password"]

        async def reads() -> list[int]:
            conn = await asyncpg.connect(_in_db(postgres_dsn, app_database, user, user_password))
            try:
                return [await conn.fetchval("SELECT x FROM public.before_script"),
                        await conn.fetchval("SELECT x FROM public.after_script")]
            finally:
                await conn.close()

        assert run(reads()) == [1, 2]
        resp = requests.put(f"{broker.url}/v1/sys/leases/revoke", headers=headers,
                            json={"lease_id": lease["lease_id"]}, timeout=60)
        assert resp.status_code == 204, resp.text
        assert run(pg_roles(postgres_dsn, PREFIX)) == set()
    finally:
        broker.stop()
