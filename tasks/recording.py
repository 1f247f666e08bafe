"""The MLflow record of a flow run: one parent run, one nested run per method (or sweep point), the
comparison table and the Prefect artifacts that link to them.

Everything is written from the flow's own thread (MLflow's fluent API is not thread-safe), from the
results of cached tasks, so a run whose tasks all hit the cache still gets a complete record.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mlflow
import yaml
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from sngp_models.evaluation import SUMMARY_METRICS

from . import faults, tracking
from .cache import CODE_VERSION, cache_root, configured
from .data import data_facts
from .evaluate import NO_OOD_MESSAGE
from .plot import plot_comparison
from .redaction import redact
from .train import STOP_TRAINING


@dataclass
class ParentRun:
    """The open parent MLflow run of a flow run, and every run it started (ended FAILED on failure)."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    started_runs: list[str] = field(default_factory=list)


@contextmanager
def parent_run(
    *,
    tracking_uri: str | None,
    experiment: str,
    kind: str,
    params: dict[str, Any],
    config: dict[str, Any],
    extra_tags: dict[str, str] | None = None,
) -> Iterator[ParentRun]:
    """Open the parent MLflow run (params, `config.yaml`); on any failure end every run this flow
    started as FAILED (KILLED on interrupt), so nothing is left RUNNING."""
    logger = get_run_logger()
    STOP_TRAINING.clear()
    uri = tracking.resolve_tracking_uri(tracking_uri)
    experiment_id = tracking.setup(uri, experiment)
    try:  # runs left RUNNING by a killed earlier run: FAILED, with the reason as a tag
        orphaned = tracking.fail_orphaned_runs(uri, experiment_id)
    except mlflow.exceptions.MlflowException as exc:
        if faults.unreachable(exc):
            raise
        orphaned = []
        logger.warning("could not check for runs left RUNNING by killed processes: %s", exc)
    if orphaned:
        logger.warning(
            "marked %d MLflow run(s) FAILED: their process was killed before it finished them (%s)",
            len(orphaned),
            ", ".join(orphaned),
        )
    tags = {
        **tracking.process_tags(),
        "prefect.flow_run_id": str(flow_run.get_id() or ""),
        "prefect.flow_run_name": str(flow_run.get_name()),
        "git_commit": tracking.git_commit(),
        "code_version": CODE_VERSION,
        "pipeline": kind,
        **(extra_tags or {}),
    }
    parent = tracking.start_run(experiment_id, f"{kind}-{flow_run.get_name() or 'local'}", tags)
    started_runs = [parent.info.run_id]
    logger.info("MLflow parent run %s (%s)", parent.info.run_id, redact(uri))
    try:
        tracking.log_params(params)
        tracking.log_text_artifact(yaml.safe_dump(config, sort_keys=False), "config.yaml")
        yield ParentRun(uri, experiment_id, parent.info.run_id, started_runs)
    except BaseException as exc:
        # KeyboardInterrupt, SystemExit, Prefect's TerminationSignal (its SIGTERM handler): interrupted.
        interrupted = not isinstance(exc, Exception)
        gone = faults.unreachable(exc)  # a server away for the whole --server-grace
        if interrupted or gone:
            STOP_TRAINING.set()  # training threads stop at their next epoch instead of running to the end
        if gone:
            faults.give_up(gone)
        status = "KILLED" if interrupted else "FAILED"
        stores = [run.info.artifact_uri for run in [mlflow.active_run()] if run]  # as started: no request
        full = faults.disk_full(exc, [*stores, str(cache_root())])
        try:
            while mlflow.active_run() is not None:
                mlflow.end_run(status)
            tracking.fail_unfinished_runs(uri, started_runs, status)
        except mlflow.exceptions.MlflowException as cleanup_error:
            if faults.unreachable(cleanup_error) != faults.MLFLOW:
                raise
            # The server is gone: the runs stay RUNNING there until the next run marks them FAILED.
        if full is not None and full is not exc:
            raise full from exc
        raise
    mlflow.end_run("FINISHED")


@dataclass(frozen=True)
class DataRecord:
    """What a run records about its data: the data_facts of the training file and of the file the
    models are evaluated on (the same file, but in retraining on generated data)."""

    train: dict[str, Any]
    evaluation: dict[str, Any]

    @classmethod
    def of(cls, data_path: str, eval_path: str | None = None) -> DataRecord:
        train = data_facts(data_path)
        return cls(train, train if eval_path in (None, data_path) else data_facts(eval_path))

    def log(self) -> None:
        """The datasets (mlflow.log_inputs) and the data params, on the active run."""
        tracking.log_data(self.train, self.evaluation)


def record_method(
    method: str,
    params: dict[str, Any],
    trained: dict,
    evaluated: dict,
    plotted: dict,
    parent: ParentRun,
    data: DataRecord | None = None,
) -> dict[str, Any] | BaseException:
    """One nested MLflow run for `method` (its `params`), from its task futures; returns a result dict
    or the error (recorded: the run is FAILED with an `error` tag, the other methods go on)."""
    logger = get_run_logger()
    child = tracking.start_run(
        parent.experiment_id, method, {"method": method, **tracking.process_tags()}, nested=True
    )
    parent.started_runs.append(child.info.run_id)
    try:
        t0 = time.perf_counter()
        train_result = trained[method].result()
        evaluation = evaluated[method].result()
        pngs = plotted[method].result()
        cached = {
            stage: futures[method].state.name == "Cached"
            for stage, futures in (("train", trained), ("evaluate", evaluated), ("plot", plotted))
        }
        mlflow.log_params({"method": method, **params})
        if "gp_kernel_scale_chosen" in train_result:  # SNGP: the kernel scale it trained with
            mlflow.log_param("gp_kernel_scale_chosen", train_result["gp_kernel_scale_chosen"])
        if data is not None:
            data.log()
        mlflow.set_tags({f"cached.{stage}": str(hit).lower() for stage, hit in cached.items()})
        # The model before the metrics: log_model links the run's existing metrics to the model by
        # reading back every metric's history (~0.1 s a model); the evaluation metrics are linked to it
        # directly instead.
        model = tracking.log_model(train_result["model_dir"], evaluation["abstention_path"])
        tracking.log_curves(train_result["history"])
        mlflow.log_metrics(evaluation["metrics"], model_id=model.model_id)
        for path in pngs.values():
            mlflow.log_artifact(path, "plots")
        mlflow.end_run("FINISHED")
        logger.info(
            "%s recorded in MLflow run %s (%.1f s; cached: %s)",
            method,
            child.info.run_id,
            time.perf_counter() - t0,
            ", ".join(k for k, v in cached.items() if v) or "none",
        )
        return {
            "run_id": child.info.run_id,
            "metrics": evaluation["metrics"],
            "cached": cached,
            "model_uri": model.model_uri,
            "model_dir": train_result["model_dir"],
            "predictions_path": evaluation["predictions_path"],
            "plots": pngs,
        }
    except Exception as exc:  # record the failure, keep the other methods' records, fail the flow later
        if faults.unreachable(exc):
            raise  # the other methods' records would only wait for the server again: fail the flow now
        mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.end_run("FAILED")
        logger.error("%s failed: %s: %s", method, type(exc).__name__, exc)
        return exc


def record_methods(
    settings: dict[str, dict],
    trained: dict,
    evaluated: dict,
    plotted: dict,
    parent: ParentRun,
    data_path: str,
    eval_path: str | None = None,
) -> dict[str, dict[str, Any] | BaseException]:
    """The data record (datasets and data params, tasks.tracking.log_data) on the parent run, then
    record_method for each method of `settings` (method -> its params), in order -> method -> its
    result dict, or the error it failed with. `eval_path`: the data file the models were evaluated on,
    if not `data_path` (retraining on generated data)."""
    data = DataRecord.of(data_path, eval_path)
    data.log()
    if data.evaluation["rows"]["ood"] == 0:
        get_run_logger().warning("%s", NO_OOD_MESSAGE)
    return {
        method: record_method(method, params, trained, evaluated, plotted, parent, data)
        for method, params in settings.items()
    }


def finish_parent(
    outcomes: dict[str, dict[str, Any] | BaseException], data_path: str, parent: ParentRun
) -> dict:
    """Comparison figures and the methods x metrics table on the parent run; Prefect artifacts ->
    the run's summary. Then raises the first method's error, if any failed (the flow run fails, with
    every other method recorded)."""
    results = {m: r for m, r in outcomes.items() if not isinstance(r, BaseException)}
    figures = {}
    if results:
        figures = configured(plot_comparison)(
            {m: r["predictions_path"] for m, r in results.items()}, data_path
        )
        for path in figures.values():
            mlflow.log_artifact(path, "plots")
        tracking.log_text_artifact(comparison_csv(results), "comparison.csv")
    summary = {
        "parent_run_id": parent.run_id,
        "experiment_id": parent.experiment_id,
        "tracking_uri": parent.tracking_uri,
        "methods": results,
        "parent_plots": figures,
    }
    publish_summary(summary)
    raise_first_failure(outcomes)
    return summary


def raise_first_failure(outcomes: dict[str, Any]) -> None:
    """Raise the first method's error among record_methods' outcomes, if one failed."""
    for outcome in outcomes.values():
        if isinstance(outcome, BaseException):
            raise outcome


def comparison_csv(results: dict[str, dict]) -> str:
    """Methods x metrics, one row per method (metrics missing for a data set are left empty)."""
    names = sorted({k for r in results.values() for k in r["metrics"]})
    lines = ["method," + ",".join(names)]
    for method, r in results.items():
        lines.append(
            method + "," + ",".join(f"{r['metrics'][k]:.6g}" if k in r["metrics"] else "" for k in names)
        )
    return "\n".join(lines) + "\n"


def publish_summary(summary: dict[str, Any]) -> None:
    """A Prefect table + markdown artifact: metrics per method with the MLflow run links."""
    uri, exp = redact(summary["tracking_uri"]), summary["experiment_id"]
    rows = []
    for method, r in summary["methods"].items():
        rows.append(
            {
                "method": method,
                **{k: round(r["metrics"][k], 4) for k in SUMMARY_METRICS if k in r["metrics"]},
                "cached": ",".join(k for k, v in r["cached"].items() if v) or "-",
                "mlflow_run": r["run_id"],
            }
        )
    create_table_artifact(rows, key="uncertainty-metrics", description="Metrics per method (MLflow run ids)")
    lines = [
        f"# Uncertainty pipeline\n\nParent MLflow run: `{summary['parent_run_id']}`  \n"
        f"{tracking.run_link(uri, exp, summary['parent_run_id'])}\n",
        "| method | " + " | ".join(SUMMARY_METRICS) + " | MLflow run |",
        "|---" * (len(SUMMARY_METRICS) + 2) + "|",
    ]
    for method, r in summary["methods"].items():
        cells = " | ".join(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "-" for k in SUMMARY_METRICS)
        lines.append(f"| {method} | {cells} | {tracking.run_link(uri, exp, r['run_id'])} |")
    create_markdown_artifact(
        "\n".join(lines), key="uncertainty-summary", description="Uncertainty pipeline summary"
    )
