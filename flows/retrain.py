"""The `retrain` flow: fresh data, held-out evaluation, MLflow Model Registry champion/challenger.

Each run trains every configured method on a fresh data seed (a table: its files read again, so a new
file matching the glob means more training rows), records the usual parent/child MLflow runs, registers
each model as a new version of `<registry_prefix>-<method>` (tagged `data.digest`, `data.rows_train`),
and evaluates that version and the current `champion` on the same held-out sample (fixed `holdout_seed`;
a table: its stable test side, which never holds a training row). The alias `champion`
moves to the new version only if its accuracy does not drop by more than `accuracy_tolerance` and its
OOD AUROC does not drop by more than `auroc_tolerance`; otherwise the version is tagged `rejected`
with the reason. `models:/<name>@champion` always loads as a pyfunc.
"""

from __future__ import annotations

import secrets
from typing import Any

from prefect import flow, get_run_logger

from flows.config import config_from_flow_parameters
from flows.flow_parameters import config_parameters
from flows.pipeline import train_evaluate_record
from tasks.data import data_file, holdout_file, source_description
from tasks.recording import parent_run, raise_first_failure
from tasks.registry import promote_all


@flow(name="retrain", log_prints=True)
@config_parameters()
def retrain(config_path: str | None = None, **sections: Any) -> dict[str, Any]:
    """Retrain on fresh data (or your table, read again); promote each method's new model only if it is
    at least as good. `config_path`: a YAML config (e.g. conf/table_example.yaml) as the base; the
    sections passed besides it override the keys they set."""
    # Every other parameter is a config section: ConfigError (a ValueError) names the field and what is
    # allowed.
    config = config_from_flow_parameters({"config_path": config_path, **sections})
    policy = config.retrain
    data_seed = policy.data_seed if policy.data_seed is not None else secrets.randbelow(2**31 - 1)
    source = source_description(config.data_settings(), data_seed, policy.holdout_seed)
    get_run_logger().info("retraining %s on %s", ", ".join(config.methods), source)
    tags = {"data_seed": str(data_seed)}
    with parent_run(kind="retrain", extra_tags=tags, **config.record_settings()) as parent:
        data_path = data_file(seed=data_seed, **config.data_settings())
        holdout_path = holdout_file(holdout_seed=policy.holdout_seed, **config.data_settings())
        outcomes = train_evaluate_record(config, data_path, parent, holdout_path)
        decisions = promote_all(outcomes, data_path, holdout_path, policy.model_dump())
        raise_first_failure(outcomes)
        return {"data_seed": data_seed, "decisions": decisions}
