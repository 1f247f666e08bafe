"""The study's data: shifted two moons, the 100x100 evaluation grid, the OOD cluster, a fresh test sample.

Every generator takes an explicit seed (the tutorial sets none) and returns float32 features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

X_RANGE = (-3.5, 3.5)
Y_RANGE = (-2.5, 2.5)
GRID_SIZE = 100
OOD_MEAN = (2.5, -1.75)
OOD_VAR = (0.01, 0.01)
# The tutorial shifts each moon so the classes overlap less near the tips.
CLASS_SHIFTS = ((-0.1, 0.2), (0.1, -0.2))


def _rng(seed: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(int(seed))


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    return int(value)


def make_two_moons(
    n_per_class: int = 500, noise: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Two moons with `2 * n_per_class` points, class 0 shifted by (-0.1, +0.2), class 1 by (+0.1, -0.2).

    Used for the training set and, with another seed, for the fresh in-distribution test sample.
    """
    n_per_class = _positive_int("n_per_class", n_per_class)
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise: must be a finite number >= 0, got {noise!r}")
    random_state = int(_rng(seed).integers(2**31 - 1))
    import sklearn.datasets  # here, not at module level: a cached run never needs scikit-learn

    x, y = sklearn.datasets.make_moons(n_samples=2 * n_per_class, noise=noise, random_state=random_state)
    for label, shift in enumerate(CLASS_SHIFTS):
        x[y == label] += shift
    return x.astype(np.float32), y.astype(np.int64)


def make_grid(
    x_range: tuple[float, float] = X_RANGE, y_range: tuple[float, float] = Y_RANGE, n_grid: int = GRID_SIZE
) -> np.ndarray:
    """An n_grid x n_grid mesh over the ranges, flattened row by row (y outer) to (n_grid**2, 2)."""
    n_grid = _positive_int("n_grid", n_grid)
    for name, rng in (("x_range", x_range), ("y_range", y_range)):
        if len(rng) != 2 or not all(np.isfinite(rng)) or rng[0] >= rng[1]:
            raise ValueError(f"{name}: must be (low, high) with low < high, got {rng!r}")
    xs = np.linspace(x_range[0], x_range[1], n_grid)
    ys = np.linspace(y_range[0], y_range[1], n_grid)
    xv, yv = np.meshgrid(xs, ys)
    return np.stack([xv.ravel(), yv.ravel()], axis=-1).astype(np.float32)


def make_ood(
    n: int = 500, mean: tuple[float, float] = OOD_MEAN, var: tuple[float, float] = OOD_VAR, seed: int = 0
) -> np.ndarray:
    """The out-of-distribution cluster: `n` draws from N(mean, diag(var)), a class never trained on."""
    n = _positive_int("n", n)
    if len(mean) != len(var) or any(v <= 0 for v in var):
        raise ValueError(f"var: must be positive and match mean's length, got mean={mean!r}, var={var!r}")
    return _rng(seed).multivariate_normal(mean, np.diag(var), size=n).astype(np.float32)


@dataclass(frozen=True)
class TwoMoonsData:
    """Everything one pipeline run evaluates on, generated from one seed."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_grid: np.ndarray
    x_ood: np.ndarray
    grid_shape: tuple[int, int]
    x_range: tuple[float, float]
    y_range: tuple[float, float]


def make_dataset(
    seed: int = 0,
    n_per_class: int = 500,
    noise: float = 0.1,
    n_test_per_class: int = 250,
    n_grid: int = GRID_SIZE,
    x_range: tuple[float, float] = X_RANGE,
    y_range: tuple[float, float] = Y_RANGE,
    n_ood: int = 500,
    ood_mean: tuple[float, float] = OOD_MEAN,
    ood_var: tuple[float, float] = OOD_VAR,
) -> TwoMoonsData:
    """Train set, fresh test sample, grid and OOD cluster; independent streams derived from one seed."""
    train_seed, test_seed, ood_seed = (
        int(s.generate_state(1)[0] % (2**31 - 1)) for s in np.random.SeedSequence(check_seed(seed)).spawn(3)
    )
    x_train, y_train = make_two_moons(n_per_class, noise, train_seed)
    x_test, y_test = make_two_moons(n_test_per_class, noise, test_seed)
    return TwoMoonsData(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        x_grid=make_grid(x_range, y_range, n_grid),
        x_ood=make_ood(n_ood, ood_mean, ood_var, ood_seed),
        grid_shape=(int(n_grid), int(n_grid)),
        x_range=tuple(x_range),
        y_range=tuple(y_range),
    )


def check_seed(seed: int) -> int:
    """`seed` as an int once it is a valid seed (ValueError naming it otherwise)."""
    _rng(seed)
    return int(seed)
