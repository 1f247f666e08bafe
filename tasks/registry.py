"""The MLflow Model Registry side of retraining: register each new model, judge it and the current
champion on the same held-out data, and move the `champion` alias only if the new one is as good."""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from sngp_models import metrics

from .data import load_data
from .pyfunc_model import feature_columns

CHAMPION = "champion"


@task(name="evaluate-registered", task_run_name="evaluate-{model_uri}")
def evaluate_registered(model_uri: str, holdout_path: str) -> dict[str, float]:
    """Held-out test accuracy and OOD AUROC of a registry model, through its pyfunc interface."""
    holdout = load_data(holdout_path)
    model = mlflow.pyfunc.load_model(model_uri)

    def predict(x: np.ndarray) -> pd.DataFrame:
        return model.predict(pd.DataFrame(x.astype(np.float64), columns=feature_columns(x.shape[1])))

    test, ood = predict(holdout.x_test), predict(holdout.x_ood)
    probs = test[[c for c in test.columns if c.startswith("prob_")]].to_numpy()
    return {
        "accuracy": metrics.accuracy(holdout.y_test, probs),
        "ood_auroc": metrics.ood_auroc(test["uncertainty"].to_numpy(), ood["uncertainty"].to_numpy()),
    }


def decide(candidate: dict[str, float], champion: dict[str, float] | None, policy: dict[str, Any]):
    """(promote?, reason). Pure, so the rule is easy to read and test."""
    if champion is None:
        return True, "first model: no champion yet"
    drops = []
    if candidate["accuracy"] < champion["accuracy"] - policy["accuracy_tolerance"]:
        drops.append(
            f"accuracy {candidate['accuracy']:.4f} < champion {champion['accuracy']:.4f} "
            f"- tolerance {policy['accuracy_tolerance']}"
        )
    if candidate["ood_auroc"] < champion["ood_auroc"] - policy["auroc_tolerance"]:
        drops.append(
            f"ood_auroc {candidate['ood_auroc']:.4f} < champion {champion['ood_auroc']:.4f} "
            f"- tolerance {policy['auroc_tolerance']}"
        )
    if drops:
        return False, "; ".join(drops)
    return True, (
        f"accuracy {candidate['accuracy']:.4f} (champion {champion['accuracy']:.4f}), "
        f"ood_auroc {candidate['ood_auroc']:.4f} (champion {champion['ood_auroc']:.4f})"
    )


def promote_or_reject(
    method: str, outcome: dict, holdout_path: str, policy: dict[str, Any]
) -> dict[str, Any]:
    """Register `method`'s new model (`outcome`: record_method's result) as a new version of
    `<registry_prefix>-<method>`; promote it to champion or tag it rejected, with the reason."""
    logger = get_run_logger()
    client = MlflowClient()
    name = f"{policy['registry_prefix']}-{method}"
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


def promote_all(outcomes: dict[str, Any], holdout_path: str, policy: dict[str, Any]) -> dict[str, dict]:
    """promote_or_reject for every method that was recorded (failed ones are skipped: the flow fails
    on them afterwards) -> decisions by method, also shown as the Prefect table `retrain-decisions`."""
    decisions = {
        method: promote_or_reject(method, outcome, holdout_path, policy)
        for method, outcome in outcomes.items()
        if not isinstance(outcome, BaseException)
    }
    create_table_artifact(
        [{"method": m, **d} for m, d in decisions.items()],
        key="retrain-decisions",
        description="Champion/challenger decisions of this retraining run",
    )
    return decisions
