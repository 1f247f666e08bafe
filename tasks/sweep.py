"""Running a sweep's points: the cached `sweep-point` task (on a thread pool or Dask workers) and the
`dispatch-point` task that runs a point as a flow run on a Prefect work pool.

Each point trains and evaluates through the pipeline's own tasks (tasks/train.py, tasks/evaluate.py),
cached by the point's model settings, its data file and the code, exactly like the pipeline's tasks,
so a point computed by any runner is a cache hit for the others.

With a deployment (`sngp sweep --runner workpool`) each point is instead its own flow run of the
`sweep-point` flow (flows/sweep_point_flow.py, deployment `sweep-point/pool` in prefect.yaml): a
mapped `dispatch-point` task per point creates the flow run, waits for it and reads its result (a JSON
file in the shared cache folder), so the pool's workers share the points while the sweep still
records everything. No MLflow here: Dask workers and point flow runs import this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import prefect.deployments
from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE, CompoundCachePolicy, Inputs
from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run as current_flow_run

from .cache import CACHE_POLICY, CODE_VERSION, cache_root, configured, write_atomic
from .data import data_file
from .evaluate import evaluate_model
from .sweep_points import UNRESPONSIVE, Point
from .train import train_model

# Points dispatched at once (threads waiting for their flow runs); the pool's workers decide how many run.
MAX_DISPATCHED = 64
# A dispatch the Prefect server kept answering "busy, retry" past its client's own retries (SQLite's
# "database is locked" under a burst of writes is a 503) is tried again this often, this much later.
DISPATCH_RETRIES = 2
DISPATCH_RETRY_SECONDS = 15
SERVER_BUSY = frozenset({502, 503, 504})
# One point's flow run created at a time: a Prefect server on SQLite answers concurrent creations
# "database is locked" (503); the waits for the flow runs, reads only, still run side by side.
CREATING = threading.Lock()


@task(name="sweep-point", task_run_name="sweep-{label}", cache_policy=CACHE_POLICY, persist_result=True)
def sweep_point(
    label: str, method: str, model_config: dict, data_path: str, code_version: str = CODE_VERSION
) -> dict:
    """Train and evaluate one point (tasks/train.py + tasks/evaluate.py) -> model dir, metrics, curves."""
    check_shared_cache(data_path)
    trained = train_model.fn(method, model_config, data_path, code_version)
    evaluation = evaluate_model.fn(method, trained, data_path, code_version)
    return {
        "model_dir": trained["model_dir"],
        "history": trained["history"],
        "metrics": evaluation["metrics"],
        "predictions_path": evaluation["predictions_path"],
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def check_shared_cache(data_path: str) -> None:
    """A worker must see the sweep's cache folder (the data file lives there, models go there)."""
    expected = Path(data_path).parent.parent
    if not Path(data_path).is_file():
        raise RuntimeError(
            f"worker {socket.gethostname()} cannot see the sweep's data file {data_path}: every Dask "
            f"worker or work-pool worker must share the sweep's cache folder {expected} (start workers "
            f"with SNGP_CACHE_DIR={expected} on a shared file system)"
        )
    if cache_root() != expected.resolve():
        raise RuntimeError(
            f"worker {socket.gethostname()} caches into {cache_root()}, the sweep into {expected}: start "
            f"the Dask workers with SNGP_CACHE_DIR={expected}"
        )


def check_code_version(code_version: str | None, worker: str) -> None:
    """A point flow run on a worker with other code than the sweep's (`code_version`) fails instead of
    computing the point with different code."""
    if code_version is not None and code_version != CODE_VERSION:
        raise RuntimeError(
            f"worker {worker or this_process()} runs other code (code version {CODE_VERSION}) than the "
            f"sweep ({code_version}): bring the worker's checkout (the deployment's SNGP_PROJECT_DIR) and "
            "the sweep's to the same code"
        )


def this_process() -> str:
    """host:pid of this process (where a point ran)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def point_task():
    """sweep_point configured like the pipeline's tasks (tasks.cache.configured: cache records and
    locks under cache_root(), so every worker sharing the cache folder shares the cache), except that
    the display label is not part of the cache key: the same model settings, data file and code are
    the same point in any sweep."""
    task_ = configured(sweep_point)
    policy = task_.cache_policy
    if isinstance(policy, CompoundCachePolicy):
        policies = [
            Inputs(exclude=[*p.exclude, "label"]) if isinstance(p, Inputs) else p for p in policy.policies
        ]
        policy = dataclasses.replace(policy, policies=policies)
    return task_.with_options(cache_policy=policy)


def point_data_files(data: dict[str, dict[str, Any]]) -> tuple[dict[str, str], dict[str, str]]:
    """The data file of each point (point id -> data_file's arguments), each distinct file generated
    once -> (paths by point id, errors by point id: a point whose data fails fails alone)."""
    paths: dict[str, str] = {}
    errors: dict[str, str] = {}
    by_key: dict[str, str | Exception] = {}
    for point_id, arguments in data.items():
        key = json.dumps(arguments, sort_keys=True)
        if key not in by_key:
            try:
                by_key[key] = data_file(**arguments)
            except Exception as exc:  # noqa: BLE001 - recorded as the failure of its points
                by_key[key] = exc
        found = by_key[key]
        if isinstance(found, Exception):
            errors[point_id] = f"{type(found).__name__}: {found}"
        else:
            paths[point_id] = found
    return paths, errors


def submit_points(
    points: list[Point],
    model_settings: dict[str, dict],
    data_paths: dict[str, str],
    deployment: str | None = None,
) -> dict[str, PrefectFuture]:
    """Map every point that has its data file onto the flow's task runner: a `sweep-point` task each,
    or with `deployment` a `dispatch-point` task each -> futures by point id."""
    runnable = [p for p in points if p.id in data_paths]
    if not runnable:
        return {}
    inputs = {
        "label": [f"{p.id} {p.label}" for p in runnable],
        "method": [p.method for p in runnable],
        "model_config": [model_settings[p.id] for p in runnable],
        "data_path": [data_paths[p.id] for p in runnable],
    }
    if deployment:
        mapped = dispatch_point.map(
            **inputs,
            deployment=unmapped(deployment),
            poll_seconds=unmapped(dispatch_poll_seconds(len(runnable))),
        )
    else:
        mapped = point_task().map(**inputs)
    return dict(zip((p.id for p in runnable), mapped))


# ----------------------------------------------------------------------------------------------------
# One point as a flow run on a work pool (`sngp sweep --runner workpool`)
# ----------------------------------------------------------------------------------------------------


def point_result_path(flow_run_id: Any) -> Path:
    """Where the sweep-point flow run `flow_run_id` leaves its result for the sweep (shared cache folder)."""
    return cache_root() / "sweeps" / "points" / f"{flow_run_id}.json"


def write_point_result(flow_run_id: Any, record: dict[str, Any]) -> None:
    """Leave a point flow run's result where dispatch_point reads it (nothing outside a flow run)."""
    if not flow_run_id:
        return
    path = point_result_path(flow_run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, default=float)  # numpy scalars in curves -> floats
    write_atomic(path, lambda tmp: tmp.write_text(text))


def dispatch_poll_seconds(points: int) -> float:
    """How often each waiting dispatch task polls its flow run: ~8 requests/s to the server in all."""
    return max(1.0, min(min(points, MAX_DISPATCHED) / 8, 10.0))


class FlowRunFailed(RuntimeError):
    """A point's flow run on the work pool did not complete (the message says where and why)."""


def server_was_busy(task, task_run, state) -> bool:
    """dispatch-point's retry condition: it failed because the Prefect server answered busy (SERVER_BUSY)."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, PrefectHTTPStatusError) and error.response.status_code in SERVER_BUSY


@task(
    name="dispatch-point",
    task_run_name="dispatch-{label}",
    cache_policy=NO_CACHE,  # the point flow's own task is cached; a dispatch always asks the pool
    persist_result=False,
    retries=DISPATCH_RETRIES,
    retry_delay_seconds=DISPATCH_RETRY_SECONDS,
    retry_condition_fn=server_was_busy,
)
def dispatch_point(
    label: str,
    method: str,
    model_config: dict,
    data_path: str,
    deployment: str,
    code_version: str = CODE_VERSION,
    poll_seconds: float = 2.0,
) -> dict:
    """Run one point as a flow run of `deployment` (the sweep-point flow) on its work pool, wait for it
    and return its result: sweep_point's dict plus `cached`, `prefect_worker`, `flow_run_id`.

    A flow run that does not complete raises FlowRunFailed (the point is FAILED, the sweep goes on);
    one whose worker or machine died is set Crashed by `sngp serve`'s crash automation once its
    heartbeats stop, with a message saying it stopped responding (UNRESPONSIVE).

    The flow run gets this sweep's cache folder (SNGP_CACHE_DIR, through the job's environment), so its
    worker reads the sweep's data file and shares the cache; it fails if it sees another folder.

    Retried when the server answered busy; the flow run's idempotency key (the sweep's flow run and the
    point) makes a retry, or the client's resend of a request whose answer was lost, find the flow run
    the server already created instead of starting the point twice."""
    sweep_run = current_flow_run.id
    with CREATING:
        created = prefect.deployments.run_deployment(
            name=deployment,
            parameters={
                "label": label,
                "method": method,
                "model_settings": model_config,
                "data_path": data_path,
                "code_version": code_version,
            },
            job_variables={"env": {"SNGP_CACHE_DIR": str(cache_root())}},
            flow_run_name=label,
            idempotency_key=f"sngp-sweep {sweep_run} {label}" if sweep_run else None,
            timeout=0,  # created; waited for below, outside the lock
        )
    # For as long as the point takes (or waits for a free worker), polling as run_deployment does.
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(created.id)
        while flow_run.state is None or not flow_run.state.is_final():
            time.sleep(poll_seconds)
            flow_run = client.read_flow_run(created.id)
    state = flow_run.state
    worker = (flow_run.labels or {}).get("prefect.worker.name")
    where = f"flow run {flow_run.name!r} ({flow_run.id})" + (f" on worker {worker}" if worker else "")
    if state is not None and state.is_crashed() and UNRESPONSIVE in (state.message or ""):
        # Set Crashed by `sngp serve`'s automation: no heartbeat from its process for minutes.
        raise FlowRunFailed(
            f"{where} {UNRESPONSIVE} (its worker or machine died) and was marked Crashed: {state.message}"
        )
    if state is None or not state.is_completed():
        name = state.name if state is not None else "without a state"
        raise FlowRunFailed(f"{where} ended {name}: {state.message if state is not None else ''}".rstrip())
    path = point_result_path(flow_run.id)
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FlowRunFailed(
            f"{where} completed but its result {path} cannot be read ({exc}): the workers must share "
            f"the sweep's cache folder {cache_root()}"
        ) from None
    result["prefect_worker"] = result.get("prefect_worker") or worker or ""
    return {**result, "flow_run_id": str(flow_run.id)}
