#!/bin/sh
# Creates the broker's mount admin in the compose PostgreSQL, as
# docs/plugins.md tells operators to: CREATEROLE and pg_signal_backend, no
# superuser. The postgres image runs this once, when it initialises an empty
# data directory (/docker-entrypoint-initdb.d), as the superuser
# ($POSTGRES_USER) on $POSTGRES_DB. tests/integration/test_deploy_admin.py
# runs it against a real server and leases roles through the admin it makes.
set -eu

password_file=${BROKER_ADMIN_PASSWORD_FILE:-/run/secrets/pg-admin}
# The password goes in as a psql variable, quoted by psql (:'...'), never
# pasted into the SQL text or a command line.
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     --set admin_password="$(cat "$password_file")" <<'SQL'
CREATE ROLE broker_admin LOGIN CREATEROLE PASSWORD :'admin_password';
-- Ends a revoked lease's open sessions.
GRANT pg_signal_backend TO broker_admin;
-- What the `readonly` role's creation statements grant, with the right to
-- grant it: SELECT on the tables of schema public, now and later.
GRANT USAGE ON SCHEMA public TO broker_admin WITH GRANT OPTION;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO broker_admin WITH GRANT OPTION;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT ON TABLES TO broker_admin WITH GRANT OPTION;
SQL
