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

from .data import data_facts, holdout_overlap, load_data
from .pyfunc_model import PREDICTED, UNCERTAINTY

CHAMPION = "champion"


class HoldoutLeak(RuntimeError):
    """The hold-out holds rows the candidate trained on: judging it there would flatter it."""


@task(name="evaluate-registered", task_run_name="evaluate-{model_uri}")
def evaluate_registered(model_uri: str, holdout_path: str) -> dict[str, float]:
    """Held-out test accuracy and (with an OOD set) OOD AUROC of a registry model, through its pyfunc
    interface: the hold-out's columns by name, the labels as the model's class names."""
    holdout = load_data(holdout_path)
    facts = data_facts(holdout_path)
    model = mlflow.pyfunc.load_model(model_uri)

    def predict(x: np.ndarray) -> pd.DataFrame:
        return model.predict(pd.DataFrame(x.astype(np.float64), columns=facts["feature_names"]))

    test = predict(holdout.x_test)
    truth = np.asarray(facts["class_names"])[holdout.y_test]
    scores = {"accuracy": float(np.mean(test[PREDICTED].astype(str).to_numpy() == truth))}
    if len(holdout.x_ood):
        ood = predict(holdout.x_ood)
        scores["ood_auroc"] = metrics.ood_auroc(test[UNCERTAINTY].to_numpy(), ood[UNCERTAINTY].to_numpy())
    return scores


def decide(candidate: dict[str, float], champion: dict[str, float] | None, policy: dict[str, Any]):
    """(promote?, reason). Pure, so the rule is easy to read and test. OOD AUROC counts only where both
    have it (data without an OOD set is judged on accuracy alone)."""
    if champion is None:
        return True, "first model: no champion yet"
    rules = [("accuracy", policy["accuracy_tolerance"]), ("ood_auroc", policy["auroc_tolerance"])]
    rules = [(key, tol) for key, tol in rules if key in candidate and key in champion]
    drops = [
        f"{key} {candidate[key]:.4f} < champion {champion[key]:.4f} - tolerance {tol}"
        for key, tol in rules
        if candidate[key] < champion[key] - tol
    ]
    if drops:
        return False, "; ".join(drops)
    return True, ", ".join(f"{key} {candidate[key]:.4f} (champion {champion[key]:.4f})" for key, _ in rules)


def check_holdout(data_path: str, holdout_path: str) -> dict[str, int]:
    """The hold-out's size and how many of the training rows of `data_path` it holds, which must be
    none (HoldoutLeak otherwise): for a table, by the rows' stable keys (the id, else the feature
    values' hash); for generated data, by the rows' feature values."""
    overlap = holdout_overlap(data_path, holdout_path)
    rows = data_facts(holdout_path)["rows"]["test"]
    if overlap:
        raise HoldoutLeak(
            f"the hold-out ({rows} rows of {holdout_path}) holds {overlap} of the candidate's training "
            f"rows ({data_path}); refusing to judge candidates on rows they trained on"
        )
    return {"rows": rows, "overlap_rows": overlap}


def register_once(model_uri: str, name: str, run_id: str) -> str:
    """mlflow.register_model -> the new version of `name`, created once even when MLflow's HTTP client
    retries the request (the server created a version, then its answer was lost): of the versions of
    `run_id`'s model, the first is kept and any later copy deleted (one search per registration)."""
    version = mlflow.register_model(model_uri, name).version
    client = MlflowClient()
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    versions = sorted({int(v.version) for v in found} | {int(version)})
    for copy in versions[1:]:
        client.delete_model_version(name, str(copy))
    return str(versions[0])


def promote_or_reject(
    method: str, outcome: dict, holdout_path: str, policy: dict[str, Any], tags: dict[str, str] | None = None
) -> dict[str, Any]:
    """Register `method`'s new model (`outcome`: record_method's result) as a new version of
    `<registry_prefix>-<method>` with `tags` (its data); promote it to champion or tag it rejected,
    with the reason."""
    logger = get_run_logger()
    client = MlflowClient()
    name = f"{policy['registry_prefix']}-{method}"
    try:
        previous = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        previous = None
    version = register_once(outcome["model_uri"], name, outcome["run_id"])
    candidate = evaluate_registered(f"models:/{name}/{version}", holdout_path)
    champion = evaluate_registered(f"models:/{name}/{previous.version}", holdout_path) if previous else None
    promote, reason = decide(candidate, champion, policy)
    for key, value in candidate.items():
        client.set_model_version_tag(name, version, f"holdout_{key}", f"{value:.6f}")
    for key, value in {**(tags or {}), "run_id": outcome["run_id"]}.items():
        client.set_model_version_tag(name, version, key, str(value))
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
        "holdout_ood_auroc": candidate.get("ood_auroc"),
    }


def promote_all(
    outcomes: dict[str, Any], data_path: str, holdout_path: str, policy: dict[str, Any]
) -> dict[str, dict]:
    """promote_or_reject for every method that was recorded (failed ones are skipped: the flow fails
    on them afterwards), once the hold-out is known to hold none of the training rows of `data_path`
    (check_holdout) -> decisions by method, also shown as the Prefect table `retrain-decisions`. Each
    version is tagged with its data: `data.digest`, `data.rows_train`, `holdout.rows`,
    `holdout.overlap_rows`."""
    holdout = check_holdout(data_path, holdout_path)
    facts = data_facts(data_path)
    tags = {
        "data.digest": facts["digest"],
        "data.rows_train": facts["rows"]["train"],
        **{f"holdout.{key}": value for key, value in holdout.items()},
    }
    decisions = {
        method: promote_or_reject(method, outcome, holdout_path, policy, tags)
        for method, outcome in outcomes.items()
        if not isinstance(outcome, BaseException)
    }
    create_table_artifact(
        [{"method": m, **d} for m, d in decisions.items()],
        key="retrain-decisions",
        description="Champion/challenger decisions of this retraining run",
    )
    return decisions
