"""Decision-surface plots reproducing the figure of the TensorFlow SNGP tutorial, plus evaluation plots
that also work for inputs without a 2-D grid (reliability diagram, uncertainty histograms, uncertainty
against distance to the training data).

Only :class:`matplotlib.figure.Figure` objects are created (no ``pyplot`` global state), so the
functions are thread-safe and work headless. Save a figure with ``fig.savefig(path)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NotRequired, TypedDict, Unpack

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from . import abstention, metrics

__all__ = [
    "DISPLAY_NAMES",
    "Scene",
    "TRAIN_COLORS",
    "plot_comparison",
    "plot_distance_curve",
    "plot_method",
    "plot_reliability",
    "plot_risk_coverage",
    "plot_uncertainty_histogram",
]

TRAIN_COLORS = ("#377eb8", "#ff7f00")
DISPLAY_NAMES = {
    "deterministic": "Deterministic",
    "sngp": "SNGP",
    "mc_dropout": "MC Dropout",
    "deep_ensemble": "Deep Ensemble",
    "exact_gp": "Exact GP",
}

_TRAIN_CMAP = ListedColormap(list(TRAIN_COLORS))
_PANEL_WIDTH = 14.0
_ROW_HEIGHT = 5.0
_SMALL_FIGSIZE = (6.0, 5.0)
_IN_COLOR, _OOD_COLOR = TRAIN_COLORS[0], "red"


# --------------------------------------------------------------------------- validation


def _check_grid_shape(grid_shape: Sequence[int]) -> tuple[int, int]:
    try:
        ny, nx = (int(v) for v in grid_shape)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"grid_shape must be a pair of positive ints (ny, nx); got {grid_shape!r}") from exc
    if ny < 1 or nx < 1:
        raise ValueError(f"grid_shape must be a pair of positive ints (ny, nx); got {grid_shape!r}")
    return ny, nx


def _check_range(values: Sequence[float], name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a pair (low, high) of floats; got {values!r}") from exc
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must be finite with low < high; got {values!r}")
    return lo, hi


def _check_grid_values(values: np.ndarray, grid_shape: tuple[int, int], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    expected = grid_shape[0] * grid_shape[1]
    if arr.size != expected:
        raise ValueError(
            f"{name} must have grid_shape[0]*grid_shape[1] = {expected} elements; got {arr.size} "
            f"(shape {arr.shape})"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return arr.reshape(grid_shape)


def _check_points(points: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2); got {arr.shape}")
    return arr


def _check_training(x_train: np.ndarray, y_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = _check_points(x_train, "x_train")
    y = np.asarray(y_train)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y_train must be 1-D with length {x.shape[0]} (len(x_train)); got shape {y.shape}")
    return x, y


# --------------------------------------------------------------------------- drawing


def _draw_surface(
    ax: Axes,
    values: np.ndarray,
    *,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_ood: np.ndarray | None,
    normalize: bool = False,
) -> AxesImage:
    """Draw one surface panel (image + training data + OOD points) on ``ax``.

    ``values`` is already shaped ``(ny, nx)``. With ``normalize=True`` the values are divided by
    their maximum (left unchanged if the maximum is 0) so the colour scale spans [0, 1].
    """
    if normalize:
        vmax = float(np.max(values))
        if vmax > 0:
            values = values / vmax
    ax.set_xlim(x_range)
    ax.set_ylim(y_range)
    image = ax.imshow(
        values,
        origin="lower",
        extent=(*x_range, *y_range),
        vmin=0.0,
        vmax=1.0,
        interpolation="bicubic",
        aspect="auto",
    )
    ax.scatter(x_train[:, 0], x_train[:, 1], c=y_train, cmap=_TRAIN_CMAP, vmin=0, vmax=1, alpha=0.5)
    if x_ood is not None and x_ood.shape[0] > 0:
        ax.scatter(x_ood[:, 0], x_ood[:, 1], c="red", alpha=0.1)
    return image


def _draw_row(
    fig: Figure,
    axes: Sequence[Axes],
    probs: np.ndarray,
    uncertainty: np.ndarray,
    *,
    model_name: str,
    **kwargs: object,
) -> None:
    """Draw the (probability, normalised uncertainty) pair of panels with colorbars and titles."""
    im_prob = _draw_surface(axes[0], probs, normalize=False, **kwargs)
    im_unc = _draw_surface(axes[1], uncertainty, normalize=True, **kwargs)
    fig.colorbar(im_prob, ax=axes[0])
    fig.colorbar(im_unc, ax=axes[1])
    axes[0].set_title(f"Class Probability, {model_name}")
    axes[1].set_title(f"(Normalized) Predictive Uncertainty, {model_name}")


class Scene(TypedDict):
    """What every decision-surface figure is drawn over, passed as keyword arguments.

    grid_shape: ``(ny, nx)``. x_range, y_range: ``(low, high)`` extent of the grid; also the axis limits.
    x_train, y_train: training inputs ``(N, 2)`` and class labels ``(N,)``. x_ood: optional OOD inputs
    ``(M, 2)``, drawn in translucent red.
    """

    grid_shape: Sequence[int]
    x_range: Sequence[float]
    y_range: Sequence[float]
    x_train: np.ndarray
    y_train: np.ndarray
    x_ood: NotRequired[np.ndarray | None]


def _checked_scene(
    grid_shape: Sequence[int],
    x_range: Sequence[float],
    y_range: Sequence[float],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_ood: np.ndarray | None = None,
) -> tuple[tuple[int, int], dict[str, object]]:
    """A Scene validated -> (grid shape, the keyword arguments of _draw_surface)."""
    shape = _check_grid_shape(grid_shape)
    x, y = _check_training(x_train, y_train)
    kwargs: dict[str, object] = {
        "x_range": _check_range(x_range, "x_range"),
        "y_range": _check_range(y_range, "y_range"),
        "x_train": x,
        "y_train": y,
        "x_ood": None if x_ood is None else _check_points(x_ood, "x_ood"),
    }
    return shape, kwargs


def plot_method(
    grid_probs: np.ndarray, grid_uncertainty: np.ndarray, *, model_name: str, **scene: Unpack[Scene]
) -> Figure:
    """Tutorial figure for one method: class-0 probability (left) and normalised uncertainty (right).

    Args:
        grid_probs: class-0 probability on the grid, ``grid_shape[0] * grid_shape[1]`` values
            (row-major, y varies slowest), reshaped to ``grid_shape = (ny, nx)``.
        grid_uncertainty: uncertainty on the same grid; divided by its maximum for display.
        model_name: shown in the panel titles.
        **scene: the grid and the data drawn over it (:class:`Scene`).

    Returns:
        A 14x5 inch :class:`~matplotlib.figure.Figure` with two image panels and their colorbars.
    """
    shape, kwargs = _checked_scene(**scene)
    probs = _check_grid_values(grid_probs, shape, "grid_probs")
    unc = _check_grid_values(grid_uncertainty, shape, "grid_uncertainty")
    fig = Figure(figsize=(_PANEL_WIDTH, _ROW_HEIGHT))
    axes = fig.subplots(1, 2)
    _draw_row(fig, axes, probs, unc, model_name=model_name, **kwargs)
    return fig


def plot_comparison(surfaces: Mapping[str, tuple[np.ndarray, np.ndarray]], **scene: Unpack[Scene]) -> Figure:
    """All methods in one image: one row of (probability, normalised uncertainty) panels per method.

    Args:
        surfaces: ``{method_key: (grid_probs, grid_uncertainty)}``; rows follow the dict order and
            titles use :data:`DISPLAY_NAMES` (falling back to the key).
        **scene: the grid and the data drawn over it (:class:`Scene`).

    Returns:
        A figure of width 14 and height ``5 * len(surfaces)`` inches with ``2 * len(surfaces)``
        image panels.
    """
    if not isinstance(surfaces, Mapping) or len(surfaces) == 0:
        raise ValueError("surfaces must be a non-empty mapping {method: (grid_probs, grid_uncertainty)}")
    shape, kwargs = _checked_scene(**scene)
    rows = []
    for key, pair in surfaces.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"surfaces[{key!r}] must be a pair (grid_probs, grid_uncertainty)")
        probs = _check_grid_values(pair[0], shape, f"surfaces[{key!r}] grid_probs")
        unc = _check_grid_values(pair[1], shape, f"surfaces[{key!r}] grid_uncertainty")
        rows.append((DISPLAY_NAMES.get(key, str(key)), probs, unc))
    fig = Figure(figsize=(_PANEL_WIDTH, _ROW_HEIGHT * len(rows)))
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for row_axes, (name, probs, unc) in zip(axes, rows, strict=True):
        _draw_row(fig, row_axes, probs, unc, model_name=name, **kwargs)
    return fig


def plot_surface(values: np.ndarray, *, kind: str, model_name: str, **scene: Unpack[Scene]) -> Figure:
    """One panel of the tutorial figure on its own (7x5.5, as the notebook's single plots).

    ``kind="probability"`` draws the class-0 probability; ``kind="uncertainty"`` the uncertainty
    normalised by its maximum. Used for the per-method ``class_probability.png`` / ``uncertainty.png``.
    """
    titles = {"probability": "Class Probability", "uncertainty": "(Normalized) Predictive Uncertainty"}
    if kind not in titles:
        raise ValueError(f"kind must be one of {sorted(titles)}, got {kind!r}")
    shape, kwargs = _checked_scene(**scene)
    grid = _check_grid_values(values, shape, "values")
    fig = Figure(figsize=(7.0, 5.5))
    ax = fig.subplots()
    image = _draw_surface(ax, grid, normalize=kind == "uncertainty", **kwargs)
    fig.colorbar(image, ax=ax)
    ax.set_title(f"{titles[kind]}, {model_name}")
    return fig


# --------------------------------------------------------------------------- evaluation plots


def _display_name(name: object) -> str:
    return DISPLAY_NAMES.get(str(name), str(name))


def _check_bins(n_bins: int) -> int:
    if isinstance(n_bins, (bool, np.bool_)) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    return int(n_bins)


def _check_values(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return arr


def plot_reliability(y_true: np.ndarray, probs: np.ndarray, model_name: str, n_bins: int = 15) -> Figure:
    """Reliability diagram: per confidence bin, the accuracy as a bar, against the diagonal.

    The bins and the ECE in the title are those of :func:`sngp_models.metrics.reliability_curve` and
    :func:`sngp_models.metrics.ece`. One bar per non-empty bin (height = accuracy, spanning the bin),
    and the line ``accuracy = confidence`` (perfect calibration).

    Args:
        y_true: integer labels ``(N,)``.
        probs: class probabilities ``(N, C)``.
        model_name: method key or display name (keys are mapped through :data:`DISPLAY_NAMES`).
        n_bins: number of equal-width confidence bins over [0, 1].

    Returns:
        A 6x5 inch figure with one axes: ``n_nonempty_bins`` bars and one line (the diagonal).
    """
    n_bins = _check_bins(n_bins)
    curve = metrics.reliability_curve(y_true, probs, n_bins)
    ece = metrics.ece(y_true, probs, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    filled = curve.count > 0
    fig = Figure(figsize=_SMALL_FIGSIZE)
    ax = fig.subplots()
    ax.bar(
        edges[:-1][filled],
        curve.accuracy[filled],
        width=1.0 / n_bins,
        align="edge",
        color=_IN_COLOR,
        edgecolor="black",
        alpha=0.8,
        label="Accuracy",
    )
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="Perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("Confidence (max probability)")
    ax.set_ylabel("Accuracy")
    ax.set_title(f"Reliability, {_display_name(model_name)} (ECE = {ece:.3f})")
    ax.legend(loc="upper left")
    return fig


def plot_uncertainty_histogram(
    unc_in: np.ndarray, unc_ood: np.ndarray, model_name: str, n_bins: int = 30
) -> Figure:
    """Histograms of the uncertainty on in-distribution vs OOD examples, on shared bins over [0, max].

    Each histogram is normalised to fractions of its own set (the sets may differ in size), so the
    bars of one set sum to 1. Negative values (float round-off of a zero uncertainty) count in the
    first bin.

    Args:
        unc_in: uncertainty scores of in-distribution examples ``(N,)``.
        unc_ood: uncertainty scores of OOD examples ``(M,)``.
        model_name: method key or display name.
        n_bins: number of equal-width bins over ``[0, max(unc_in, unc_ood)]``.

    Returns:
        A 6x5 inch figure with one axes holding two bar containers (in-distribution, OOD).
    """
    n_bins = _check_bins(n_bins)
    u_in = np.maximum(_check_values(unc_in, "unc_in"), 0.0)
    u_ood = np.maximum(_check_values(unc_ood, "unc_ood"), 0.0)
    top = float(max(u_in.max(), u_ood.max()))
    edges = np.linspace(0.0, top if top > 0 else 1.0, n_bins + 1)
    fig = Figure(figsize=_SMALL_FIGSIZE)
    ax = fig.subplots()
    for values, color, label in ((u_in, _IN_COLOR, "In-distribution"), (u_ood, _OOD_COLOR, "OOD")):
        ax.hist(
            values,
            bins=edges,
            weights=np.full(values.size, 1.0 / values.size),
            color=color,
            alpha=0.5,
            label=f"{label} (n={values.size})",
        )
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("Uncertainty (1 - sum p^2) / 2")
    ax.set_ylabel("Fraction of examples")
    ax.set_title(f"Uncertainty, {_display_name(model_name)}: in-distribution vs OOD")
    ax.legend()
    return fig


def plot_distance_curve(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], n_bins: int = 20) -> Figure:
    """Mean uncertainty against the distance to the nearest training point, one line per method.

    Distances are binned into ``n_bins`` equal-width bins over ``[0, max distance]`` shared by all
    methods; each line joins the (mean distance, mean uncertainty) of its non-empty bins. The legend
    shows each method's Spearman correlation (:func:`sngp_models.metrics.distance_uncertainty_spearman`).

    Args:
        curves: ``{method_key: (distances, uncertainty)}``, two 1-D arrays of equal length per method
            (e.g. distances from :func:`sngp_models.metrics.distance_to_nearest`); lines follow the
            dict order, labels use :data:`DISPLAY_NAMES`. One entry for a method's own plot, all for
            the comparison.
        n_bins: number of distance bins.

    Returns:
        A 6x5 inch figure with one axes and ``len(curves)`` lines.
    """
    n_bins = _check_bins(n_bins)
    if not isinstance(curves, Mapping) or len(curves) == 0:
        raise ValueError("curves must be a non-empty mapping {method: (distances, uncertainty)}")
    checked = []
    for key, pair in curves.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"curves[{key!r}] must be a pair (distances, uncertainty)")
        dist = _check_values(pair[0], f"curves[{key!r}] distances")
        unc = _check_values(pair[1], f"curves[{key!r}] uncertainty")
        if dist.size != unc.size:
            raise ValueError(
                f"curves[{key!r}]: distances and uncertainty must have the same length; "
                f"got {dist.size} and {unc.size}"
            )
        if np.any(dist < 0):
            raise ValueError(f"curves[{key!r}] distances must be >= 0")
        checked.append((key, dist, unc))
    top = max(float(dist.max()) for _, dist, _ in checked)
    edges = np.linspace(0.0, top if top > 0 else 1.0, n_bins + 1)
    fig = Figure(figsize=_SMALL_FIGSIZE)
    ax = fig.subplots()
    for key, dist, unc in checked:
        idx = np.clip(np.searchsorted(edges[1:-1], dist, side="left"), 0, n_bins - 1)
        count = np.bincount(idx, minlength=n_bins)
        filled = count > 0
        mean_dist = np.bincount(idx, weights=dist, minlength=n_bins)[filled] / count[filled]
        mean_unc = np.bincount(idx, weights=unc, minlength=n_bins)[filled] / count[filled]
        rho = metrics.distance_uncertainty_spearman(unc, dist)
        ax.plot(mean_dist, mean_unc, marker="o", label=f"{_display_name(key)} (Spearman {rho:+.2f})")
    ax.set_xlim(left=0.0)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("Distance to nearest training point")
    ax.set_ylabel("Mean uncertainty (1 - sum p^2) / 2")
    title = "Uncertainty vs. distance to training data"
    if len(checked) == 1:
        title += f", {_display_name(checked[0][0])}"
    ax.set_title(title)
    ax.legend()
    return fig


def plot_risk_coverage(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], target_coverage: float | None = None
) -> Figure:
    """Risk-coverage curves (selective prediction), one line per method: abstaining on the most
    uncertain examples first, the error rate of what is kept against the fraction kept.

    The curves and the AURC in the legend are :func:`sngp_models.abstention.risk_coverage` and
    :func:`sngp_models.abstention.aurc` (ties in uncertainty take the expected risk); the dotted line
    below each curve is the lowest any score can reach at that error rate (errors abstained first).

    Args:
        curves: ``{method_key: (correct, uncertainty)}``: per method, whether each test prediction is
            right (bool ``(N,)``) and its uncertainty ``(N,)``; lines follow the dict order, labels use
            :data:`DISPLAY_NAMES`. One entry for a method's own plot, all for the parent run's.
        target_coverage: drawn as a vertical line (the coverage the abstention threshold accepts).

    Returns:
        A 6x5 inch figure with one axes: two lines per method (curve, optimum), plus the target line.
    """
    if not isinstance(curves, Mapping) or len(curves) == 0:
        raise ValueError("curves must be a non-empty mapping {method: (correct, uncertainty)}")
    fig = Figure(figsize=_SMALL_FIGSIZE)
    ax = fig.subplots()
    top = 0.0
    for key, pair in curves.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"curves[{key!r}] must be a pair (correct, uncertainty)")
        correct, uncertainty = pair
        coverage, risk = abstention.risk_coverage(correct, uncertainty)
        area = float(np.mean(risk))
        (line,) = ax.plot(coverage, risk, label=f"{_display_name(key)} (AURC {area:.4f})")
        wrong = risk[-1] * coverage.size  # errors among all N
        best = np.maximum(coverage * coverage.size - (coverage.size - wrong), 0) / (coverage * coverage.size)
        ax.plot(coverage, best, linestyle=":", color=line.get_color(), alpha=0.7)
        top = max(top, float(risk.max()))
    if target_coverage is not None:
        ax.axvline(float(target_coverage), color="gray", linestyle="--", label=f"target {target_coverage:g}")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, max(top * 1.05, 0.01))
    ax.set_xlabel("Coverage (fraction answered, most certain first)")
    ax.set_ylabel("Risk (error rate of the answered)")
    title = "Risk-coverage"
    if len(curves) == 1:
        title += f", {_display_name(next(iter(curves)))}"
    ax.set_title(title + " (dotted: best possible)")
    ax.legend()
    return fig
