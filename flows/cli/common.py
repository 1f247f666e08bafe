"""What every `sngp` command shares: the config options, the checks made before Prefect or MLflow is
imported, and the one error type that becomes a one-line message with exit code 2."""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import os
import signal
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from flows.config import ConfigError, PipelineConfig, load_config
from tasks.redaction import redact

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "default.yaml"


class UserError(Exception):
    """A problem with the user's input or environment: reported as one clear line, exit code 2."""


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
