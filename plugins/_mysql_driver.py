"""What the MySQL plugin's modules share about the server and its driver (aiomysql).

The server's error codes the plugin tells apart (``_error_code`` reads one off
a driver error), the cursor class every admin connection uses, the connect
timeout, and how an account is written in SQL (``_account``).

Apart from ``plugins.mysql`` so that it and the modules that work for its
backend (``plugins._mysql_sessions``, ``plugins._mysql_revoke``,
``plugins._mysql_rotate``) share them without importing each other.
"""

from __future__ import annotations

from typing import Any

import aiomysql
import pymysql

from plugins._sql import quote_literal

#: Seconds to wait for a connection (and its login) to the server.
CONNECT_TIMEOUT = 10

# Server/client error codes that mean "the connection or server is in trouble, try later".
_RETRYABLE_CODES = frozenset({
    1040,  # too many connections
    1053,  # server shutdown in progress
    1205,  # lock wait timeout
    1213,  # deadlock
    1927,  # connection was killed
    2002, 2003, 2006, 2013, 2055,  # can't connect / gone away / lost connection
})
_ER_PARSE_ERROR = 1064
_ER_NO_SUCH_THREAD = 1094
_ER_ACCESS_DENIED = 1045  # a login refused: wrong user or password
_ER_CANNOT_USER = 1396
_ACCESS_DENIED = frozenset({1044, 1045, 1142, 1143, 1227})


class _QuietCursor(aiomysql.Cursor):  # type: ignore[misc]
    """A cursor that does not turn server notes into Python warnings.

    aiomysql re-raises every server warning (e.g. the note of ``DROP USER IF
    EXISTS`` for a missing user) through ``warnings.warn``, which is noise in
    the daemon's log and an exception under ``-W error``.
    """

    async def _show_warnings(self, conn: Any) -> None:
        return None


def _error_code(exc: BaseException) -> int | None:
    if isinstance(exc, pymysql.err.MySQLError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def _account(name: str, host: str) -> str:
    return f"{quote_literal(name)}@{quote_literal(host)}"
