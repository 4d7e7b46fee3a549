"""What a running broker holds: the parts the API handlers and jobs share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.audit import AuditLog
from broker.config import Config
from broker.engine import LeaseEngine
from broker.policy import PolicySet
from broker.store.base import LeaseStore
from broker.sweeper import Sweeper
from broker.tokens import TokenManager
from broker.worker_stats import StatsBoard

if TYPE_CHECKING:  # imported when the state is made: broker.api's package imports us
    from broker.api.audit_limit import FailureAuditLimiter

__all__ = ["BrokerState"]


@dataclass
class BrokerState:
    config: Config
    store: LeaseStore
    audit: AuditLog
    engine: LeaseEngine
    sweeper: Sweeper
    tokens: TokenManager
    policies: PolicySet
    dev: bool = False
    started: float = field(default_factory=time.time)
    #: false while shutting down: new requests get 503.
    serving: bool = True
    #: ``[auth.jwt.NAME]`` methods by NAME (see broker.auth.build_auth_methods).
    auth_methods: dict[str, Any] = field(default_factory=dict)
    #: With ``[server] workers > 1``: this worker's number, and the shared
    #: board every worker publishes its metrics to (broker/worker_stats.py).
    worker: int | None = None
    stats_board: StatsBoard | None = None
    #: The per-client limit on unauthenticated failures' audit lines
    #: (broker/api/audit_limit.py), made with the state for its audit log.
    audit_limiter: FailureAuditLimiter = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from broker.api.audit_limit import FailureAuditLimiter

        self.audit_limiter = FailureAuditLimiter(self.audit)
