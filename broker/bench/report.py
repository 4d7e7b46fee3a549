"""Result rows, targets and the printed table / JSON of a bench run."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TextIO

__all__ = ["Row", "Target", "format_table", "machine_info", "percentile", "write_json"]

Status = Literal["PASS", "MISS", "-", "SKIP"]


@dataclass(frozen=True)
class Target:
    """A goal for one row: on the value (``>=``/``<=``) or on value / baseline (``ratio>=``)."""

    op: Literal[">=", "<=", "ratio>=", "ratio<="]
    limit: float
    #: what the table shows, e.g. ">= 2000/s" or ">= 0.85 x raw".
    text: str

    def check(self, value: float | None, baseline: float | None) -> bool | None:
        if value is None:
            return None
        if self.op.startswith("ratio"):
            if not baseline:
                return None
            value = value / baseline
        return value >= self.limit if self.op.endswith(">=") else value <= self.limit


@dataclass
class Row:
    """One measured metric, side by side with its baseline from the same run."""

    scenario: str
    metric: str
    value: float | None
    unit: str = ""
    baseline: float | None = None
    target: Target | None = None
    note: str = ""
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def status(self) -> Status:
        if self.skipped:
            return "SKIP"
        if self.target is None:
            return "-"
        ok = self.target.check(self.value, self.baseline)
        if ok is None:
            return "MISS" if self.value is None else "-"
        return "PASS" if ok else "MISS"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["target"] = self.target.text if self.target else None
        out["ratio"] = self.ratio
        out["status"] = self.status
        return out


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nearest rank; NaN when empty."""
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[rank]


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def format_table(rows: Sequence[Row]) -> str:
    """A fixed-width table: scenario, metric, broker, baseline, ratio, target, status."""
    header = ("scenario", "metric", "broker", "baseline", "ratio", "target", "status")
    body = [
        (r.scenario, r.metric, _num(r.value, r.unit), _num(r.baseline, r.unit),
         "-" if r.ratio is None else f"{r.ratio:.2f}", r.target.text if r.target else "-",
         r.status + (f"  ({r.note})" if r.note else ""))
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in (header, *body)) for i in range(len(header) - 1)]
    lines = []
    for line in (header, *body):
        cells = [str(c).ljust(w) for c, w in zip(line[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, str(line[-1])]).rstrip())
    lines.insert(1, "  ".join("-" * w for w in [*widths, len("status")]))
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """What the numbers ran on: they mean little without it."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "")
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "load_average": os.getloadavg(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: str, rows: Sequence[Row], *, quick: bool, machine: dict[str, Any],
               out: TextIO | None = None) -> None:
    doc = {"quick": quick, "machine": machine, "rows": [r.to_json() for r in rows]}
    if out is not None:
        json.dump(doc, out, indent=2)
        return
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
