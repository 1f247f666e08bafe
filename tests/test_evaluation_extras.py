"""Evaluation beyond the study: distance awareness and reliability metrics, and their plots."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from sngp_models import metrics as M
from sngp_models import plots as P

# --------------------------------------------------------------------------- Spearman


def test_spearman_monotone_cases() -> None:
    d = np.array([0.1, 0.5, 1.0, 2.0, 5.0])
    assert M.distance_uncertainty_spearman(np.log1p(d), d) == pytest.approx(1.0)
    assert M.distance_uncertainty_spearman(np.exp(-d), d) == pytest.approx(-1.0)
    # Monotone but non-linear still gives exactly +-1 (ranks only).
    assert M.distance_uncertainty_spearman(d**3, d) == pytest.approx(1.0)


def test_spearman_constant_is_zero_not_nan() -> None:
    d = np.array([0.1, 0.5, 1.0, 2.0])
    for value in (0.0, 0.25):
        out = M.distance_uncertainty_spearman(np.full(4, value), d)
        assert out == 0.0 and isinstance(out, float)
    assert M.distance_uncertainty_spearman(np.array([0.1, 0.2, 0.3]), np.ones(3)) == 0.0
    assert M.distance_uncertainty_spearman(np.array([0.3]), np.array([1.0])) == 0.0


def test_spearman_ties_and_partial() -> None:
    u = np.array([0.1, 0.2, 0.2, 0.4])
    d = np.array([1.0, 3.0, 2.0, 4.0])
    # ranks u: 1, 2.5, 2.5, 4; d: 1, 3, 2, 4 -> Pearson of ranks = 4.5 / sqrt(4.5 * 5)
    assert M.distance_uncertainty_spearman(u, d) == pytest.approx(4.5 / np.sqrt(4.5 * 5.0))


@pytest.mark.parametrize(
    ("u", "d", "match"),
    [
        ([0.1, 0.2], [1.0], "distances must have the same length"),
        ([[0.1, 0.2]], [1.0, 2.0], "uncertainty must be 1-D"),
        ([0.1, np.nan], [1.0, 2.0], "uncertainty must be finite"),
        ([0.1, 0.2], [1.0, np.inf], "distances must be finite"),
        ([], [], "uncertainty must be non-empty"),
    ],
)
def test_spearman_bad_input(u, d, match) -> None:
    with pytest.raises(ValueError, match=match):
        M.distance_uncertainty_spearman(u, d)


# --------------------------------------------------------------------------- distance_to_nearest


@pytest.mark.parametrize("dim", [2, 64])
def test_distance_to_nearest_matches_brute_force(dim: int) -> None:
    rng = np.random.default_rng(dim)
    x_train = rng.normal(size=(300, dim))
    x_query = np.concatenate([rng.normal(size=(250, dim)), x_train[:5], rng.normal(5, 1, size=(7, dim))])
    brute = np.sqrt(((x_query[:, None, :] - x_train[None, :, :]) ** 2).sum(-1)).min(axis=1)
    # batch_size 37: several batches, the last one partial.
    out = M.distance_to_nearest(x_query, x_train, batch_size=37)
    assert out.shape == (x_query.shape[0],) and out.dtype == np.float64
    np.testing.assert_allclose(out, brute, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out[250:255], 0.0, atol=1e-12)  # training points themselves
    np.testing.assert_allclose(M.distance_to_nearest(x_query, x_train), out, rtol=1e-12)


def test_distance_to_nearest_hand_checked() -> None:
    x_train = np.array([[0.0, 0.0], [3.0, 0.0]])
    x_query = np.array([[0.0, 4.0], [2.0, 0.0], [3.0, 0.0]])
    np.testing.assert_allclose(M.distance_to_nearest(x_query, x_train), [4.0, 1.0, 0.0])


@pytest.mark.parametrize(
    ("q", "t", "kwargs", "match"),
    [
        (np.zeros((2, 3)), np.zeros((4, 2)), {}, "x_query must have the same number of features"),
        (np.zeros(3), np.zeros((4, 3)), {}, "x_query must be 2-D"),
        (np.zeros((2, 2)), np.zeros((0, 2)), {}, "x_train must have at least one row"),
        (np.array([[np.nan, 0.0]]), np.zeros((4, 2)), {}, "x_query must be finite"),
        (np.zeros((2, 2)), np.zeros((4, 2)), {"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_distance_to_nearest_bad_input(q, t, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        M.distance_to_nearest(q, t, **kwargs)


# --------------------------------------------------------------------------- reliability_curve


def test_reliability_curve_hand_checked() -> None:
    # Same rows as test_metrics.test_ece_two_non_empty_bins (n_bins=10, ECE 0.1).
    probs = np.array([[0.65, 0.35], [0.65, 0.35], [0.05, 0.95], [0.95, 0.05]])
    y = np.array([0, 1, 1, 0])
    curve = M.reliability_curve(y, probs, n_bins=10)
    conf, acc, count = curve  # plain tuple unpacking works
    assert isinstance(curve, M.ReliabilityCurve) and conf.shape == acc.shape == count.shape == (10,)
    np.testing.assert_array_equal(count, [0, 0, 0, 0, 0, 0, 2, 0, 0, 2])
    np.testing.assert_allclose(conf[[6, 9]], [0.65, 0.95])
    np.testing.assert_allclose(acc[[6, 9]], [0.5, 1.0])
    assert np.isnan(conf[count == 0]).all() and np.isnan(acc[count == 0]).all()


@pytest.mark.parametrize("n_bins", [1, 2, 10, 15, 40])
def test_reliability_curve_consistent_with_ece(n_bins: int) -> None:
    rng = np.random.default_rng(n_bins)
    logits = rng.normal(scale=2.0, size=(500, 4))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 4, size=500)
    conf, acc, count = M.reliability_curve(y, probs, n_bins=n_bins)
    assert count.sum() == 500
    filled = count > 0
    from_curve = float(np.sum(count[filled] / 500 * np.abs(acc[filled] - conf[filled])))
    assert from_curve == pytest.approx(M.ece(y, probs, n_bins=n_bins), abs=1e-12)
    # Bin b holds confidences in ((b-1)/M, b/M]: each bin's mean confidence lies inside it.
    edges = np.linspace(0, 1, n_bins + 1)
    assert np.all(conf[filled] > edges[:-1][filled] - 1e-12) and np.all(conf[filled] <= edges[1:][filled])


def test_reliability_curve_bad_input() -> None:
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        M.reliability_curve([0], [[0.5, 0.5]], n_bins=0)
    with pytest.raises(ValueError, match="probs rows must sum to 1"):
        M.reliability_curve([0], [[0.6, 0.6]])


# --------------------------------------------------------------------------- plots


@pytest.fixture()
def preds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    p0 = rng.uniform(0, 1, size=200)
    probs = np.stack([p0, 1 - p0], axis=1)
    y = (rng.uniform(size=200) > p0).astype(np.int64)
    return {"probs": probs, "y": y, "unc_in": rng.uniform(0, 0.1, 150), "unc_ood": rng.uniform(0.1, 0.25, 80)}


def _save(fig: Figure, tmp_path, name: str) -> None:
    path = tmp_path / name
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_reliability(preds, tmp_path) -> None:
    fig = P.plot_reliability(preds["y"], preds["probs"], "sngp", n_bins=10)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    curve = M.reliability_curve(preds["y"], preds["probs"], n_bins=10)
    assert len(ax.patches) == int((curve.count > 0).sum())  # one bar per non-empty bin
    heights = sorted(p.get_height() for p in ax.patches)
    np.testing.assert_allclose(heights, sorted(curve.accuracy[curve.count > 0]))
    assert len(ax.lines) == 1  # the diagonal
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [0.0, 1.0])
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [0.0, 1.0])
    ece = M.ece(preds["y"], preds["probs"], n_bins=10)
    assert ax.get_title() == f"Reliability, SNGP (ECE = {ece:.3f})"
    _save(fig, tmp_path, "reliability.png")


def test_plot_uncertainty_histogram(preds, tmp_path) -> None:
    fig = P.plot_uncertainty_histogram(preds["unc_in"], preds["unc_ood"], "Deterministic", n_bins=12)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert len(ax.containers) == 2 and len(ax.patches) == 24
    top = max(preds["unc_in"].max(), preds["unc_ood"].max())
    lefts = sorted({round(p.get_x(), 12) for p in ax.patches})
    assert lefts[0] == 0.0 and len(lefts) == 12  # shared bins over [0, max]
    assert ax.get_xlim() == pytest.approx((0.0, top))
    for container in ax.containers:  # each set normalised to fractions
        assert sum(bar.get_height() for bar in container) == pytest.approx(1.0)
    assert "Deterministic" in ax.get_title()
    _save(fig, tmp_path, "hist.png")
    # All-zero uncertainty (a fully confident model) still plots.
    P.plot_uncertainty_histogram(np.zeros(5), np.zeros(3), "deterministic")


def test_plot_distance_curve(tmp_path) -> None:
    rng = np.random.default_rng(0)
    d = rng.uniform(0, 5, size=400)
    curves = {
        "sngp": (d, 0.25 * (1 - np.exp(-d))),
        "deterministic": (d, np.full(400, 0.01)),
        "exact_gp": (d[:100], 0.2 * d[:100] / 5),
    }
    fig = P.plot_distance_curve(curves, n_bins=10)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert len(ax.lines) == 3
    labels = [line.get_label() for line in ax.lines]
    assert labels[0].startswith("SNGP") and labels[1].startswith("Deterministic")
    assert labels[2].startswith("Exact GP")
    assert "+1.00" in labels[0] and "+0.00" in labels[1]
    sngp_y = ax.lines[0].get_ydata()
    assert len(sngp_y) == 10 and np.all(np.diff(sngp_y) > 0)  # increasing with distance
    np.testing.assert_allclose(ax.lines[1].get_ydata(), 0.01)
    _save(fig, tmp_path, "distance_all.png")
    single = P.plot_distance_curve({"sngp": curves["sngp"]})
    assert len(single.axes[0].lines) == 1 and single.axes[0].get_title().endswith(", SNGP")
    _save(single, tmp_path, "distance_sngp.png")


@pytest.mark.parametrize(
    ("curves", "match"),
    [
        ({}, "curves must be a non-empty mapping"),
        ({"sngp": (np.ones(3),)}, "must be a pair"),
        ({"sngp": (np.ones(3), np.ones(2))}, "same length"),
        ({"sngp": (-np.ones(3), np.ones(3))}, "distances must be >= 0"),
        ({"sngp": (np.ones(3), np.array([0.1, np.nan, 0.2]))}, "uncertainty must be finite"),
    ],
)
def test_plot_distance_curve_bad_input(curves, match) -> None:
    with pytest.raises(ValueError, match=match):
        P.plot_distance_curve(curves)


def test_plots_bad_input(preds) -> None:
    with pytest.raises(ValueError, match="unc_ood must be a non-empty 1-D array"):
        P.plot_uncertainty_histogram(preds["unc_in"], np.array([]), "x")
    with pytest.raises(ValueError, match="n_bins"):
        P.plot_reliability(preds["y"], preds["probs"], "x", n_bins=0)
