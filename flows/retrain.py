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
    RetrainConfig,
    ServingConfig,
    SNGPConfig,
    TableConfig,
    TrainingConfig,
    config_from_flow_parameters,
)
from tasks.data import data_classes, data_file, holdout_file, source_description
from tasks.evaluate import submit_evaluation
from tasks.recording import parent_run, raise_first_failure, record_methods
from tasks.registry import promote_all
from tasks.train import submit_training


@flow(name="retrain", log_prints=True)
def retrain(
    config_path: str | None = None,
    seed: int = 0,
    methods: list[Method] | None = None,
    dataset: Dataset = "two_moons",
    data: DataConfig = DataConfig(),
    digits: DigitsConfig = DigitsConfig(),
    table: TableConfig = TableConfig(),
    model: ModelSection = ModelSection(),
    training: TrainingConfig = TrainingConfig(),
    sngp: SNGPConfig = SNGPConfig(),
    mc_dropout: MCDropoutConfig = MCDropoutConfig(),
    deep_ensemble: DeepEnsembleConfig = DeepEnsembleConfig(),
    exact_gp: ExactGPConfig = ExactGPConfig(),
    serving: ServingConfig = ServingConfig(),
    mlflow: MlflowConfig = MlflowConfig(),
    retrain: RetrainConfig = RetrainConfig(),
) -> dict[str, Any]:
    """Retrain on fresh data (or your table, read again); promote each method's new model only if it is
    at least as good. `config_path`: a YAML config (e.g. conf/table_example.yaml) as the base; the
    sections passed besides it override the keys they set."""
    # Every parameter is a config section: ConfigError (a ValueError) names the field and what is allowed.
    config = config_from_flow_parameters(locals())
    policy = config.retrain
    data_seed = policy.data_seed if policy.data_seed is not None else secrets.randbelow(2**31 - 1)
    source = source_description(config.data_settings(), data_seed, policy.holdout_seed)
    get_run_logger().info("retraining %s on %s", ", ".join(config.methods), source)
    tags = {"data_seed": str(data_seed)}
    with parent_run(kind="retrain", extra_tags=tags, **config.record_settings()) as parent:
        data_path = data_file(seed=data_seed, **config.data_settings())
        holdout_path = holdout_file(holdout_seed=policy.holdout_seed, **config.data_settings())
        classes = data_classes(data_path)  # a table's classes are known once it is read
        trained = submit_training(config.methods, config.training_settings(classes), data_path)
        evaluated, plotted = submit_evaluation(
            config.methods, trained, holdout_path, config.serving.target_coverage
        )
        settings = config.method_settings(classes)
        outcomes = record_methods(settings, trained, evaluated, plotted, parent, data_path, holdout_path)
        decisions = promote_all(outcomes, data_path, holdout_path, policy.model_dump())
        raise_first_failure(outcomes)
        return {"data_seed": data_seed, "decisions": decisions}
