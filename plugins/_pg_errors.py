"""How the PostgreSQL backend turns driver errors into BackendErrors.

Every asyncpg (or network) error leaves the plugin through ``_wrap``:
redacted, since a driver message can quote a statement and so a password;
retryable or not by its SQLSTATE class; and, for the few outcomes the plugin
handles itself, as a subclass it can catch: a conflict worth running the
whole transaction again for (``_Transient``), a role a concurrent revocation
dropped first (``_Missing``), a role that objects still depend on
(``_Dependents``). ``_refused`` tells whether the server certainly did not
run a statement, which is what lets a failed issue say it created nothing.

Apart from ``plugins.postgres`` so that it and the revocation protocol
(``plugins._pg_revoke``) share one classification without importing each
other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import asyncpg

from broker.backend import BackendError
from plugins._sql import redact

# SQLSTATEs that are worth retrying as a whole transaction.
_RETRY_STATES = {"40001", "40P01"}
# Classes that mean "the server or the connection", not "the statement".
_CONNECTION_CLASSES = ("08", "53", "57", "28", "3D")
#: SQLSTATE of "role ... cannot be dropped because some objects depend on it".
_DEPENDENT_OBJECTS = "2BP01"
#: InterfaceErrors about the mount's settings, not the connection: their text is the point.
_CLIENT_SIDE = (asyncpg.exceptions.ClientConfigurationError,
                asyncpg.exceptions.UnsupportedClientFeatureError)

log = logging.getLogger("plugins.postgres")


class _Transient(BackendError):
    """A conflict worth retrying the whole transaction for."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(str(error), retryable=True)
        self.error = error


class _Missing(BackendError):
    """The role vanished under us (a concurrent revocation): success for delete."""


class _Dependents(BackendError):
    """DROP ROLE (or DROP OWNED) refused: objects still depend on the role (SQLSTATE 2BP01)."""



def _refused(exc: asyncpg.PostgresError) -> bool:
    """Whether the server refused the statement, so that it certainly took no effect.

    Not so for the classes asyncpg also raises when the connection broke (08,
    "connection was closed in the middle of operation"), nor for an operator's
    or the system's intervention (57, 58, XX): a COMMIT may have landed.
    """
    state = str(getattr(exc, "sqlstate", "") or "")
    return bool(state) and not state.startswith((*_CONNECTION_CLASSES, "58", "XX"))


def _wrap(op: str, exc: BaseException, secret_values: Sequence[str | None], *,
          created_nothing: bool = False) -> BackendError:
    """Classify a driver error into a redacted BackendError (transient ones as _Transient).

    ``created_nothing``: the caller knows this failure left no role behind.
    """
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        message = redact(str(exc), secret_values)
        text = f"postgres {op} failed: {message} (SQLSTATE {state})"
        if state in _RETRY_STATES or (state == "XX000" and "concurrently" in str(exc)):
            return _Transient(BackendError(text, retryable=True, created_nothing=created_nothing))
        if state == "42704" and op == "delete_user":
            return _Missing(text, retryable=False)
        if state == _DEPENDENT_OBJECTS and op == "delete_user":
            return _Dependents(text, retryable=False)
        return BackendError(text, retryable=state.startswith(_CONNECTION_CLASSES),
                            created_nothing=created_nothing)
    if isinstance(exc, TimeoutError):
        return BackendError(f"postgres {op} failed: timed out reaching the server", retryable=True,
                            created_nothing=created_nothing)
    if isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, _CLIENT_SIDE):
        # A connection closed, or let go of by the pool when it was lost ("cannot call
        # Connection.execute(): connection has been released back to the pool", once
        # seen by a client during a cut): the driver's words describe its internals.
        log.debug("postgres %s: connection lost: %s", op, redact(str(exc), secret_values))
        return BackendError(f"postgres {op} failed: cannot reach the server: the connection "
                            "was lost", retryable=True, created_nothing=created_nothing)
    # OSError (refused, unreachable), ...
    message = redact(str(exc), secret_values) or type(exc).__name__
    return BackendError(f"postgres {op} failed: cannot reach the server: {message}", retryable=True,
                        created_nothing=created_nothing)
