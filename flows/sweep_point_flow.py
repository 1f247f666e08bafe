"""The `sweep-point` flow: one point of a sweep as its own flow run, for `sngp sweep --runner workpool`.

The sweep (flows/sweep.py) runs in the `sngp sweep` process and dispatches one flow run of this flow's
deployment (`sweep-point/pool` in prefect.yaml, registered by `make deploy`) per point; the work
pool's workers share them. Each run calls the sweep's own cached `sweep-point` task (tasks/sweep.py, so
the same model settings, data file and code are a cache hit whichever runner computed them first),
and leaves its result for the sweep as JSON in the shared cache folder,
`<cache>/sweeps/points/<flow run id>.json` (written atomically), so nothing depends on Prefect's
result storage being shared between machines. The sweep records the point in MLflow; this flow
writes no MLflow runs.

The result is the task's dict (metrics, training curves, model directory) plus `cached` (was the task
a cache hit), `prefect_worker` (the worker that ran this flow run: SNGP_WORKER_NAME, which `sngp serve`
sets for each of its workers, else the flow run's label `prefect.worker.name`), and the host and pid
of this flow-run process.
"""

from __future__ import annotations

import os
import socket

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.runtime import flow_run

from tasks.sweep import check_code_version, check_shared_cache, point_task, this_process, write_point_result


@flow(name="sweep-point", persist_result=False, log_prints=True)
def sweep_point_flow(
    label: str, method: str, model_settings: dict, data_path: str, code_version: str | None = None
) -> dict:
    """Train and evaluate one sweep point (cached), for a sweep running elsewhere: see the module doc.

    `model_settings`: the point's library settings (sweep_point's `model_config`; a flow parameter
    cannot be called model_config, a name pydantic reserves). `code_version`: the sweep's
    (tasks.cache.CODE_VERSION); a worker running other code fails the point instead of computing it
    with different code."""
    worker = worker_name()
    check_code_version(code_version, worker)
    check_shared_cache(data_path)  # the data file and the cache folder of the sweep, before any work
    state = point_task()(
        label=label, method=method, model_config=model_settings, data_path=data_path, return_state=True
    )
    result = state.result()  # raises (and so fails this flow run) if the task failed
    record = {**result, "cached": state.name == "Cached", "prefect_worker": worker}
    record.update(host=socket.gethostname(), pid=os.getpid())
    write_point_result(flow_run.get_id(), record)
    get_run_logger().info(
        "%s: %s on %s (%s)",
        label,
        "cached" if record["cached"] else "computed",
        worker or "no worker",
        this_process(),
    )
    return record


def worker_name() -> str:
    """The work-pool worker running this flow run ('' when run outside a worker)."""
    if os.environ.get("SNGP_WORKER_NAME"):
        return os.environ["SNGP_WORKER_NAME"]
    context = FlowRunContext.get()
    labels = (context.flow_run.labels if context is not None and context.flow_run is not None else None) or {}
    return str(labels.get("prefect.worker.name", ""))
