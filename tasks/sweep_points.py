"""What a sweep point is and how it went, as plain data shared by the sweep file's typed config
(flows/sweep_spec.py), the sweep's tasks (tasks/sweep.py, tasks/sweep_results.py) and the summary
`sngp sweep` prints.

No Prefect and no MLflow here: `sngp sweep` reads and expands a sweep file before either is imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

# In the Crashed state's message of a flow run whose heartbeats stopped (the crash automation of
# `sngp serve` writes it; a sweep's dispatch task recognises an unresponsive point by it).
UNRESPONSIVE = "stopped responding"


class SweepShape(Protocol):
    """What the results need to know of a sweep (flows.sweep_spec.SweepSpec has these)."""

    methods: list[str]
    grid: dict[str, list[Any]]
    seeds: list[int]
    metrics: list[str]


@dataclass(frozen=True)
class Point:
    """One (method, settings, seed) of a sweep; `settings` holds the grid keys that change the method."""

    id: str  # p000, p001, ... in the sweep's order
    method: str
    settings: dict[str, Any]
    seed: int
    label: str  # e.g. "sngp spec_norm_bound=0.9 seed=1"


@dataclass
class Outcome:
    """How a point went, as recorded in its nested MLflow run."""

    point: Point
    status: str = "FAILED"  # FINISHED or FAILED
    metrics: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    run_id: str = ""
    error: str = ""
    worker: str = ""  # host:pid of the process that ran the point
    prefect_worker: str = ""  # the work-pool worker whose flow run it was (runner workpool)

    def as_dict(self) -> dict[str, Any]:
        """The flow's JSON-able summary of the point."""
        return {
            "id": self.point.id,
            "method": self.point.method,
            "settings": self.point.settings,
            "seed": self.point.seed,
            "label": self.point.label,
            "status": self.status,
            "cached": self.cached,
            "metrics": self.metrics,
            "run_id": self.run_id,
            "error": self.error,
            "worker": self.worker,
            "prefect_worker": self.prefect_worker,
        }


def format_value(value: Any) -> str:
    """A setting's value as shown in labels, MLflow params, the results table and plot ticks."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def encode_value(value: Any) -> str:
    """A setting's value as a key that tells 1, 1.0 and true apart (for grouping and lookups)."""
    return json.dumps(value, sort_keys=True)


def format_settings(settings: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """`key=value` pairs separated by spaces; `names` may give a key a shorter display name."""
    names = names or {}
    return " ".join(f"{names.get(k, k)}={format_value(v)}" for k, v in settings.items())
