"""The `sweep` flow: settings x seeds as mapped, cached train + evaluate tasks under one MLflow parent run.

The sweep file (flows/sweep_spec.py) expands into points (method, settings, seed). Each point is one
mapped `sweep-point` task (tasks/sweep.py) on whatever task runner the flow is given: Prefect's thread
pool on one machine, or Dask (`prefect-dask`'s DaskTaskRunner) on a local cluster of worker processes
or an existing cluster (see flows/cli/sweep.py and the README). With a `deployment` (`sngp sweep
--runner workpool`) each point is instead its own flow run of the `sweep-point` flow
(flows/sweep_point_flow.py) on a Prefect work pool, dispatched and awaited by a `dispatch-point` task.

The flow records everything in MLflow (tasks/sweep_results.py): the parent run, one nested run per
point, the results table, the summary plots. A point that fails is recorded FAILED and the others
carry on.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.sweep_spec import SweepSpec, expand, point_settings
from tasks.sweep import point_data_files, submit_points


@flow(name="sweep", log_prints=True)
def sweep(spec: SweepSpec, base: PipelineConfig, deployment: str | None = None) -> dict[str, Any]:
    """A hyperparameter sweep: every point a mapped, cached train + evaluate task, recorded in MLflow.

    `deployment` (a sweep-point deployment, e.g. 'sweep-point/pool'): run each point as a flow run of
    it on its work pool instead of as a task of this flow."""
    # lazy: MLflow only in the flow's process, not in the Dask workers that unpickle this flow
    from tasks.recording import parent_run
    from tasks.sweep_results import finish_sweep, record_point, record_spec

    points = expand(spec)
    settings, invalid = point_settings(base, points)  # an invalid point fails alone
    tags = {"sweep.points": str(len(points)), "sweep.methods": ",".join(spec.methods)}
    with parent_run(kind="sweep", extra_tags=tags, **base.record_settings()) as parent:
        record_spec(spec.model_dump(mode="json"), len(points))
        data_paths, no_data = point_data_files({i: s.data for i, s in settings.items()})
        model_settings = {i: s.model for i, s in settings.items()}
        futures = submit_points(points, model_settings, data_paths, deployment)
        errors = {**invalid, **no_data}
        outcomes = [
            record_point(p, model_settings.get(p.id), futures.get(p.id), errors.get(p.id), parent)
            for p in points
        ]
        return finish_sweep(spec, outcomes, parent)
