"""The `monitor` flow: every new batch file of an inbox scored once by a model, tested for drift, recorded
in MLflow (experiment `sngp-monitor`, one run per model, metrics at step = batch number) and, on drift,
announced as the Prefect event `sngp.drift.detected` (which the automation `sngp: retrain on drift`
answers with a `retrain/nightly` run). Deployment `monitor/every-15-minutes`; `sngp monitor` runs it
once. The inbox's rules (scored/, rejected/, exactly once) are in tasks/monitor.py.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from sngp_models.drift import DEFAULT_ALPHA
from tasks.monitor import (
    check_settings,
    idle_summary,
    inbox_lock,
    monitor_run,
    pending_batches,
    resolve_monitored_model,
    score_batch,
    summary,
)


@flow(name="monitor", log_prints=True)
def monitor(
    model: str, inbox: str, alpha: float = DEFAULT_ALPHA, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Score the new CSV/Parquet batches in `inbox` with `model` (any MLflow model URI; an alias is
    resolved to its version when there are batches) and test each for drift at level `alpha`."""
    folder = check_settings(inbox, alpha)  # ValueError naming the parameter
    with inbox_lock(folder):  # one monitor run at a time per inbox
        names = pending_batches(folder)
        if not names:  # nothing new: no model looked up, nothing recorded
            return idle_summary(model, folder)
        ref = resolve_monitored_model(model, tracking_uri)
        run_id = monitor_run(ref, folder)
        results = [score_batch(ref, run_id, folder, name, alpha) for name in names]
    return summary(ref, run_id, results)
