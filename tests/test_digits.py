"""sngp_models.digits: the bundled 8x8 digits split into known-class train/test and held-out-class OOD."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import sklearn.datasets

from sngp_models import make_model
from sngp_models.digits import DigitsData, make_digits_dataset


@pytest.fixture(scope="module")
def raw() -> tuple[np.ndarray, np.ndarray]:
    digits = sklearn.datasets.load_digits()
    return digits.data.astype(np.float64), digits.target.astype(np.int64)


@pytest.fixture(scope="module")
def data() -> DigitsData:
    return make_digits_dataset(seed=0)


def test_shapes_dtypes_and_labels(data: DigitsData, raw) -> None:
    _, y_raw = raw
    n_known = int(np.isin(y_raw, (0, 1, 2, 3, 4)).sum())
    assert data.x_train.shape[1] == data.x_test.shape[1] == data.x_ood.shape[1] == 64
    assert data.x_train.shape[0] + data.x_test.shape[0] == n_known
    assert data.x_test.shape[0] == pytest.approx(0.3 * n_known, abs=5)
    assert data.y_train.shape == (data.x_train.shape[0],) and data.y_test.shape == (data.x_test.shape[0],)
    for arr in (data.x_train, data.x_test, data.x_ood):
        assert arr.dtype == np.float32 and np.isfinite(arr).all()
    assert data.y_train.dtype == data.y_test.dtype == np.int64
    assert data.num_classes == 5 and data.known_classes == (0, 1, 2, 3, 4)
    assert data.ood_classes == (5, 6, 7, 8, 9)
    assert set(np.unique(data.y_train)) == set(range(5)) == set(np.unique(data.y_test))
    # Grid fields exist (same field names as TwoMoonsData) but are None for 64-D inputs.
    assert data.x_grid is None and data.grid_shape is None and data.x_range is None and data.y_range is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.num_classes = 3  # type: ignore[misc]


def test_split_is_stratified_and_seeded(data: DigitsData) -> None:
    train_frac = np.bincount(data.y_train) / data.y_train.size
    test_frac = np.bincount(data.y_test) / data.y_test.size
    np.testing.assert_allclose(train_frac, test_frac, atol=0.02)
    again = make_digits_dataset(seed=0)
    np.testing.assert_array_equal(again.x_train, data.x_train)
    np.testing.assert_array_equal(again.y_test, data.y_test)
    other = make_digits_dataset(seed=1)
    assert not np.array_equal(other.y_train, data.y_train)


def test_raw_pixels_scaling_lives_in_the_model(data: DigitsData) -> None:
    # The data set holds raw pixel intensities (integers 0..16); the model standardises them.
    for x in (data.x_train, data.x_test, data.x_ood):
        np.testing.assert_array_equal(x, np.round(x))
        assert x.min() >= 0 and x.max() <= 16
    model = make_model("deterministic", num_classes=5, standardize=True, epochs=1, num_layers=1, num_hidden=8)
    model.fit(data.x_train, data.y_train)
    scaler = model.standardizer
    # The statistics are the train set's only (a pixel constant in the train set keeps std 1: centred).
    train = data.x_train.astype(np.float64)
    np.testing.assert_array_equal(scaler.mean, train.mean(axis=0))
    std = train.std(axis=0)
    constant = std == 0
    assert constant.any()
    np.testing.assert_array_equal(scaler.std[~constant], std[~constant])
    np.testing.assert_array_equal(scaler.std[constant], 1.0)
    scaled = scaler.transform(data.x_train)
    np.testing.assert_allclose(scaled.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(scaled.std(axis=0)[~constant], 1.0, atol=1e-4)
    assert abs(float(scaler.transform(data.x_test).mean())) > 1e-4  # test set: train stats, not its own


def test_ood_is_exactly_the_held_out_classes(data: DigitsData, raw) -> None:
    x_raw, y_raw = raw
    held_out = ~np.isin(y_raw, data.known_classes)
    assert data.x_ood.shape[0] == int(held_out.sum())
    np.testing.assert_array_equal(data.y_ood_digit, y_raw[held_out])
    np.testing.assert_array_equal(data.x_ood, x_raw[held_out])
    # Train + test rows are exactly the known-class rows (as multisets of raw images).
    rows = np.concatenate([data.x_train, data.x_test]).astype(np.int64)
    known_rows = x_raw[~held_out].astype(np.int64)
    assert sorted(map(tuple, rows)) == sorted(map(tuple, known_rows))


def test_labels_remapped_in_given_order(raw) -> None:
    x_raw, y_raw = raw
    data = make_digits_dataset(seed=0, known_classes=(7, 3), test_fraction=0.25)
    assert data.num_classes == 2 and data.known_classes == (7, 3)
    assert data.ood_classes == (0, 1, 2, 4, 5, 6, 8, 9)
    assert set(np.unique(data.y_ood_digit)) == set(data.ood_classes)
    # Label 0 = digit 7, label 1 = digit 3: every train image must be one of that digit's raw images.
    sevens = {tuple(r) for r in x_raw[y_raw == 7].astype(np.int64)}
    back = data.x_train[data.y_train == 0].astype(np.int64)
    assert all(tuple(r) in sevens for r in back)


@pytest.mark.parametrize(
    "known",
    [(3,), (), tuple(range(10)), (0, 10), (-1, 2), (1, 1, 2), (0.0, 1.0), (True, False), "01", 5, None],
)
def test_bad_known_classes(known) -> None:
    with pytest.raises(ValueError, match="known_classes"):
        make_digits_dataset(known_classes=known)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_other_arguments(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        make_digits_dataset(**kwargs)
