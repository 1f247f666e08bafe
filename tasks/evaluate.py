"""Evaluate one trained method: probabilities, uncertainty and every DESIGN.md metric (cached)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from prefect import task

from .cache import CACHE_POLICY, CODE_VERSION, artifact_path, stable_key, write_atomic
from .data import load_data


@task(name="evaluate", task_run_name="evaluate-{method}", cache_policy=CACHE_POLICY, persist_result=True)
def evaluate_model(method: str, trained: dict, data_path: str, code_version: str = CODE_VERSION) -> dict:
    """Metrics on the fresh test sample, the OOD set and (two moons) the grid; predictions saved as .npz."""
    import sngp_models
    from sngp_models import metrics  # scipy + scikit-learn: imported only when evaluating

    data = load_data(data_path)
    model = sngp_models.load_model(trained["model_dir"])
    # inference_seconds: the grid (the study's 10,000 points) on two moons, else the test sample.
    started = time.perf_counter()
    main = model.predict_with_uncertainty(data.x_grid if data.x_grid is not None else data.x_test)
    inference_seconds = time.perf_counter() - started
    train = model.predict_with_uncertainty(data.x_train)
    test = model.predict_with_uncertainty(data.x_test) if data.x_grid is not None else main
    ood = model.predict_with_uncertainty(data.x_ood)

    test_metrics = metrics.classification_metrics(data.y_test, test.probs)
    values = {
        "train_accuracy": metrics.accuracy(data.y_train, train.probs),
        "test_accuracy": test_metrics["accuracy"],
        "nll": test_metrics["nll"],
        "brier": test_metrics["brier"],
        "ece": test_metrics["ece"],
        "ood_mean_max_prob": float(ood.probs.max(axis=1).mean()),
        **metrics.ood_metrics(test.uncertainty, ood.uncertainty),
        "train_seconds": float(trained["train_seconds"]),
        "inference_seconds": inference_seconds,
    }
    arrays = {
        "test_probs": test.probs,
        "test_uncertainty": test.uncertainty,
        "ood_probs": ood.probs,
        "ood_uncertainty": ood.uncertainty,
        "train_uncertainty": train.uncertainty,
    }
    if data.x_grid is not None:
        # Distance awareness as a number: does uncertainty grow with distance to the training data?
        distance = metrics.distance_to_nearest(data.x_grid, data.x_train)
        values["grid_mean_uncertainty"] = float(main.uncertainty.mean())
        values["distance_uncertainty_spearman"] = metrics.distance_uncertainty_spearman(
            main.uncertainty, distance
        )
        arrays.update(grid_probs=main.probs, grid_uncertainty=main.uncertainty, grid_distance=distance)
    key = stable_key(method, trained["model_dir"], data_path, code_version)
    path = artifact_path("predictions", f"{method}-{key}.npz")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    write_atomic(path, write)
    return {
        "method": method,
        "metrics": {k: float(v) for k, v in values.items()},
        "predictions_path": str(path),
    }
