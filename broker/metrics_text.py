"""``/v1/sys/metrics?format=prometheus``: the metrics in Prometheus' text format.

The same figures as the JSON answer (docs/operations.md, "Monitoring"), named
and typed for a scraper: counters end in ``_total`` and only grow (a worker
that restarts starts its own from zero, which Prometheus reads as a reset),
gauges are the value now. Vault serves its own under the same query
parameter, so a scrape config written for Vault needs only the new names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["CONTENT_TYPE", "render"]

#: the text exposition format, version 0.0.4 (what every Prometheus reads).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_Sample = tuple[Mapping[str, str], float]


def _label_value(value: str) -> str:
    # The format's three escapes; a mount name is free text in the config.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _family(name: str, kind: str, help_: str, samples: Iterable[_Sample]) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        if labels:
            inner = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            lines.append(f"{name} {_number(value)}")
    return lines


def render(*, leases: Mapping[str, int], total: Mapping[str, Any], started: float,
           workers: int, audit_healthy: bool, store_healthy: bool,
           mounts_healthy: Mapping[str, bool],
           overdue: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """The exposition text. ``total`` is :func:`broker.worker_stats.merge`'s sum;
    ``overdue``: mount -> ``{"leases": N, "oldest_seconds": S}`` (the sys/metrics JSON's
    ``leases_overdue``)."""
    backends: Mapping[str, Mapping[str, Mapping[str, Any]]] = total["backends"]
    calls = [({"mount": m, "op": op}, s) for m, ops in sorted(backends.items())
             for op, s in sorted(ops.items())]
    late = sorted((overdue or {}).items())
    lines: list[str] = []
    lines += _family("broker_leases", "gauge", "Leases in the store, by state.",
                     (({"state": state}, n) for state, n in sorted(leases.items())))
    lines += _family("broker_leases_overdue", "gauge",
                     "Live leases more than claim_timeout past their expiry, by mount: not "
                     "revoked in time (a backend down, retries, a sweeper behind).",
                     (({"mount": m}, f["leases"]) for m, f in late))
    lines += _family("broker_leases_overdue_oldest_seconds", "gauge",
                     "How long past its expiry the oldest overdue lease is, by mount "
                     "(0: none).", (({"mount": m}, f["oldest_seconds"]) for m, f in late))
    lines += _family("broker_sweeper_busy", "gauge",
                     "Revocations the sweepers are carrying out now.",
                     [({}, total["sweeper_busy"])])
    lines += _family("broker_sweeper_dropped_claims_total", "counter",
                     "Claimed revocations left for a new claim because they could no longer "
                     "finish inside it.", [({}, total["sweeper_dropped_claims"])])
    lines += _family("broker_backend_calls_total", "counter",
                     "Backend plugin calls, by mount and operation.",
                     ((labels, s["calls"]) for labels, s in calls))
    lines += _family("broker_backend_errors_total", "counter",
                     "Backend plugin calls that failed, by mount and operation.",
                     ((labels, s["errors"]) for labels, s in calls))
    lines += _family("broker_backend_call_seconds_total", "counter",
                     "Time spent in backend plugin calls, by mount and operation.",
                     ((labels, s["total_seconds"]) for labels, s in calls))
    lines += _family("broker_backend_call_max_seconds", "gauge",
                     "The longest backend plugin call since start, by mount and operation.",
                     ((labels, s["max_seconds"]) for labels, s in calls))
    lines += _family("broker_mount_healthy", "gauge",
                     "1 while the mount's backend answers its health check.",
                     (({"mount": m}, ok) for m, ok in sorted(mounts_healthy.items())))
    lines += _family("broker_audit_healthy", "gauge",
                     "1 while the audit log can be written (0: every call answers 503).",
                     [({}, audit_healthy)])
    lines += _family("broker_store_healthy", "gauge",
                     "1 while the lease store answers and commits.", [({}, store_healthy)])
    lines += _family("broker_workers", "gauge", "Worker processes serving.", [({}, workers)])
    lines += _family("broker_start_time_seconds", "gauge",
                     "When the broker (its first worker) started, in Unix seconds.",
                     [({}, started)])
    return "\n".join(lines) + "\n"
