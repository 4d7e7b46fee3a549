"""The MySQL plugin's creation statements: the config guard, and the owner tag.

A lease whose account may create accounts or hand out rights server-wide can
make credentials its revocation (a DROP USER of its own account) never takes
back. ``grant_refusal`` finds such grants in a creation statement at config
load; it is a guard against mistakes in the config, not a SQL parser.

The owner tag (``owner_tag``) marks an account as made by the issue of one
lease, so that a rollback (an issue that failed, was cut off, or was left
pending by a broker that died) drops only an account its own issue made,
never one that existed before under the same name. MariaDB has no account
comments (MySQL 8.0.21+ has ``COMMENT``/``ATTRIBUTE``), so the tag is what
both have since MySQL 5.7.6 / MariaDB 10.2 in ``CREATE USER`` itself, and
what ``SELECT`` on ``mysql.user`` (which the admin needs anyway) shows: two
per-hour resource limits, ``MAX_UPDATES_PER_HOUR`` and
``MAX_CONNECTIONS_PER_HOUR``, each 31 bits of a hash of the lease id with
the top bit set. A limit of at least 2^31 an hour (596,000 a second) is never
reached, so the tag grants and limits nothing, and these two limits have no
server-wide default that it could override (unlike ``MAX_USER_CONNECTIONS``
and MariaDB's ``MAX_STATEMENT_TIME``, which it leaves alone). Being part of
the ``CREATE USER`` statement, the tag is there from the first moment the
account is (``tag_create``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

__all__ = [
    "TAG_FLOOR",
    "grant_refusal",
    "is_create_user",
    "owner_tag",
    "sets_own_limits",
    "tag_clause",
    "tag_create",
]

#: The lowest value of each half of an owner tag (its top bit, set).
TAG_FLOOR = 1 << 31
# The per-hour limits a tag sets (in owner_tag's order) and a template must not
# set itself: the tag would replace the operator's own limits.
_OWN_LIMITS = re.compile(r"\bMAX_(?:UPDATES|CONNECTIONS)_PER_HOUR\b", re.IGNORECASE)
# A CREATE USER of one account with a password and nothing after it: the shape
# (Vault's documented one and the plugin's default) a tag can be appended to,
# as "WITH ..." may follow IDENTIFIED BY in MySQL and MariaDB alike.
_PLAIN_CREATE = re.compile(
    r"\s*CREATE\s+USER\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    r"(?P<q>['\"`])(?P<user>[a-z0-9_-]+)(?P=q)"
    r"(?:\s*@\s*(?:'[^'\\]*'|\"[^\"\\]*\"|`[^`]*`|[A-Za-z0-9.%_:/-]+))?"
    r"\s+IDENTIFIED\s+BY\s+(?:'[A-Za-z0-9]*'|\"[A-Za-z0-9]*\")\s*",
    re.IGNORECASE,
)
_CREATE_USER = re.compile(r"\s*CREATE\s+USER\b", re.IGNORECASE)


def owner_tag(lease_id: str) -> tuple[int, int] | None:
    """The (MAX_UPDATES_PER_HOUR, MAX_CONNECTIONS_PER_HOUR) that mark an account as made
    by the issue of lease ``lease_id``; None for a caller naming no lease (nothing to tag).

    A hash, not the id: every account with SELECT on ``mysql.user`` or ``SHOW GRANTS`` on
    the lease's account reads it.
    """
    if not lease_id:
        return None
    digest = hashlib.sha256(b"broker lease " + lease_id.encode()).digest()
    return (int.from_bytes(digest[0:4], "big") | TAG_FLOOR,
            int.from_bytes(digest[4:8], "big") | TAG_FLOOR)


def tag_clause(tag: tuple[int, int]) -> str:
    """The resource options that set ``tag`` (after ``IDENTIFIED BY`` or ``ALTER USER x``)."""
    return f"WITH MAX_UPDATES_PER_HOUR {tag[0]:d} MAX_CONNECTIONS_PER_HOUR {tag[1]:d}"


def sets_own_limits(templates: Iterable[str]) -> bool:
    """Whether a template sets a limit the tag would overwrite (its accounts go untagged)."""
    return any(_OWN_LIMITS.search(t) for t in templates)


def tag_create(stmt: str, name: str, tag: tuple[int, int]) -> str | None:
    """``stmt`` with ``tag`` appended if it is a plain CREATE USER of ``name``, else None."""
    m = _PLAIN_CREATE.fullmatch(stmt)
    if m is None or m.group("user") != name:
        return None
    return f"{stmt.rstrip()} {tag_clause(tag)}"


def is_create_user(stmt: str) -> bool:
    """Whether ``stmt`` is a CREATE USER statement of any shape."""
    return _CREATE_USER.match(stmt) is not None


# A GRANT's privilege list and target (comments already stripped, see _grant_refusal).
_GRANT = re.compile(
    r"\bGRANT\s+(?P<privs>[^;]*?)\s+ON\s+"
    r"(?:(?:TABLE|FUNCTION|PROCEDURE|PACKAGE\s+BODY|PACKAGE)\s+)?"
    r"(?P<target>(?:`[^`]*`|[^\s.;`]+)(?:\s*\.\s*(?:`[^`]*`|[^\s.;`]+))?)"
    r"(?P<rest>[^;]*)",
    re.IGNORECASE,
)
# The only privileges a lease may hold server-wide (ON *.*): reading and watching.
# Any other there reaches the mysql schema too (INSERT or UPDATE on *.* writes
# mysql.global_priv: accounts by another name) or the server itself (FILE, SUPER,
# CREATE USER...), and so outlives the lease's revocation (a DROP USER of its own
# account). SELECT stays: Vault's own example grants SELECT ON *.*. PROCESS does
# not (_PROCESS): it shows every session's running statement, secrets included.
_GLOBAL_ALLOWED = frozenset({
    "USAGE", "SELECT", "SHOW VIEW", "SHOW DATABASES", "EXECUTE",
    "REPLICATION CLIENT", "BINLOG MONITOR", "SLAVE MONITOR", "REPLICA MONITOR",
})
#: Why PROCESS is refused: seen on MariaDB 10.11, a PROCESS holder reads in
#: information_schema.PROCESSLIST the admin's running
#: ``CREATE USER ... IDENTIFIED BY '<another lease's password>'`` (and rotate-root's
#: ``ALTER USER ... IDENTIFIED BY``) in plain text.
_PROCESS = ("GRANT PROCESS ON *.* (it shows every session's running statement: the "
            "admin's CREATE USER ... IDENTIFIED BY other leases' passwords among them)")
_WITH_GRANT_OPTION = re.compile(r"\bWITH\s+GRANT\s+OPTION\b", re.IGNORECASE)
_COLUMNS = re.compile(r"\([^)]*\)")


def _strip_comments(sql: str, *, quotes: bool) -> str:
    """``sql`` without comments; the content of ``/*! ... */`` (``/*M!``, ``/*!50100``) kept.

    The server runs an executable comment's content as code, so the guard
    must read it as code too. ``quotes``: leave '...', "..." and `...` alone
    (what the server does); without, markers inside quotes count as well, so
    that a statement run from a string (``EXECUTE IMMEDIATE '...'``) is read too.
    """
    out: list[str] = []
    i, n = 0, len(sql)
    executable = False
    while i < n:
        ch = sql[i]
        if quotes and ch in "'\"`":
            end = i + 1
            while end < n and sql[end] != ch:
                end += 2 if sql[end] == "\\" and ch != "`" else 1
            out.append(sql[i:end + 1])
            i = end + 1
        elif sql.startswith("/*", i):
            marker = re.match(r"/\*M?!\d*", sql[i:])
            if marker and not executable:
                executable = True
                i += marker.end()
            else:
                end = sql.find("*/", i + 2)
                i = n if end < 0 else end + 2
            out.append(" ")
        elif executable and sql.startswith("*/", i):
            executable = False
            out.append(" ")
            i += 2
        elif ch == "#" or (sql.startswith("--", i) and (i + 2 == n or sql[i + 2].isspace())):
            end = sql.find("\n", i)
            i = n if end < 0 else end
            out.append(" ")
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def grant_refusal(stmt: str) -> str | None:
    """What a creation statement grants that a lease must not have, or None.

    Server-wide (``ON *.*``) any privilege but reading and watching ones
    (``_GLOBAL_ALLOWED``); GRANT OPTION (``WITH GRANT OPTION`` too) at any
    level, which would let the lease hand its rights to accounts that outlive
    it; and any grant on the ``mysql`` schema (its tables are the accounts). A
    guard against mistakes in the config, not a parser: a privilege granted
    through a role or built at run time from pieces (``CONCAT``) is not seen.
    """
    for text in (_strip_comments(stmt, quotes=True), _strip_comments(stmt, quotes=False)):
        for m in _GRANT.finditer(text):
            target = re.sub(r"[`\s]", "", m.group("target"))
            schema = target.partition(".")[0] if "." in target else ""
            if schema.lower() == "mysql":
                return f"GRANT ... ON {target} (the mysql schema holds the accounts)"
            privs = {" ".join(p.split()).upper()
                     for p in _COLUMNS.sub("", m.group("privs")).split(",")}
            if "GRANT OPTION" in privs or _WITH_GRANT_OPTION.search(m.group("rest")):
                return f"GRANT ... ON {target} WITH GRANT OPTION"
            if target != "*.*":
                continue
            refused = sorted(privs - _GLOBAL_ALLOWED)
            if refused:
                return _PROCESS if refused == ["PROCESS"] else f"GRANT {refused[0]} ON *.*"
    return None
