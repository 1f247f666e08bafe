"""A real dataset beyond the study: scikit-learn's bundled 8x8 digits with held-out classes as OOD.

The known classes are split (stratified, seeded) into train and test; every example of the other classes is
the out-of-distribution set. Features are the RAW 64 pixel intensities (0..16, float32): the scaling lives
in the model (`ModelConfig.standardize=True` fits the train set's mean and std in `fit`, a pixel constant in
the train set is only centred, and saves them with the model). No download: `sklearn.datasets.load_digits`
ships with scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .data import check_seed

NUM_DIGITS = 10
DEFAULT_KNOWN_CLASSES = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class DigitsData:
    """Digits split into known-class train/test and a held-out-class OOD set.

    The first nine fields mirror `data.TwoMoonsData`; the grid fields are None (64-D inputs have no grid).
    Labels are remapped: label i means digit `known_classes[i]`.
    """

    x_train: np.ndarray  # (N_train, 64) float32, raw pixel intensities 0..16
    y_train: np.ndarray  # (N_train,) int64 in [0, num_classes)
    x_test: np.ndarray
    y_test: np.ndarray
    x_grid: None
    x_ood: np.ndarray  # (N_ood, 64) float32, every example of the held-out classes, raw
    grid_shape: None
    x_range: None
    y_range: None
    num_classes: int
    known_classes: tuple[int, ...]
    ood_classes: tuple[int, ...]
    y_ood_digit: np.ndarray  # (N_ood,) int64: the original digit of each OOD example


def check_known_classes(known_classes: Sequence[int]) -> tuple[int, ...]:
    """Distinct digits in 0..9, at least 2 and not all 10; returned as a tuple in the given order."""
    allowed = f"a sequence of at least 2 and at most {NUM_DIGITS - 1} distinct digits in 0..{NUM_DIGITS - 1}"
    try:
        values = list(known_classes)
    except TypeError:
        raise ValueError(f"known_classes: must be {allowed}, got {known_classes!r}") from None
    if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in values):
        raise ValueError(f"known_classes: must be {allowed}, got non-integer values in {known_classes!r}")
    values = [int(v) for v in values]
    if any(v < 0 or v >= NUM_DIGITS for v in values):
        raise ValueError(f"known_classes: must be {allowed}, got values outside 0..9 in {known_classes!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"known_classes: must be {allowed}, got duplicates in {known_classes!r}")
    if len(values) < 2:
        raise ValueError(f"known_classes: must be {allowed}, got {len(values)} class(es)")
    if len(values) == NUM_DIGITS:
        raise ValueError(f"known_classes: must be {allowed}; with all 10 digits known no OOD set is left")
    return tuple(values)


def make_digits_dataset(
    seed: int = 0, known_classes: Sequence[int] = DEFAULT_KNOWN_CLASSES, test_fraction: float = 0.3
) -> DigitsData:
    """Digits of `known_classes` split into train/test (stratified by `seed`); the other digits are OOD."""
    seed = check_seed(seed)
    known = check_known_classes(known_classes)
    is_number = isinstance(test_fraction, (int, float, np.floating)) and not isinstance(test_fraction, bool)
    if not is_number or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction: must be a number in (0, 1), got {test_fraction!r}")
    # scikit-learn is imported here, not at module level: the config checks import this module and a
    # cached run never needs scikit-learn (~0.9 s of imports).
    import sklearn.datasets
    from sklearn.model_selection import train_test_split

    digits = sklearn.datasets.load_digits()
    x_all = digits.data.astype(np.float64)
    y_all = digits.target.astype(np.int64)
    is_known = np.isin(y_all, known)
    remap = np.full(NUM_DIGITS, -1, dtype=np.int64)
    remap[list(known)] = np.arange(len(known))
    x_known, y_known = x_all[is_known], remap[y_all[is_known]]
    x_train, x_test, y_train, y_test = train_test_split(
        x_known, y_known, test_size=float(test_fraction), stratify=y_known, random_state=seed
    )
    return DigitsData(
        x_train=x_train.astype(np.float32),
        y_train=y_train.astype(np.int64),
        x_test=x_test.astype(np.float32),
        y_test=y_test.astype(np.int64),
        x_grid=None,
        x_ood=x_all[~is_known].astype(np.float32),
        grid_shape=None,
        x_range=None,
        y_range=None,
        num_classes=len(known),
        known_classes=known,
        ood_classes=tuple(d for d in range(NUM_DIGITS) if d not in known),
        y_ood_digit=y_all[~is_known].copy(),
    )
