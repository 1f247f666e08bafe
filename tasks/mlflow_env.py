"""Defaults for MLflow's client in every process that uses the pipeline's tasks, set when `tasks` is
first imported (before any request). A value already in the environment wins."""

from __future__ import annotations

import importlib.metadata
import os

# tasks/mlflow_resend.py's plugin: sends a request again when the server's answer is cut off.
RESEND_PROVIDER = "sngp-resend-cut-answers"
AUTH_PROVIDER_GROUP = "mlflow.request_auth_provider"  # MLflow's entry point group for request auth


def resend_plugin_installed() -> bool:
    """Is the plugin registered (this project installed, not only on sys.path)? MLflow warns on every
    request when MLFLOW_TRACKING_AUTH names a provider it cannot find."""
    return bool(importlib.metadata.entry_points(group=AUTH_PROVIDER_GROUP, name=RESEND_PROVIDER))


def apply_defaults() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in logs
    # A child process inherits the choice: only the first one looks for the plugin (an entry-point scan).
    if "MLFLOW_TRACKING_AUTH" not in os.environ and resend_plugin_installed():
        os.environ["MLFLOW_TRACKING_AUTH"] = RESEND_PROVIDER
