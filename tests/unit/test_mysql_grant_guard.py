"""The mysql plugin refuses, at config load, creation statements that let a lease outlive
its revocation: server-wide anything but reading and watching, a grant option at any
level, grants on `mysql`."""

from __future__ import annotations

import pytest

from broker.backend import MountSpec, PluginConfigError, RoleSpec
from plugins.mysql import MySQLBackend

CREATE = "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'"


def _role(grant: str) -> RoleSpec:
    return RoleSpec(name="app", default_ttl=60, max_ttl=600, options={"database": "app"},
                    creation_statements=(CREATE, grant))


@pytest.mark.parametrize("grant", [
    "GRANT ALL ON *.* TO '{{name}}'@'%'",
    "GRANT ALL PRIVILEGES ON `*`.`*` TO '{{name}}'@'%'",
    "grant all privileges on * . * to '{{name}}'@'%'",
    "GRANT ALL /**/ ON *.* TO '{{name}}'@'%'",
    "GRANT /*!ALL*/ ON *.* TO '{{name}}'@'%'",
    "GRANT /*!50100 ALL */ ON *.* TO '{{name}}'@'%'",
    "GRANT /*M!100000 SUPER */ ON *.* TO '{{name}}'@'%'",
    "GRANT ALL -- a comment\n ON *.* TO '{{name}}'@'%'",
    "GRANT ALL # a comment\n ON *.* TO '{{name}}'@'%'",
    "GRANT SUPER, CREATE USER, GRANT OPTION ON *.* TO '{{name}}'@'%'",
    "GRANT CREATE  USER ON *.* TO '{{name}}'@'%'",
    "GRANT SELECT, GRANT OPTION ON *.* TO '{{name}}'@'%'",
    "GRANT SELECT ON *.* TO '{{name}}'@'%' WITH GRANT OPTION",
    "GRANT SUPER ON *.* TO '{{name}}'@'%'",
    "GRANT ALL PRIVILEGES ON mysql.* TO '{{name}}'@'%'",
    "GRANT SELECT ON `mysql`.`user` TO '{{name}}'@'%'",
    "GRANT INSERT ON TABLE mysql . global_priv TO '{{name}}'@'%'",
    "SELECT 1; GRANT ALL ON *.* TO '{{name}}'@'%'",
    "SELECT '/*'; GRANT ALL ON *.* TO '{{name}}'@'%'; SELECT '*/'",
    "EXECUTE IMMEDIATE 'GRANT ALL /* x */ ON *.* TO ''{{name}}''@''%'''",
    # Review: global writes reach mysql.global_priv; a grant option hands rights on.
    "GRANT INSERT, UPDATE ON *.* TO '{{name}}'@'%'",
    "GRANT DELETE ON *.* TO '{{name}}'@'%'",
    "GRANT FILE ON *.* TO '{{name}}'@'%'",
    "GRANT SELECT, RELOAD ON *.* TO '{{name}}'@'%'",
    "GRANT SYSTEM_USER, ROLE_ADMIN ON *.* TO '{{name}}'@'%'",
    "GRANT SELECT ON app.* TO '{{name}}'@'%' WITH GRANT OPTION",
    "GRANT SELECT, GRANT OPTION ON app.* TO '{{name}}'@'%'",
    # PROCESS shows other sessions' statements: another lease's CREATE USER password.
    "GRANT PROCESS ON *.* TO '{{name}}'@'%'",
    "GRANT SELECT, SHOW VIEW, PROCESS, REPLICATION CLIENT ON *.* TO '{{name}}'@'%'",
])
def test_refused(grant: str) -> None:
    """Each way of writing a dangerous grant is refused, naming the role and the grant."""
    with pytest.raises(PluginConfigError) as err:
        MySQLBackend.validate_role(_role(grant))
    message = str(err.value)
    assert "roles.app.creation_statements[1]" in message, message
    assert "'app'" in message and "refusing GRANT" in message, message


@pytest.mark.parametrize("grant", [
    "GRANT SELECT ON `app`.* TO '{{name}}'@'%'",
    "GRANT SELECT, INSERT, UPDATE ON app.* TO '{{name}}'@'%'",
    "GRANT ALL PRIVILEGES ON `app`.* TO '{{name}}'@'%'",
    "GRANT SELECT (id, label) ON app.items TO '{{name}}'@'%'",
    "GRANT SELECT ON *.* TO '{{name}}'@'%'",
    "GRANT SELECT, SHOW VIEW, REPLICATION CLIENT ON *.* TO '{{name}}'@'%'",
    "GRANT SELECT ON `mysqlx`.* TO '{{name}}'@'%'",
    "GRANT SELECT ON app.* TO '{{name}}'@'%' -- ALL ON *.* would be refused",
])
def test_allowed(grant: str) -> None:
    """Database-level grants, harmless global ones and comments mentioning ALL pass."""
    MySQLBackend.validate_role(_role(grant))


@pytest.mark.parametrize(("options", "url", "where"), [
    ({"database": "mysql"}, "mysql://admin@127.0.0.1:3306/app", "roles.ro.database"),
    ({"database": "MySQL"}, "mysql://admin@127.0.0.1:3306/app", "roles.ro.database"),
    ({"database": "performance_schema"}, "mysql://admin@127.0.0.1:3306/app",
     "roles.ro.database"),
    ({}, "mysql://admin@127.0.0.1:3306/mysql", "connection_url"),
])
def test_the_default_grant_on_a_system_schema_is_refused(
    options: dict[str, str], url: str, where: str,
) -> None:
    """The default statements grant SELECT on `{{database}}`.*: with database "mysql" every
    lease could read every account's password hash (security review). Refused at load,
    naming the key that set it."""
    role = RoleSpec(name="ro", default_ttl=60, max_ttl=600, options=options)
    mount = MountSpec(name="my", plugin="mysql", roles={"ro": role},
                      options={"connection_url": url})
    with pytest.raises(PluginConfigError) as err:
        MySQLBackend.from_config(mount)
    assert where in str(err.value) and "system schema" in str(err.value), str(err.value)


def test_the_default_grant_on_an_application_database_is_allowed() -> None:
    role = RoleSpec(name="ro", default_ttl=60, max_ttl=600, options={"database": "mysqlapp"})
    MySQLBackend.from_config(MountSpec(name="my", plugin="mysql", roles={"ro": role},
                                       options={"connection_url": "mysql://a@h:3306/x"}))
