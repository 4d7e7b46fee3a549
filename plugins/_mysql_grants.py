"""The MySQL plugin's config guard: creation statements that grant a lease too much.

A lease whose account may create accounts or hand out rights server-wide can
make credentials its revocation (a DROP USER of its own account) never takes
back. ``grant_refusal`` finds such grants in a creation statement at config
load; it is a guard against mistakes in the config, not a SQL parser.
"""

from __future__ import annotations

import re

__all__ = ["grant_refusal"]

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
