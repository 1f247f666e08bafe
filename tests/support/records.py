"""Reading what a run recorded the way a user would: through MLflow's client, never the artefact folder
(and Prefect's record over its REST API); and the one check that a pipeline run's MLflow record is
complete."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from sngp_models.evaluation import GRID_METRICS, METRIC_NAMES

from .cli import PNG_MAGIC
from .net import http_json

ALL_METHODS = ("deterministic", "sngp", "mc_dropout", "deep_ensemble", "exact_gp")
STUDY_METHODS = ALL_METHODS[:4]


class MlflowReader:
    """Read a tracking store the way a user would: through MlflowClient, never the artefact folder."""

    def __init__(self, tracking_uri: str, download_dir: Path):
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.download_dir = download_dir

    def experiment_ids(self) -> list[str]:
        return [e.experiment_id for e in self.client.search_experiments()]

    def runs(self, experiment: str | None = None) -> list:
        if experiment is None:
            ids = self.experiment_ids()
        else:
            found = self.client.get_experiment_by_name(experiment)
            ids = [found.experiment_id] if found else []
        return self.client.search_runs(ids, max_results=10_000) if ids else []

    def parents(self, experiment: str | None = None) -> list:
        return [r for r in self.runs(experiment) if "mlflow.parentRunId" not in r.data.tags]

    def children(self, parent_run_id: str) -> dict[str, object]:
        """Nested runs of one parent, by run name (= method)."""
        return children(self.client, parent_run_id)

    def running(self) -> list:
        return [r for r in self.runs() if r.info.status == "RUNNING"]

    def artifact_paths(self, run_id: str, folder: str | None = None) -> list[str]:
        return [a.path for a in self.client.list_artifacts(run_id, folder)]

    def download(self, run_id: str, path: str) -> bytes:
        dst = self.download_dir / run_id
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dst))).read_bytes()

    def history(self, run_id: str, metric: str) -> list:
        return sorted(self.client.get_metric_history(run_id, metric), key=lambda m: m.step)

    def logged_models(self, run_id: str) -> list:
        return logged_models(self.uri, self.client.get_run(run_id))


def client(uri: str) -> MlflowClient:
    return MlflowClient(uri)


def sqlite_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def children(mlflow_client, parent_id: str) -> dict:
    parent = mlflow_client.get_run(parent_id)
    runs = mlflow_client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100
    )
    return {r.info.run_name: r for r in runs}


def all_runs(mlflow_client) -> list:
    ids = [e.experiment_id for e in mlflow_client.search_experiments()]
    return mlflow_client.search_runs(ids, max_results=5000) if ids else []


def running(mlflow_client) -> list[str]:
    return [
        f"{r.info.run_name} ({r.info.run_id})" for r in all_runs(mlflow_client) if r.info.status == "RUNNING"
    ]


def logged_models(uri: str, run) -> list:
    import mlflow  # the fluent API, for its search of logged models

    mlflow.set_tracking_uri(uri)
    return mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        output_format="list",
    )


def check_complete_record(
    uri: str, parent_id: str, methods=ALL_METHODS, download_pngs: bool = False, grid: bool = True
) -> dict:
    """A FINISHED parent with config.yaml, comparison.png and risk_coverage.png, and per method a FINISHED
    child with every metric of the library's list (finite; the grid ones only for data sets with a grid),
    cache tags, the risk-coverage and both surface PNGs and one logged pyfunc model. Returns the children
    by method."""
    c = client(uri)
    parent = c.get_run(parent_id)
    assert parent.info.status == "FINISHED", (parent_id, parent.info.status)
    parent_files = {a.path for a in c.list_artifacts(parent_id)} | {
        a.path for a in c.list_artifacts(parent_id, "plots")
    }
    assert {"config.yaml", "plots/comparison.png", "plots/risk_coverage.png"} <= parent_files, parent_files
    kids = children(c, parent_id)
    assert sorted(kids) == sorted(methods), f"child runs of {parent_id}: {sorted(kids)}"
    expected = {m for m in METRIC_NAMES if grid or m not in GRID_METRICS}
    for method, run in kids.items():
        assert run.info.status == "FINISHED", (method, run.info.status)
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.params["method"] == method
        missing = expected - set(run.data.metrics)
        assert not missing, f"{method}: missing metrics {sorted(missing)}"
        assert all(math.isfinite(v) for v in run.data.metrics.values()), (method, run.data.metrics)
        plots = {a.path: a.file_size for a in c.list_artifacts(run.info.run_id, "plots")}
        surfaces = ("plots/class_probability.png", "plots/uncertainty.png") if grid else ()
        for png in ("plots/risk_coverage.png", *surfaces):
            assert plots.get(png, 0) > 1000, (method, png, plots)
            if download_pngs:
                local = c.download_artifacts(run.info.run_id, png)
                assert Path(local).read_bytes().startswith(PNG_MAGIC), (method, local)
        models = logged_models(uri, run)
        assert len(models) == 1, (method, models)
        assert [o.model_id for o in run.outputs.model_outputs] == [models[0].model_id]
        for tag in ("cached.train", "cached.evaluate", "cached.plot"):
            assert run.data.tags.get(tag) in ("true", "false"), (method, tag, run.data.tags)
    return kids


DATA_PARAMS = ("data.rows_train", "data.rows_test", "data.rows_ood", "data.classes", "data.digest")


def check_data_lineage(run, rows: dict[str, int], classes: list[str], source_type: str = "local") -> None:
    """DESIGN.md's data record on one run (parent or method): params data.rows_train/test/ood, data.classes,
    data.digest, and the datasets of mlflow.log_input (contexts train, test, and ood unless it has no
    rows), each with a name ending in its split, a digest, its source (`local`: a table's path; `code`: a
    generator and seed) and its row count."""
    params = run.data.params
    assert {p: params.get(p) for p in DATA_PARAMS} == {
        "data.rows_train": str(rows["train"]),
        "data.rows_test": str(rows["test"]),
        "data.rows_ood": str(rows["ood"]),
        "data.classes": ",".join(classes),
        "data.digest": params.get("data.digest"),
    }, params
    assert len(params["data.digest"]) == 64, params["data.digest"]
    logged = {}
    for entry in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in entry.tags}
        logged[tags["mlflow.data.context"]] = entry.dataset
    splits = sorted(split for split in ("ood", "test", "train") if rows[split])  # no empty OOD set
    assert sorted(logged) == splits, (run.info.run_name, sorted(logged))
    for split, dataset in logged.items():
        assert dataset.name.endswith(f"-{split}") and dataset.digest, (split, dataset)
        assert dataset.source_type == source_type and json.loads(dataset.source), dataset.source
        if source_type == "local":
            assert "uri" in json.loads(dataset.source), dataset.source
        assert json.loads(dataset.profile) == {"num_rows": rows[split]}, (split, dataset.profile)
    assert len({d.digest for d in logged.values()}) == len(splits)  # different splits


def comparable_metrics(kids: dict) -> dict[str, dict[str, float]]:
    """Metrics per method without the timings (`*_seconds` are wall-clock, never reproducible)."""
    return {
        m: {k: v for k, v in r.data.metrics.items() if not k.endswith("_seconds")} for m, r in kids.items()
    }


def prefect_states(api_url: str, flow_run_id: str) -> dict[str, str]:
    """The flow run's state type ('flow') and its task runs' (by name), as the Prefect server has them."""
    flow = http_json(f"{api_url}/flow_runs/{flow_run_id}")
    tasks = http_json(f"{api_url}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {"flow": flow["state_type"], **{t["name"]: t["state_type"] for t in tasks}}


def prefect_completed(api_url: str, flow_run_id: str, timeout: float = 60) -> dict[str, str]:
    """prefect_states() once the flow run and every task run are COMPLETED; AssertionError with what the
    server has if they are not within `timeout` s (it applies state events a moment after they arrive)."""
    deadline = time.monotonic() + timeout
    while set((states := prefect_states(api_url, flow_run_id)).values()) != {"COMPLETED"}:
        assert time.monotonic() < deadline, f"Prefect's record of flow run {flow_run_id}: {states}"
        time.sleep(1)
    return states
