"""One evaluation for every method: `evaluate(model, data) -> {metric name: value}`.

This module is the single source of the metric names: the pipeline's tasks, the sweeps, the `sngp run`
table and the tests all take them from here. `data` is any of the library's data sets (two moons,
digits, tables): train/test/OOD splits, and a 2-D grid where the data set has one. An empty OOD set
(0 rows) has no OOD metrics: they are left out (see `has_ood`), not computed on nothing.

Selective prediction (sngp_models.abstention): the abstention threshold is calibrated on the
in-distribution test split (`calibrate_test`: the smallest threshold accepting `target_coverage` of it);
`abstain_threshold` is that threshold, `aurc` the area under the test split's risk-coverage curve with
uncertainty as the score, `risk_at_target_coverage` the test error rate among the examples the
threshold accepts, and `ood_reject_rate` the fraction of the OOD set abstained at the threshold.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .abstention import DEFAULT_TARGET_COVERAGE, Abstention, aurc, calibrate, reject_rate
from .interface import Prediction

# Every metric a method's run records (DESIGN.md), in display order.
METRIC_NAMES = (
    "train_accuracy",
    "test_accuracy",
    "nll",
    "brier",
    "ece",
    "ood_mean_max_prob",
    "ood_auroc",
    "ood_aupr",
    "ood_fpr95",
    "aurc",
    "risk_at_target_coverage",
    "abstain_threshold",
    "ood_reject_rate",
    "grid_mean_uncertainty",
    "distance_uncertainty_spearman",
    "train_seconds",
    "inference_seconds",
)
# Only data sets with a 2-D grid (two moons) have these.
GRID_METRICS = ("grid_mean_uncertainty", "distance_uncertainty_spearman")
# Only data sets with an OOD set have these (a table without ood_path or ood_classes has none).
OOD_METRICS = ("ood_mean_max_prob", "ood_auroc", "ood_aupr", "ood_fpr95", "ood_reject_rate")
# Reported by training, not by `evaluate`.
TRAINING_METRICS = ("train_seconds",)
# The headline columns of the `sngp run` table and the Prefect summary artifact, with their short names.
SUMMARY_METRICS = {
    "test_accuracy": "test_acc",
    "nll": "nll",
    "ece": "ece",
    "ood_mean_max_prob": "ood_maxp",
    "ood_auroc": "ood_auroc",
    "aurc": "aurc",
    "ood_reject_rate": "ood_rej",
    "grid_mean_uncertainty": "grid_unc",
    "distance_uncertainty_spearman": "dist_rho",
    "train_seconds": "train_s",
}


def predict_splits(model: Any, data: Any) -> tuple[dict[str, np.ndarray], float]:
    """Probabilities and uncertainty on every split -> (arrays by name, inference seconds).

    Inference seconds time the grid (the study's 10,000 points) on two moons, else the test split."""
    started = time.perf_counter()
    main = model.predict_with_uncertainty(data.x_grid if data.x_grid is not None else data.x_test)
    inference_seconds = time.perf_counter() - started
    train = model.predict_with_uncertainty(data.x_train)
    test = model.predict_with_uncertainty(data.x_test) if data.x_grid is not None else main
    if has_ood(data):
        ood = model.predict_with_uncertainty(data.x_ood)
    else:
        empty = np.zeros((0, test.probs.shape[1]), np.float32)
        ood = Prediction(probs=empty, uncertainty=np.zeros(0, np.float32))
    arrays = {
        "train_probs": train.probs,
        "train_uncertainty": train.uncertainty,
        "test_probs": test.probs,
        "test_uncertainty": test.uncertainty,
        "ood_probs": ood.probs,
        "ood_uncertainty": ood.uncertainty,
    }
    if data.x_grid is not None:
        arrays.update(grid_probs=main.probs, grid_uncertainty=main.uncertainty)
    return arrays, inference_seconds


def calibrate_test(
    arrays: dict[str, np.ndarray], target_coverage: float = DEFAULT_TARGET_COVERAGE
) -> Abstention:
    """The abstention rule calibrated on the in-distribution test split of predict_splits' arrays."""
    return calibrate(arrays["test_uncertainty"], target_coverage)


def selective_metrics(data: Any, arrays: dict[str, np.ndarray], abstention: Abstention) -> dict[str, float]:
    """`aurc`, `risk_at_target_coverage`, `abstain_threshold` on the test split and, with an OOD set,
    `ood_reject_rate` at the threshold of `abstention` (see the module docstring)."""
    correct = np.argmax(arrays["test_probs"], axis=1) == np.asarray(data.y_test)
    uncertainty = arrays["test_uncertainty"]
    values = {
        "aurc": aurc(correct, uncertainty),
        "risk_at_target_coverage": float(np.mean(~correct[~abstention.abstain(uncertainty)])),
        "abstain_threshold": abstention.threshold,
    }
    if len(arrays["ood_uncertainty"]):
        values["ood_reject_rate"] = reject_rate(arrays["ood_uncertainty"], abstention.threshold)
    return values


def metrics_from_predictions(
    data: Any, arrays: dict[str, np.ndarray], abstention: Abstention | None = None
) -> dict[str, float]:
    """The evaluation metrics (all of METRIC_NAMES but the timings) from predict_splits' arrays; adds
    `grid_distance` (each grid point's distance to the training data) to `arrays` on grid data sets.
    `abstention`: the rule the selective metrics use (default: calibrate_test at the default coverage)."""
    from sngp_models import metrics  # scipy + scikit-learn: imported only when evaluating

    if abstention is None:
        abstention = calibrate_test(arrays)

    test_metrics = metrics.classification_metrics(data.y_test, arrays["test_probs"])
    values = {
        "train_accuracy": metrics.accuracy(data.y_train, arrays["train_probs"]),
        "test_accuracy": test_metrics["accuracy"],
        "nll": test_metrics["nll"],
        "brier": test_metrics["brier"],
        "ece": test_metrics["ece"],
    }
    if len(arrays["ood_uncertainty"]):
        values["ood_mean_max_prob"] = float(arrays["ood_probs"].max(axis=1).mean())
        values.update(metrics.ood_metrics(arrays["test_uncertainty"], arrays["ood_uncertainty"]))
    values.update(selective_metrics(data, arrays, abstention))
    if data.x_grid is not None:
        # Distance awareness as a number: does uncertainty grow with distance to the training data?
        distance = metrics.distance_to_nearest(data.x_grid, data.x_train)
        arrays["grid_distance"] = distance
        values["grid_mean_uncertainty"] = float(arrays["grid_uncertainty"].mean())
        values["distance_uncertainty_spearman"] = metrics.distance_uncertainty_spearman(
            arrays["grid_uncertainty"], distance
        )
    return {k: float(v) for k, v in values.items()}


def has_ood(data: Any) -> bool:
    """Whether `data` has an OOD set (at least one row) to compute the OOD metrics on."""
    return data.x_ood is not None and len(data.x_ood) > 0


def evaluate(model: Any, data: Any, target_coverage: float = DEFAULT_TARGET_COVERAGE) -> dict[str, float]:
    """Every metric of METRIC_NAMES that `model` and `data` determine (all but `train_seconds`; the
    OOD_METRICS only with an OOD set, the GRID_METRICS only with a grid). The abstention threshold
    accepts `target_coverage` of the test split."""
    arrays, inference_seconds = predict_splits(model, data)
    abstention = calibrate_test(arrays, target_coverage)
    return {**metrics_from_predictions(data, arrays, abstention), "inference_seconds": inference_seconds}
