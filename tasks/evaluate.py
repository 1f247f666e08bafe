"""Evaluate one trained method: probabilities, uncertainty and every DESIGN.md metric (cached).

Each evaluation also calibrates the method's abstention rule on the in-distribution test split
(`serving.target_coverage`) and writes it (sngp_models.abstention.Abstention JSON) beside the
predictions: `<predictions>.abstention.json`, which the logged model carries as its artefact `abstention`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task

import sngp_models
from sngp_models import evaluation
from sngp_models.abstention import DEFAULT_TARGET_COVERAGE

from .cache import CACHE_POLICY, CODE_VERSION, artifact_path, configured, stable_key, write_atomic
from .data import load_data
from .plot import abstention_path, plot_method

NO_OOD_MESSAGE = (
    "no OOD set (give table.ood_path or table.ood_classes): OOD metrics skipped ("
    + ", ".join(evaluation.OOD_METRICS)
    + ")"
)


@task(name="evaluate", task_run_name="evaluate-{method}", cache_policy=CACHE_POLICY, persist_result=True)
def evaluate_model(
    method: str,
    trained: dict,
    data_path: str,
    code_version: str = CODE_VERSION,
    target_coverage: float = DEFAULT_TARGET_COVERAGE,
) -> dict:
    """Metrics on the test split, the OOD set (if any) and the grid (2-D data); predictions saved as .npz,
    the abstention rule (threshold accepting `target_coverage` of the test split) as JSON beside them."""
    data = load_data(data_path)
    model = sngp_models.load_model(trained["model_dir"])
    if not evaluation.has_ood(data):
        get_run_logger().info("%s: %s", method, NO_OOD_MESSAGE)
    arrays, inference_seconds = evaluation.predict_splits(model, data)
    abstention = evaluation.calibrate_test(arrays, target_coverage)
    values = {
        **evaluation.metrics_from_predictions(data, arrays, abstention),
        "train_seconds": float(trained["train_seconds"]),
        "inference_seconds": inference_seconds,
    }
    key = stable_key(method, trained["model_dir"], data_path, code_version, target_coverage)
    path = artifact_path("predictions", f"{method}-{key}.npz")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    write_atomic(path, write)
    rule = write_atomic(abstention_path(path), abstention.save)
    return {
        "method": method,
        "metrics": {k: float(v) for k, v in values.items()},
        "predictions_path": str(path),
        "abstention_path": str(rule),
    }


def submit_evaluation(
    methods: list[str],
    trained: dict[str, Any],
    data_path: str,
    target_coverage: float = DEFAULT_TARGET_COVERAGE,
) -> tuple[dict, dict]:
    """Submit the evaluation and the plots of each trained method -> (evaluation futures, plot futures).
    `target_coverage`: the config's serving.target_coverage (the abstention threshold's)."""
    evaluate, plot = configured(evaluate_model), configured(plot_method)
    evaluated = {
        m: evaluate.submit(m, trained[m], data_path, target_coverage=target_coverage) for m in methods
    }
    plotted = {m: plot.submit(m, evaluated[m], data_path) for m in methods}
    return evaluated, plotted
