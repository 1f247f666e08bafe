"""The `retrain` flow: fresh data, held-out evaluation, MLflow Model Registry champion/challenger.

Each run trains every configured method on a fresh data seed, records the usual parent/child MLflow
runs, registers each model as a new version of `<registry_prefix>-<method>`, and evaluates that version
and the current `champion` on the same held-out sample (fixed `holdout_seed`). The alias `champion`
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
    SNGPConfig,
    TrainingConfig,
    config_from_flow_parameters,
)
from tasks.data import data_file
from tasks.evaluate import submit_evaluation
from tasks.recording import parent_run, raise_first_failure, record_methods
from tasks.registry import promote_all
from tasks.train import submit_training


@flow(name="retrain", log_prints=True)
def retrain(
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
    retrain: RetrainConfig = RetrainConfig(),
) -> dict[str, Any]:
    """Retrain on fresh data; promote each method's new model only if it is at least as good."""
    # Every parameter is a config section: ConfigError (a ValueError) names the field and what is allowed.
    config = config_from_flow_parameters(locals())
    policy = config.retrain
    data_seed = policy.data_seed if policy.data_seed is not None else secrets.randbelow(2**31 - 1)
    logger = get_run_logger()
    logger.info(
        "retraining %s on data seed %d; held-out seed %d",
        ", ".join(config.methods),
        data_seed,
        policy.holdout_seed,
    )
    tags = {"data_seed": str(data_seed)}
    with parent_run(kind="retrain", extra_tags=tags, **config.record_settings()) as parent:
        data_path = data_file(seed=data_seed, **config.data_settings())
        holdout_path = data_file(seed=policy.holdout_seed, **config.data_settings())
        trained = submit_training(config.methods, config.training_settings(), data_path)
        evaluated, plotted = submit_evaluation(config.methods, trained, holdout_path)
        settings = {m: config.model_settings(m) for m in config.methods}
        outcomes = record_methods(settings, trained, evaluated, plotted, parent)
        decisions = promote_all(outcomes, holdout_path, policy.model_dump())
        raise_first_failure(outcomes)
        return {"data_seed": data_seed, "decisions": decisions}
