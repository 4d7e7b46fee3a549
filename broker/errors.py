"""Errors that map onto HTTP statuses; every message is one line a user can act on."""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "BadRequest",
    "BrokerError",
    "Conflict",
    "DeadLease",
    "NotFound",
    "PermissionDenied",
    "RequestTimeout",
    "ReuseAttempt",
    "RevocationFailed",
    "ServiceUnavailable",
    "StoreUnavailable",
    "UnknownLease",
]


class BrokerError(Exception):
    """Base class: ``status`` is the HTTP status the API answers with."""

    status = 500


class BadRequest(BrokerError):
    status = 400


class PermissionDenied(BrokerError):
    status = 403


class NotFound(BrokerError):
    status = 404


class Conflict(BrokerError):
    status = 409


class RequestTimeout(BrokerError):
    """The request's body did not arrive in time (a slow or stalled client)."""

    status = 408


class RevocationFailed(BrokerError):
    """The backend refused a revocation for good (the lease went irrevocable)."""

    status = 502


class ServiceUnavailable(BrokerError):
    status = 503


class BackendUnavailable(ServiceUnavailable):
    """The mount's backend cannot be reached; issuing answers 503 until it is back."""


class StoreUnavailable(ServiceUnavailable):
    """The lease store's database cannot be reached: nothing can be issued, renewed or revoked."""


class ReuseAttempt(BadRequest):
    """A dead lease (expired or revoked) or dead token was presented again."""


class DeadLease(ReuseAttempt):
    """A lease that is revoked or expired (a tombstone) was named again."""


class UnknownLease(BadRequest):
    """No lease has this id (never issued, still being issued, or its tombstone purged)."""
