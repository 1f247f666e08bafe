"""Tests for sngp_models.data: the shifted two moons, the evaluation grid, the OOD cluster, make_dataset."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.datasets

from sngp_models import data as D


def _sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


# --------------------------------------------------------------------------- two moons


def test_two_moons_shapes_dtypes_and_balanced_labels() -> None:
    x, y = D.make_two_moons(n_per_class=37, seed=3)
    assert x.shape == (74, 2) and x.dtype == np.float32
    assert y.shape == (74,) and y.dtype == np.int64
    assert set(np.unique(y).tolist()) == {0, 1}
    assert np.bincount(y).tolist() == [37, 37]
    assert np.isfinite(x).all()


def test_two_moons_without_noise_is_sklearn_moons_shifted_per_class() -> None:
    # With noise=0 make_moons' points are fixed (only their order depends on the random state), so
    # each class must be exactly sklearn's moon plus the tutorial's shift.
    n = 50
    x, y = D.make_two_moons(n_per_class=n, noise=0.0, seed=0)
    x_ref, y_ref = sklearn.datasets.make_moons(n_samples=2 * n, noise=0.0, shuffle=False)
    shifts = {0: np.array([-0.1, 0.2]), 1: np.array([0.1, -0.2])}
    for label, shift in shifts.items():
        got = _sorted_rows(x[y == label].astype(np.float64))
        want = _sorted_rows(x_ref[y_ref == label] + shift)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_two_moons_class_means_are_shifted_with_noise() -> None:
    n = 5000
    x, y = D.make_two_moons(n_per_class=n, noise=0.1, seed=1)
    x_ref, y_ref = sklearn.datasets.make_moons(n_samples=2 * n, noise=0.0, shuffle=False)
    for label, shift in enumerate([(-0.1, 0.2), (0.1, -0.2)]):
        unshifted_mean = x_ref[y_ref == label].mean(axis=0)
        # Standard error of a mean of 5000 points with noise 0.1 is ~0.0014; the shift is 0.1-0.2.
        np.testing.assert_allclose(x[y == label].mean(axis=0) - unshifted_mean, shift, atol=0.01)


def test_two_moons_seed_reproduces_exactly_and_different_seeds_differ() -> None:
    x1, y1 = D.make_two_moons(n_per_class=100, seed=7)
    x2, y2 = D.make_two_moons(n_per_class=100, seed=7)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, _ = D.make_two_moons(n_per_class=100, seed=8)
    assert not np.allclose(_sorted_rows(x1), _sorted_rows(x3))


# --------------------------------------------------------------------------- grid


def test_grid_shape_ranges_and_ordering() -> None:
    grid = D.make_grid()
    assert grid.shape == (10000, 2) and grid.dtype == np.float32
    xs = np.linspace(-3.5, 3.5, 100)
    ys = np.linspace(-2.5, 2.5, 100)
    # End points included.
    assert grid[:, 0].min() == pytest.approx(-3.5) and grid[:, 0].max() == pytest.approx(3.5)
    assert grid[:, 1].min() == pytest.approx(-2.5) and grid[:, 1].max() == pytest.approx(2.5)
    # Flattened row by row with y outer, so reshape(100, 100) gives image[row=y, col=x] (imshow origin lower).
    image = grid.reshape(100, 100, 2)
    np.testing.assert_allclose(image[:, :, 0], np.broadcast_to(xs[None, :], (100, 100)), atol=1e-6)
    np.testing.assert_allclose(image[:, :, 1], np.broadcast_to(ys[:, None], (100, 100)), atol=1e-6)
    np.testing.assert_allclose(grid[:3], [[-3.5, -2.5], [xs[1], -2.5], [xs[2], -2.5]], atol=1e-6)
    np.testing.assert_allclose(grid[100], [-3.5, ys[1]], atol=1e-6)


def test_grid_custom_size_and_ranges() -> None:
    grid = D.make_grid(x_range=(0.0, 1.0), y_range=(10.0, 12.0), n_grid=5)
    assert grid.shape == (25, 2)
    np.testing.assert_allclose(np.unique(grid[:, 0]), np.linspace(0, 1, 5), atol=1e-6)
    np.testing.assert_allclose(np.unique(grid[:, 1]), np.linspace(10, 12, 5), atol=1e-6)


# --------------------------------------------------------------------------- OOD cluster


def test_ood_default_shape_and_moments() -> None:
    ood = D.make_ood(seed=0)
    assert ood.shape == (500, 2) and ood.dtype == np.float32
    # Standard error of the mean is 0.1 / sqrt(500) ~ 0.0045.
    np.testing.assert_allclose(ood.mean(axis=0), [2.5, -1.75], atol=0.02)
    np.testing.assert_allclose(ood.var(axis=0), [0.01, 0.01], rtol=0.25)


def test_ood_moments_tight_with_many_samples() -> None:
    ood = D.make_ood(n=40000, seed=5)
    np.testing.assert_allclose(ood.mean(axis=0), [2.5, -1.75], atol=0.003)
    np.testing.assert_allclose(ood.var(axis=0), [0.01, 0.01], rtol=0.04)
    # Independent coordinates (diagonal covariance).
    assert abs(np.corrcoef(ood.T)[0, 1]) < 0.03


def test_ood_seed_reproduces_and_differs() -> None:
    np.testing.assert_array_equal(D.make_ood(seed=2), D.make_ood(seed=2))
    assert not np.allclose(D.make_ood(seed=2), D.make_ood(seed=3))


# --------------------------------------------------------------------------- make_dataset


def test_make_dataset_shapes() -> None:
    d = D.make_dataset(seed=0)
    assert d.x_train.shape == (1000, 2) and d.y_train.shape == (1000,)
    assert d.x_test.shape == (500, 2) and d.y_test.shape == (500,)
    assert d.x_grid.shape == (10000, 2)
    assert d.x_ood.shape == (500, 2)
    assert d.grid_shape == (100, 100)
    assert d.x_range == (-3.5, 3.5) and d.y_range == (-2.5, 2.5)
    assert np.bincount(d.y_train).tolist() == [500, 500]
    assert np.bincount(d.y_test).tolist() == [250, 250]


def test_make_dataset_test_sample_is_independent_of_train() -> None:
    d = D.make_dataset(seed=0, n_per_class=250, n_test_per_class=250)
    # Same sizes, yet not the same sample (nor a reordering of it): no test point appears in train.
    train_rows = {tuple(r) for r in d.x_train.tolist()}
    assert not any(tuple(r) in train_rows for r in d.x_test.tolist())
    # Labels are drawn afresh too (not the train labels re-used).
    assert not np.array_equal(d.y_train, d.y_test)


def test_make_dataset_reproducible_per_seed() -> None:
    a, b, c = D.make_dataset(seed=4), D.make_dataset(seed=4), D.make_dataset(seed=5)
    for name in ("x_train", "y_train", "x_test", "y_test", "x_grid", "x_ood"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in ("x_train", "x_test", "x_ood"):
        assert not np.array_equal(getattr(a, name), getattr(c, name)), name
    np.testing.assert_array_equal(a.x_grid, c.x_grid)  # the grid does not depend on the seed


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: D.make_two_moons(seed=-1), "seed"),
        (lambda: D.make_two_moons(seed=1.5), "seed"),
        (lambda: D.make_two_moons(n_per_class=0), "n_per_class"),
        (lambda: D.make_two_moons(n_per_class=-3), "n_per_class"),
        (lambda: D.make_two_moons(noise=-0.1), "noise"),
        (lambda: D.make_two_moons(noise=float("nan")), "noise"),
        (lambda: D.make_grid(x_range=(3.5, -3.5)), "x_range"),
        (lambda: D.make_grid(y_range=(1.0, 1.0)), "y_range"),
        (lambda: D.make_grid(y_range=(0.0, float("inf"))), "y_range"),
        (lambda: D.make_grid(n_grid=0), "n_grid"),
        (lambda: D.make_ood(n=0), "n"),
        (lambda: D.make_ood(seed=-1), "seed"),
        (lambda: D.make_ood(var=(0.01, 0.0)), "var"),
        (lambda: D.make_dataset(seed=-1), "seed"),
        (lambda: D.make_dataset(n_per_class=0), "n_per_class"),
        (lambda: D.make_dataset(x_range=(1.0, -1.0)), "x_range"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(call, name) -> None:
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call()
