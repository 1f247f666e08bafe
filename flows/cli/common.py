"""What the `sngp` commands share: their common options, the checks made before Prefect or MLflow is
imported, the one error type that becomes a one-line message with exit code 2, and running a flow
(flows/cli/faults.py: riding out servers that are away, one-line reports of faults)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import inspect
import os
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from flows.cli.errors import FlowFailed, UserError
from flows.cli.faults import (
    add_server_grace_argument,
    disk_full,
    one_line_console,
    prepare_clients,
    server_unavailable,
)
from flows.config import ConfigError, PipelineConfig, load_config
from flows.ops.local_prefect import LocalPrefectServer, start_if_local
from tasks.redaction import redact

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "default.yaml"


def add_flow_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that run a flow on a pipeline config (run, retrain)."""
    add_config_arguments(parser)
    add_tracking_argument(parser)
    add_server_grace_argument(parser)


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


def add_tracking_argument(
    parser: argparse.ArgumentParser,
    default: str = "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory with "
    "artefacts in ./mlartifacts",
    use: str = "",
) -> None:
    """--tracking-uri; `default`: where the command looks when it is not given, `use`: what for."""
    parser.add_argument(
        "--tracking-uri", metavar="URI", default=None, help=f"MLflow tracking URI{use} (default: {default})"
    )


def add_cache_dir_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """--cache-dir, which use_cache_dir applies."""
    parser.add_argument("--cache-dir", metavar="DIR", default=None, help=help_text)


def use_cache_dir(args: argparse.Namespace) -> None:
    """--cache-dir as SNGP_CACHE_DIR (absolute), which the tasks and any worker processes read."""
    if getattr(args, "cache_dir", None):  # a command without --cache-dir uses the default
        os.environ["SNGP_CACHE_DIR"] = str(Path(args.cache_dir).resolve())


def add_timeout_argument(parser: argparse.ArgumentParser, default: float, until: str) -> None:
    parser.add_argument(
        "--timeout", type=float, default=default, metavar="SECONDS",
        help=f"how long to wait for {until} (default: %(default)s)",
    )  # fmt: skip


def checked_config(args: argparse.Namespace) -> PipelineConfig:
    """The validated config of `args` (add_flow_arguments' options), once the cache folder, the tracking
    URI and --server-grace are known to work; the clients' retry settings are then in place."""
    use_cache_dir(args)
    config = config_from_args(args)
    check_cache_dir()
    config = check_tracking(config)  # also keeps a password in the URI out of the flow's parameters
    prepare_clients(args)
    return config


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


def flow_kwargs(config: PipelineConfig, flow=None) -> dict:
    """The config's sections as flow parameters; with `flow`, only the sections that flow accepts
    (the pipeline flow has no `retrain` parameter)."""
    accepted = PipelineConfig.model_fields if flow is None else inspect.signature(flow.fn).parameters
    return {name: getattr(config, name) for name in PipelineConfig.model_fields if name in accepted}


class FinishedRun(NamedTuple):
    state: Any  # the flow run's final state (Completed)
    seconds: float  # run_flow's wall time: Prefect's start, the imports, the flow run


def run_flow(failure: str, config: PipelineConfig, load_flow: Callable[[], Any]) -> FinishedRun:
    """Run a pipeline flow (`load_flow()` imports and returns it) on `config` in this process -> its
    final state and how long it all took; FlowFailed (one line starting with `failure`) if it failed.

    In local mode Prefect's temporary server starts first and the heavy imports (Prefect, MLflow and,
    on a first run, TensorFlow) happen while it starts: most of a cached run's time otherwise."""
    started = time.perf_counter()
    terminate_on_sigterm()
    local_server = start_if_local()
    flow = load_flow()
    from tasks import tracking  # lazy: MLflow loads only after the config checks, while Prefect starts

    tracking.warm_up(tracking.resolve_tracking_uri(config.mlflow.tracking_uri))
    if local_server is not None and local_server.creates_database and not local_server.ready():
        # A first run on this machine: Prefect still migrates its new database (~5 s) and the run
        # will train, so load TensorFlow and the models (~3.5 s) now instead of in the first task.
        import sngp_models.models  # noqa: F401 - lazy: TensorFlow, only on a first run
    state = finish_flow_run(failure, local_server, flow, **flow_kwargs(config, flow))
    return FinishedRun(state, time.perf_counter() - started)


def finish_flow_run(failure: str, local_server: LocalPrefectServer | None, flow: Any, **parameters) -> Any:
    """Run `flow(**parameters)` once the temporary server `local_server` (None: a configured server)
    answers -> the final (completed) state. FlowFailed, one line starting with `failure`, if the run
    failed; RunFailed if a server stopped answering for the whole grace, or a disk was full."""
    if local_server is not None:
        local_server.wait_ready()
    one_line_console()
    try:
        with local_server.flow_settings() if local_server is not None else contextlib.nullcontext():
            state = flow(**parameters, return_state=True)
    except Exception as exc:  # the engine itself lost its server (it could not even record a failure)
        failed = server_unavailable(exc) or disk_full(exc)
        if failed is None:
            raise
        raise failed from exc
    if state.is_completed():
        return state
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - reported as one line
        failed = server_unavailable(exc) or disk_full(exc)
        if failed is not None:
            raise failed from exc
        raise FlowFailed(f"{failure}: {type(exc).__name__}: {redact(str(exc))}") from exc
    raise FlowFailed(f"{failure}: the flow run ended {state.name}")
