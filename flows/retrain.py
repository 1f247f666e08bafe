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

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

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
from flows.pipeline import configured, parent_run, record_method, submit_evaluation, submit_training
from tasks.data import generate_data, load_data

CHAMPION = "champion"


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
    with parent_run(config, "retrain", {"data_seed": str(data_seed)}) as (uri, experiment_id, _, started):
        data_cfg = config.data.model_dump(mode="json")
        data_path = configured(generate_data)(data_cfg, data_seed)
        holdout_path = configured(generate_data)(data_cfg, policy.holdout_seed)
        trained = submit_training(config, data_path)
        evaluated, plotted = submit_evaluation(config, trained, holdout_path)
        decisions, errors = {}, []
        for method in config.methods:
            outcome = record_method(config, method, trained, evaluated, plotted, experiment_id, started)
            if isinstance(outcome, BaseException):
                errors.append(outcome)
                continue
            decisions[method] = promote_or_reject(method, outcome, holdout_path, policy)
        create_table_artifact(
            [{"method": m, **d} for m, d in decisions.items()],
            key="retrain-decisions",
            description="Champion/challenger decisions of this retraining run",
        )
        if errors:
            raise errors[0]
        return {"data_seed": data_seed, "decisions": decisions}


@task(name="evaluate-registered", task_run_name="evaluate-{model_uri}")
def evaluate_registered(model_uri: str, holdout_path: str) -> dict[str, float]:
    """Held-out test accuracy and OOD AUROC of a registry model, through its pyfunc interface."""
    import mlflow
    import numpy as np
    import pandas as pd

    from sngp_models import metrics

    holdout = load_data(holdout_path)
    model = mlflow.pyfunc.load_model(model_uri)

    def predict(x: np.ndarray) -> pd.DataFrame:
        return model.predict(pd.DataFrame(x.astype(np.float64), columns=[f"x{i}" for i in range(x.shape[1])]))

    test, ood = predict(holdout.x_test), predict(holdout.x_ood)
    probs = test[[c for c in test.columns if c.startswith("prob_")]].to_numpy()
    return {
        "accuracy": metrics.accuracy(holdout.y_test, probs),
        "ood_auroc": metrics.ood_auroc(test["uncertainty"].to_numpy(), ood["uncertainty"].to_numpy()),
    }


def decide(candidate: dict[str, float], champion: dict[str, float] | None, policy: RetrainConfig):
    """(promote?, reason). Pure, so the rule is easy to read and test."""
    if champion is None:
        return True, "first model: no champion yet"
    drops = []
    if candidate["accuracy"] < champion["accuracy"] - policy.accuracy_tolerance:
        drops.append(
            f"accuracy {candidate['accuracy']:.4f} < champion {champion['accuracy']:.4f} "
            f"- tolerance {policy.accuracy_tolerance}"
        )
    if candidate["ood_auroc"] < champion["ood_auroc"] - policy.auroc_tolerance:
        drops.append(
            f"ood_auroc {candidate['ood_auroc']:.4f} < champion {champion['ood_auroc']:.4f} "
            f"- tolerance {policy.auroc_tolerance}"
        )
    if drops:
        return False, "; ".join(drops)
    return True, (
        f"accuracy {candidate['accuracy']:.4f} (champion {champion['accuracy']:.4f}), "
        f"ood_auroc {candidate['ood_auroc']:.4f} (champion {champion['ood_auroc']:.4f})"
    )


def promote_or_reject(method: str, outcome: dict, holdout_path: str, policy: RetrainConfig) -> dict[str, Any]:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    logger = get_run_logger()
    client = MlflowClient()
    name = f"{policy.registry_prefix}-{method}"
    try:
        previous = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        previous = None
    version = mlflow.register_model(outcome["model_uri"], name).version
    candidate = evaluate_registered(f"models:/{name}/{version}", holdout_path)
    champion = evaluate_registered(f"models:/{name}/{previous.version}", holdout_path) if previous else None
    promote, reason = decide(candidate, champion, policy)
    for key, value in candidate.items():
        client.set_model_version_tag(name, version, f"holdout_{key}", f"{value:.6f}")
    client.set_model_version_tag(name, version, "run_id", outcome["run_id"])
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, "promoted", reason)
    else:
        client.set_model_version_tag(name, version, "rejected", reason)
    client.set_tag(
        outcome["run_id"], "registry.decision", f"{'promoted' if promote else 'rejected'}: {reason}"
    )
    logger.info("%s v%s %s: %s", name, version, "promoted to champion" if promote else "rejected", reason)
    return {
        "model": name,
        "version": str(version),
        "promoted": promote,
        "reason": reason,
        "previous_champion": previous.version if previous else None,
        "holdout_accuracy": candidate["accuracy"],
        "holdout_ood_auroc": candidate["ood_auroc"],
    }
