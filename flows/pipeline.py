"""The `uncertainty-pipeline` flow: data -> train x methods -> evaluate -> plot -> MLflow record.

Reads top to bottom like the study: generate the data once, train every method (independent methods
run concurrently on Prefect's thread pool; MC Dropout reuses the deterministic net, as in the study),
evaluate and plot each, then record a parent MLflow run with one nested run per method. Training,
evaluation and plotting are cached across flow runs (keyed by config values, seeds and code), and
the MLflow record is written from the task results every time, so a fully cached run is still
recorded completely.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.config import (
    DataConfig,
    Dataset,
    DeepEnsembleConfig,
    DigitsConfig,
    ExactGPConfig,
    MCDropoutConfig,
    Method,
    MlflowConfig,
    ModelSection,
    PipelineConfig,
    SNGPConfig,
    TrainingConfig,
    config_from_flow_parameters,
)
from sngp_models.interface import read_model_dir
from tasks import tracking
from tasks.cache import CACHE_POLICY, CODE_VERSION, cache_root, task_lock_manager
from tasks.data import generate_data
from tasks.evaluate import evaluate_model
from tasks.plot import plot_comparison, plot_method
from tasks.train import STOP_TRAINING, mc_dropout_from_deterministic, train_model

SUMMARY_METRICS = (
    "test_accuracy",
    "distance_uncertainty_spearman",
    "nll",
    "ece",
    "ood_mean_max_prob",
    "ood_auroc",
    "grid_mean_uncertainty",
    "train_seconds",
)


def configured(task):
    """The task with its cache records stored beside the artefacts (cache_root(), resolved at run time),
    so deleting the cache folder invalidates both together.

    Each record (key, metadata and result together, under a relative key) lives in the cache folder,
    never in PREFECT_HOME: `sngp run` and a served worker have different PREFECT_HOMEs but share the
    cache folder, and a record pointing into another PREFECT_HOME's storage fails the task
    ("Provided path ... is outside of the base path ...") instead of being a cache hit.

    SERIALIZABLE: identical tasks of concurrent runs sharing the cache folder run once (the others wait
    for the lock, then read the cached result); the lock dies with its process (tasks.cache)."""
    policy = CACHE_POLICY.configure(isolation_level="SERIALIZABLE", lock_manager=task_lock_manager())
    return task.with_options(cache_policy=policy, result_storage=cache_root() / "prefect-results")


@flow(name="uncertainty-pipeline", log_prints=True)
def uncertainty_pipeline(
    seed: int = 0,
    methods: list[Method] | None = None,
    dataset: Dataset = "two_moons",
    data: DataConfig = DataConfig(),
    digits: DigitsConfig = DigitsConfig(),
    model: ModelSection = ModelSection(),
    training: TrainingConfig = TrainingConfig(),
    sngp: SNGPConfig = SNGPConfig(),
    mc_dropout: MCDropoutConfig = MCDropoutConfig(),
    deep_ensemble: DeepEnsembleConfig = DeepEnsembleConfig(),
    exact_gp: ExactGPConfig = ExactGPConfig(),
    mlflow: MlflowConfig = MlflowConfig(),
) -> dict[str, Any]:
    """SNGP vs. deterministic ResNet, MC Dropout and Deep Ensemble (parameters: conf/default.yaml)."""
    # Every parameter is a config section: ConfigError (a ValueError) names the field and what is allowed.
    config = config_from_flow_parameters(locals())
    with parent_run(config, "pipeline") as (uri, experiment_id, parent_id, started_runs):
        data_path = generate(config, config.seed)
        trained = submit_training(config, data_path)
        evaluated, plotted = submit_evaluation(config, trained, data_path)
        results, errors = {}, []
        for method in config.methods:
            outcome = record_method(config, method, trained, evaluated, plotted, experiment_id, started_runs)
            if isinstance(outcome, BaseException):
                errors.append(outcome)
            else:
                results[method] = outcome
        summary = finish_parent(results, data_path, uri, experiment_id, parent_id)
        if errors:
            raise errors[0]
        return summary


@contextmanager
def parent_run(config: PipelineConfig, kind: str, extra_tags: dict[str, str] | None = None):
    """Open the parent MLflow run; on any failure end every run this flow started as FAILED (KILLED on
    interrupt), so nothing is left RUNNING."""
    import mlflow as mlf

    logger = get_run_logger()
    STOP_TRAINING.clear()
    uri = tracking.resolve_tracking_uri(config.mlflow.tracking_uri)
    experiment_id = tracking.setup(uri, config.mlflow.experiment)
    try:  # runs left RUNNING by a killed earlier run: FAILED, with the reason as a tag
        orphaned = tracking.fail_orphaned_runs(uri, experiment_id)
    except mlf.exceptions.MlflowException as exc:
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
    parent = mlf.start_run(
        experiment_id=experiment_id, run_name=f"{kind}-{flow_run.get_name() or 'local'}", tags=tags
    )
    started_runs = [parent.info.run_id]
    logger.info("MLflow parent run %s (%s)", parent.info.run_id, tracking.redact(uri))
    try:
        tracking.log_params(config.flat())
        tracking.log_text_artifact(
            yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "config.yaml"
        )
        yield uri, experiment_id, parent.info.run_id, started_runs
    except BaseException as exc:
        # KeyboardInterrupt, SystemExit, Prefect's TerminationSignal (its SIGTERM handler): interrupted.
        interrupted = not isinstance(exc, Exception)
        if interrupted:
            STOP_TRAINING.set()  # training threads stop at their next epoch instead of running to the end
        status = "KILLED" if interrupted else "FAILED"
        while mlf.active_run() is not None:
            mlf.end_run(status)
        tracking.fail_unfinished_runs(uri, started_runs, status)
        raise
    mlf.end_run("FINISHED")


def generate(config: PipelineConfig, seed: int) -> str:
    """The data file for `seed` (cached): two moons or digits, as the config says."""
    return configured(generate_data)(
        config.data.model_dump(mode="json"), seed, config.dataset, config.digits.model_dump(mode="json")
    )


def relevant(config: PipelineConfig, method: str) -> dict[str, Any]:
    """The library config fields that matter for `method` (its cache key and MLflow params)."""
    return config.model_config_for(method).relevant(method)


def submit_training(config: PipelineConfig, data_path: str) -> dict[str, Any]:
    """Submit one training per method (they run concurrently); MC Dropout wraps the deterministic net.

    A result whose model directory is missing or incomplete (a cache entry outliving its files, a
    process killed while saving) is not trusted: that training reruns instead of failing later."""
    train = configured(train_model)
    methods = config.methods
    trained = {}
    if "mc_dropout" in methods and "deterministic" not in methods:
        trained["deterministic"] = train.submit("deterministic", relevant(config, "deterministic"), data_path)
    for method in methods:
        if method != "mc_dropout":
            trained[method] = train.submit(method, relevant(config, method), data_path)
    retrain = train.with_options(refresh_cache=True)
    for method, future in trained.items():
        args = (method, relevant(config, method), data_path)
        trained[method] = usable_model(future, lambda a=args: retrain.submit(*a))
    if "mc_dropout" in methods:
        mc_dropout = configured(mc_dropout_from_deterministic)
        args = (trained["deterministic"], relevant(config, "mc_dropout"))
        trained["mc_dropout"] = usable_model(
            mc_dropout.submit(*args), lambda: mc_dropout.with_options(refresh_cache=True).submit(*args)
        )
    return trained


def usable_model(future, rerun):
    """`future` once finished, or `rerun()` (the same task, cache refreshed) if the model directory its
    result names does not load (no manifest, checksum mismatch, missing)."""
    future.wait()
    if not future.state.is_completed():
        return future  # a real failure: recorded by record_method
    model_dir = future.result()["model_dir"]
    try:
        read_model_dir(model_dir)
    except (ValueError, OSError) as exc:
        get_run_logger().warning("%s; training again", exc)
        return rerun()
    return future


def submit_evaluation(config: PipelineConfig, trained: dict[str, Any], data_path: str):
    evaluate, plot = configured(evaluate_model), configured(plot_method)
    evaluated = {m: evaluate.submit(m, trained[m], data_path) for m in config.methods}
    plotted = {m: plot.submit(m, evaluated[m], data_path) for m in config.methods}
    return evaluated, plotted


def record_method(config, method, trained, evaluated, plotted, experiment_id, started_runs):
    """One nested MLflow run for `method`, from its task results; returns a result dict or the error."""
    import mlflow as mlf

    logger = get_run_logger()
    child = mlf.start_run(
        experiment_id=experiment_id,
        run_name=method,
        nested=True,
        tags={"method": method, **tracking.process_tags()},
    )
    started_runs.append(child.info.run_id)
    try:
        t0 = time.perf_counter()
        train_result = trained[method].result()
        evaluation = evaluated[method].result()
        pngs = plotted[method].result()
        cached = {
            stage: futures[method].state.name == "Cached"
            for stage, futures in (("train", trained), ("evaluate", evaluated), ("plot", plotted))
        }
        mlf.log_params({"method": method, **relevant(config, method)})
        mlf.set_tags({f"cached.{stage}": str(hit).lower() for stage, hit in cached.items()})
        # The model before the metrics: log_model links the run's existing metrics to the model by
        # reading back every metric's history (~0.1 s a model); the evaluation metrics are linked to it
        # directly instead.
        model = tracking.log_model(train_result["model_dir"])
        tracking.log_curves(train_result["history"])
        mlf.log_metrics(evaluation["metrics"], model_id=model.model_id)
        for path in pngs.values():
            mlf.log_artifact(path, "plots")
        mlf.end_run("FINISHED")
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
        mlf.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
        mlf.end_run("FAILED")
        logger.error("%s failed: %s: %s", method, type(exc).__name__, exc)
        return exc


def finish_parent(results: dict, data_path: str, uri: str, experiment_id: str, parent_id: str) -> dict:
    """Comparison figures and the methods x metrics table on the parent run; Prefect artifacts."""
    import mlflow as mlf

    figures = {}
    if results:
        figures = configured(plot_comparison)(
            {m: r["predictions_path"] for m, r in results.items()}, data_path
        )
        for path in figures.values():
            mlf.log_artifact(path, "plots")
        tracking.log_text_artifact(comparison_csv(results), "comparison.csv")
    summary = {
        "parent_run_id": parent_id,
        "experiment_id": experiment_id,
        "tracking_uri": uri,
        "methods": results,
        "parent_plots": figures,
    }
    publish_summary(summary)
    return summary


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
    uri, exp = tracking.redact(summary["tracking_uri"]), summary["experiment_id"]
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
