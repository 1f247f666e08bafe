"""`sngp run`: validate the config, run the pipeline flow once, print where the results are."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from flows.cli.common import (
    add_config_arguments,
    check_cache_dir,
    check_tracking,
    config_from_args,
    flow_kwargs,
    terminate_on_sigterm,
)
from flows.ops.local_prefect import start_if_local
from sngp_models.evaluation import SUMMARY_METRICS
from tasks.redaction import redact

HELP = "Run the uncertainty pipeline once (Prefect local mode unless PREFECT_API_URL is set)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
        "in the working directory with artefacts in ./mlartifacts)",
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=None,
        help="where cached data, models, predictions and plots live "
        "(default: $SNGP_CACHE_DIR, else ./.sngp_cache)",
    )
    parser.epilog = (
        "Results: one parent MLflow run with a nested run per method (params, curves, metrics, "
        "pyfunc model, plots/*.png). Rerunning the same config reuses cached tasks."
    )


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.cache_dir:
        os.environ["SNGP_CACHE_DIR"] = str(Path(args.cache_dir).resolve())
    check_cache_dir()
    config = check_tracking(config)
    terminate_on_sigterm()
    started = time.perf_counter()
    local_server = start_if_local()  # overlaps Prefect's ~5 s server start-up with our imports
    from flows.pipeline import uncertainty_pipeline  # Prefect/MLflow import only after the config is valid
    from tasks import tracking

    # MLflow's one-off work (its store, the package index log_model checks) while the server starts.
    tracking.warm_up(tracking.resolve_tracking_uri(config.mlflow.tracking_uri))
    if local_server is not None:
        if local_server.creates_database and not local_server.ready():
            # A first run on this machine: Prefect still migrates its new database (~5 s) and the run
            # will train, so load TensorFlow and the models (~3.5 s) now instead of in the first task.
            import sngp_models.models  # noqa: F401
        local_server.wait_ready()

    with local_server.flow_settings() if local_server is not None else contextlib.nullcontext():
        state = uncertainty_pipeline(**flow_kwargs(config, uncertainty_pipeline), return_state=True)
    if state.is_failed() or state.is_crashed() or state.is_cancelled():
        try:
            state.result()
        except BaseException as exc:  # noqa: BLE001 - reported as one line below
            print(f"sngp run: pipeline failed: {type(exc).__name__}: {redact(str(exc))}", file=sys.stderr)
        return 1
    print_summary(state.result(), time.perf_counter() - started, flow_run_seconds(state))
    return 0


def flow_run_seconds(state) -> float | None:
    """The flow run's duration as Prefect records and shows it (start to end; without this process's
    start-up: imports and, in local mode, Prefect's temporary server)."""
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(state.state_details.flow_run_id)
    except Exception:  # noqa: BLE001 - only a figure in the summary
        return None
    if run.start_time is None or run.end_time is None:
        return None
    return (run.end_time - run.start_time).total_seconds()


def print_summary(summary: dict, seconds: float, flow_seconds: float | None = None) -> None:
    import mlflow

    uri = summary["tracking_uri"]
    client = mlflow.tracking.MlflowClient(uri)
    print()
    print(
        f"Pipeline finished in {seconds:.1f} s"
        + (f" (Prefect flow run {flow_seconds:.1f} s)" if flow_seconds is not None else "")
        + f". MLflow parent run: {summary['parent_run_id']} "
        f"(experiment {summary['experiment_id']}, {redact(uri)})"
    )
    print(metric_table(summary["methods"]))
    print()
    print("Plots:")
    parent_artifacts = _local(client.get_run(summary["parent_run_id"]).info.artifact_uri)
    for name in summary.get("parent_plots", {}):
        print(f"  {'all methods':<15} {parent_artifacts}/plots/{name}")
    print(f"  {'table (CSV)':<15} {parent_artifacts}/comparison.csv")
    for method, r in summary["methods"].items():
        base = _local(client.get_run(r["run_id"]).info.artifact_uri)
        print(f"  {method:<15} {base}/plots/  " + " ".join(sorted(r["plots"])))
    print()
    if uri.startswith(("http://", "https://")):
        print(
            f"Open the MLflow UI: {redact(uri).rstrip('/')}/#/experiments/{summary['experiment_id']}/runs/"
            f"{summary['parent_run_id']}"
        )
    else:
        print("Open the MLflow UI:")
        print(f"  .venv/bin/mlflow ui --backend-store-uri {redact(uri)} --port 5000")
        print(
            f"  then http://127.0.0.1:5000/#/experiments/{summary['experiment_id']}/runs/"
            f"{summary['parent_run_id']}?workflowType=machine_learning"
        )


def metric_table(methods: dict[str, dict]) -> str:
    """Methods x metrics as aligned text (the same numbers as comparison.csv on the parent run)."""
    header = f"{'method':<14}" + "".join(f"{short:>10}" for short in SUMMARY_METRICS.values()) + "  cached"
    lines = [header, "-" * len(header)]
    for method, r in methods.items():
        cells = "".join(
            f"{r['metrics'][m]:>10.4f}" if m in r["metrics"] else f"{'-':>10}" for m in SUMMARY_METRICS
        )
        cached = ",".join(k for k, v in r["cached"].items() if v) or "-"
        lines.append(f"{method:<14}{cells}  {cached}")
    return "\n".join(lines)


def _local(artifact_uri: str) -> str:
    return artifact_uri.removeprefix("file://")
