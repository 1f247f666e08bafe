"""The figures as PNG files: per-method surfaces, reliability, uncertainty histogram, risk-coverage and
distance curve, and for the parent run the all-methods comparison, risk-coverage and distance curves
(cached)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task

from sngp_models.abstention import Abstention

from .cache import CACHE_POLICY, CODE_VERSION, artifact_path, stable_key, write_atomic
from .data import load_data


def _save(fig, path: Path) -> str:
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    return str(path)


def _risk_coverage_inputs(data, pred) -> tuple[np.ndarray, np.ndarray]:
    """(correct, uncertainty) on the test split, what a risk-coverage curve needs."""
    return np.argmax(pred["test_probs"], axis=1) == data.y_test, pred["test_uncertainty"]


def abstention_path(predictions_path: str | Path) -> Path:
    """Where the evaluation (tasks.evaluate) writes a method's abstention rule: beside its predictions."""
    return Path(predictions_path).with_suffix(".abstention.json")


def _target_coverage(predictions_path: str) -> float | None:
    """The target coverage of the abstention rule the evaluation wrote beside its predictions."""
    path = abstention_path(predictions_path)
    return Abstention.load(path).target_coverage if path.is_file() else None


def _surface_kwargs(data) -> dict:
    return {
        "grid_shape": data.grid_shape,
        "x_range": data.x_range,
        "y_range": data.y_range,
        "x_train": data.x_train,
        "y_train": data.y_train,
        "x_ood": data.x_ood,
    }


@task(name="plot", task_run_name="plot-{method}", cache_policy=CACHE_POLICY, persist_result=True)
def plot_method(method: str, evaluation: dict, data_path: str, code_version: str = CODE_VERSION) -> dict:
    """One method's PNGs -> {file name: path}. Surfaces and the distance curve need the 2-D grid, the
    uncertainty histogram (in-distribution vs OOD) an OOD set; the reliability diagram and the
    risk-coverage curve are always drawn."""
    from sngp_models import plots

    data = load_data(data_path)
    predictions_path = evaluation["predictions_path"]
    with np.load(predictions_path) as f:
        pred = {k: f[k] for k in f.files}
    folder = f"plots/{method}-{stable_key(method, predictions_path, code_version)}"
    name = plots.DISPLAY_NAMES.get(method, method)
    figures = {
        "reliability.png": plots.plot_reliability(data.y_test, pred["test_probs"], method),
        "risk_coverage.png": plots.plot_risk_coverage(
            {method: _risk_coverage_inputs(data, pred)}, _target_coverage(predictions_path)
        ),
    }
    if len(pred["ood_uncertainty"]):  # in-distribution vs OOD: only with an OOD set
        figures["uncertainty_histogram.png"] = plots.plot_uncertainty_histogram(
            pred["test_uncertainty"], pred["ood_uncertainty"], method
        )
    if "grid_probs" in pred:  # surfaces: 2-D data only (two moons, 2-feature tables), over its grid
        for kind, values, file_name in (
            ("probability", pred["grid_probs"][:, 0], "class_probability.png"),
            ("uncertainty", pred["grid_uncertainty"], "uncertainty.png"),
        ):
            figures[file_name] = plots.plot_surface(
                values, kind=kind, model_name=name, **_surface_kwargs(data)
            )
        figures["distance_curve.png"] = plots.plot_distance_curve(
            {method: (pred["grid_distance"], pred["grid_uncertainty"])}
        )
    return {file_name: _save(fig, artifact_path(folder, file_name)) for file_name, fig in figures.items()}


@task(name="plot-comparison", cache_policy=CACHE_POLICY, persist_result=True)
def plot_comparison(predictions: dict[str, str], data_path: str, code_version: str = CODE_VERSION) -> dict:
    """All methods' risk-coverage curves; with a 2-D grid also the methods side by side (one row each)
    and their distance curves -> {file name: path}."""
    from sngp_models import plots

    data = load_data(data_path)
    surfaces, curves, selective = {}, {}, {}
    for method, path in predictions.items():
        with np.load(path) as pred:
            selective[method] = _risk_coverage_inputs(data, pred)
            if data.x_grid is not None:
                surfaces[method] = (pred["grid_probs"][:, 0], pred["grid_uncertainty"])
                curves[method] = (pred["grid_distance"], pred["grid_uncertainty"])
    folder = f"plots/comparison-{stable_key(predictions, code_version)}"
    targets = {_target_coverage(path) for path in predictions.values()}
    figures = {
        "risk_coverage.png": _save(
            plots.plot_risk_coverage(selective, targets.pop() if len(targets) == 1 else None),
            artifact_path(folder, "risk_coverage.png"),
        )
    }
    if data.x_grid is None:
        return figures
    return {
        **figures,
        "comparison.png": _save(
            plots.plot_comparison(surfaces, **_surface_kwargs(data)), artifact_path(folder, "comparison.png")
        ),
        "distance_curve.png": _save(
            plots.plot_distance_curve(curves), artifact_path(folder, "distance_curve.png")
        ),
    }
