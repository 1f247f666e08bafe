"""The study's figures as PNG files: per-method surfaces and the all-methods comparison (cached)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task

from .cache import CACHE_POLICY, CODE_VERSION, artifact_path, stable_key, write_atomic
from .data import load_data


def _save(fig, path: Path) -> str:
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    return str(path)


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
    """`class_probability.png` and `uncertainty.png` for one method -> {file name: path}."""
    from sngp_models.plots import DISPLAY_NAMES, plot_surface

    data = load_data(data_path)
    predictions_path = evaluation["predictions_path"]
    with np.load(predictions_path) as pred:
        probs, unc = pred["grid_probs"][:, 0], pred["grid_uncertainty"]
    folder = stable_key(method, predictions_path, code_version)
    out = {}
    for kind, values, name in (
        ("probability", probs, "class_probability.png"),
        ("uncertainty", unc, "uncertainty.png"),
    ):
        fig = plot_surface(
            values, kind=kind, model_name=DISPLAY_NAMES.get(method, method), **_surface_kwargs(data)
        )
        out[name] = _save(fig, artifact_path(f"plots/{method}-{folder}", name))
    return out


@task(name="plot-comparison", cache_policy=CACHE_POLICY, persist_result=True)
def plot_comparison(predictions: dict[str, str], data_path: str, code_version: str = CODE_VERSION) -> str:
    """All methods side by side (one row each) -> comparison.png path."""
    from sngp_models.plots import plot_comparison as comparison_figure

    data = load_data(data_path)
    surfaces = {}
    for method, path in predictions.items():
        with np.load(path) as pred:
            surfaces[method] = (pred["grid_probs"][:, 0], pred["grid_uncertainty"])
    fig = comparison_figure(surfaces, **_surface_kwargs(data))
    key = stable_key(predictions, code_version)
    return _save(fig, artifact_path(f"plots/comparison-{key}", "comparison.png"))
