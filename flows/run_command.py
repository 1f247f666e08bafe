"""`sngp run`: validate the config, run the pipeline flow once, print where the results are."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import signal
import sys
import time
from pathlib import Path

from flows.cli import UserError
from flows.config import ConfigError, PipelineConfig, load_config
from flows.local_server import start_if_local

HELP = "Run the uncertainty pipeline once (Prefect local mode unless PREFECT_API_URL is set)."
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "default.yaml"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help=f"YAML config (default: the study's settings, {DEFAULT_CONFIG.name}); see conf/ for examples",
    )
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one setting, value parsed as YAML; repeatable, e.g. "
        "--set training.epochs=5 --set methods=[sngp]",
    )


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


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    overrides = list(args.overrides)
    if getattr(args, "tracking_uri", None):
        overrides.append(f"mlflow.tracking_uri={args.tracking_uri}")
    try:
        return load_config(args.config or DEFAULT_CONFIG, overrides)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def terminate_on_sigterm() -> None:
    # SIGTERM becomes SystemExit in the main thread, so MLflow runs end as KILLED instead of RUNNING.
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def check_cache_dir() -> None:
    """The cache folder must be creatable and writable: fail now, not after Prefect has started."""
    # As tasks.cache.cache_root() (not imported here: it imports Prefect).
    root = Path(os.environ.get("SNGP_CACHE_DIR") or Path.cwd() / ".sngp_cache").resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"cache folder {root} is not usable ({exc.strerror or exc}); "
            "choose another with --cache-dir or SNGP_CACHE_DIR"
        ) from None


# Tracking-store URI schemes MLflow knows (a driver may follow: postgresql+psycopg2); plugins add more.
_TRACKING_SCHEMES = {
    "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc",
}  # fmt: skip


def check_tracking(config: PipelineConfig) -> PipelineConfig:
    """Fail fast on an MLflow tracking URI that cannot work (unknown scheme, no server answering), and
    keep a password in it out of the flow's parameters (Prefect stores and shows those): such a URI
    reaches the flow through MLFLOW_TRACKING_URI instead. Returns the config to run.

    Imports neither MLflow nor Prefect (seconds each): a bad URI is reported at once."""
    import importlib.metadata
    import urllib.error
    import urllib.parse
    import urllib.request

    configured = config.mlflow.tracking_uri
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return config  # the default: sqlite:///mlflow.db in the working directory
    shown = redact(uri)
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0]
    plugins = {e.name for e in importlib.metadata.entry_points(group="mlflow.tracking_store")}
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise UserError(
            f"MLflow tracking URI {shown}: MLflow 3 refuses folder stores; use sqlite:///PATH/mlflow.db "
            "or http://HOST:PORT (a tracking server)"
        )
    if scheme not in _TRACKING_SCHEMES | plugins | {"", "file"}:
        raise UserError(
            f"MLflow tracking URI {shown}: unknown scheme {parts.scheme!r}; use http(s)://HOST:PORT "
            "(a tracking server), sqlite:///PATH/mlflow.db or postgresql://USER:PASSWORD@HOST/DB"
        )
    if scheme in ("http", "https"):
        host = parts.netloc.rsplit("@", 1)[-1]
        health = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
        loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
        opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))
        try:
            opener.open(health, timeout=10).close()
        except urllib.error.HTTPError:
            pass  # something answers (auth, proxy): MLflow reports the details itself
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(
                f"no MLflow tracking server answers at {shown} ({reason}); start one (sngp serve) or "
                "fix --tracking-uri / MLFLOW_TRACKING_URI"
            ) from None
    if configured and redact(configured) != configured:
        os.environ["MLFLOW_TRACKING_URI"] = configured
        mlflow_section = config.mlflow.model_copy(update={"tracking_uri": None})
        config = config.model_copy(update={"mlflow": mlflow_section})
    return config


def redact(text: str) -> str:
    """tasks.tracking.redact, without importing MLflow (passwords in URLs -> ***)."""
    import re

    return re.sub(r"(://[^/:@\s]*):\S*@(?=[^@\s]*(?:\s|$))", r"\1:***@", text)


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


def flow_kwargs(config: PipelineConfig, flow=None) -> dict:
    """The config's sections as flow parameters; with `flow`, only the sections that flow accepts
    (the pipeline flow has no `retrain` parameter)."""
    accepted = PipelineConfig.model_fields if flow is None else inspect.signature(flow.fn).parameters
    return {name: getattr(config, name) for name in PipelineConfig.model_fields if name in accepted}


def print_summary(summary: dict, seconds: float, flow_seconds: float | None = None) -> None:
    import mlflow

    from tasks.tracking import redact

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


TABLE_METRICS = {
    "test_accuracy": "test_acc",
    "nll": "nll",
    "ece": "ece",
    "ood_mean_max_prob": "ood_maxp",
    "ood_auroc": "ood_auroc",
    "grid_mean_uncertainty": "grid_unc",
    "distance_uncertainty_spearman": "dist_rho",
    "train_seconds": "train_s",
}


def metric_table(methods: dict[str, dict]) -> str:
    """Methods x metrics as aligned text (the same numbers as comparison.csv on the parent run)."""
    header = f"{'method':<14}" + "".join(f"{short:>10}" for short in TABLE_METRICS.values()) + "  cached"
    lines = [header, "-" * len(header)]
    for method, r in methods.items():
        cells = "".join(
            f"{r['metrics'][m]:>10.4f}" if m in r["metrics"] else f"{'-':>10}" for m in TABLE_METRICS
        )
        cached = ",".join(k for k, v in r["cached"].items() if v) or "-"
        lines.append(f"{method:<14}{cells}  {cached}")
    return "\n".join(lines)


def _local(artifact_uri: str) -> str:
    return artifact_uri.removeprefix("file://")
