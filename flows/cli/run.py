"""`sngp run`: validate the config, run the pipeline flow once, print where the results are."""

from __future__ import annotations

import argparse

from flows.cli.common import add_cache_dir_argument, add_flow_arguments, checked_config, run_flow
from sngp_models.evaluation import SUMMARY_METRICS
from tasks.redaction import redact

HELP = "Run the uncertainty pipeline once (Prefect local mode unless PREFECT_API_URL is set)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flow_arguments(parser)
    add_cache_dir_argument(
        parser,
        "where cached data, models, predictions and plots live "
        "(default: $SNGP_CACHE_DIR, else ./.sngp_cache)",
    )
    parser.epilog = (
        "Results: one parent MLflow run with a nested run per method (params, curves, metrics, "
        "pyfunc model, plots/*.png). Rerunning the same config reuses cached tasks."
    )


def main(args: argparse.Namespace) -> int:
    finished = run_flow("sngp run: pipeline failed", checked_config(args), load_pipeline)
    print_summary(finished.state.result(), finished.seconds, flow_run_seconds(finished.state))
    return 0


def load_pipeline():
    from flows.pipeline import uncertainty_pipeline  # lazy: Prefect loads while its server starts

    return uncertainty_pipeline


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
