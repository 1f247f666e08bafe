"""Prefect tasks: thin wrappers around sngp_models, one module per pipeline stage."""

from .mlflow_env import apply_defaults

apply_defaults()
