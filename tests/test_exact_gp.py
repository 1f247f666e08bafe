"""The optional fifth method `exact_gp` (scikit-learn GP classifier) behind the shared interface."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

import sngp_models
from sngp_models import config as C
from sngp_models.data import make_dataset
from sngp_models.exact_gp import ExactGPModel
from sngp_models.interface import Prediction
from sngp_models.validation import NotFittedError

FIT_SECONDS_LIMIT = 60.0  # measured 5-15 s on 2 busy shared cores (single-threaded BLAS); generous margin


@pytest.fixture(scope="module")
def moons():
    return make_dataset(seed=0)


@pytest.fixture(scope="module")
def fitted(moons):
    """The study's 1000 training points, one fit; returns (model, seconds, epoch-callback calls)."""
    calls = []
    model = sngp_models.make_model("exact_gp", seed=0)
    start = time.perf_counter()
    returned = model.fit(moons.x_train, moons.y_train, on_epoch_end=lambda e, logs: calls.append((e, logs)))
    seconds = time.perf_counter() - start
    assert returned is model
    return model, seconds, calls


# --------------------------------------------------------------------------- registration / config


def test_exact_gp_is_a_known_method_with_its_own_settings() -> None:
    assert C.check_method("exact_gp") == "exact_gp"
    with pytest.raises(ValueError, match="method: unknown method 'gp'.*exact_gp"):
        C.check_method("gp")
    cfg = C.ModelConfig(seed=3, gp_max_train=500)
    assert cfg.relevant("exact_gp") == {
        "num_classes": 2,
        "standardize": False,
        "seed": 3,
        "gp_max_train": 500,
    }
    with pytest.raises(ValueError, match="gp_max_train"):
        C.ModelConfig(gp_max_train=1)


def test_make_model_returns_exact_gp() -> None:
    model = sngp_models.make_model("exact_gp", seed=0)
    assert isinstance(model, ExactGPModel)
    assert model.method == "exact_gp" and model.config.seed == 0
    assert repr(model) == "ExactGPModel(method='exact_gp', seed=0)"


def test_module_does_not_import_tensorflow() -> None:
    code = (
        "import sys, numpy as np; from sngp_models.exact_gp import ExactGPModel; "
        "m = ExactGPModel().fit(np.random.default_rng(0).normal(size=(20, 2)), np.arange(20) % 2); "
        "m.predict_with_uncertainty(np.zeros((3, 2))); "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- behaviour on two moons


def test_fits_two_moons_quickly(fitted) -> None:
    model, seconds, calls = fitted
    assert seconds < FIT_SECONDS_LIMIT, f"fit took {seconds:.1f} s"
    assert model.n_train_used_ == 1000 and model.input_dim == 2
    # No epochs: the callback runs once with training loss/accuracy, which is also the history.
    assert len(calls) == 1 and calls[0][0] == 0 and set(calls[0][1]) == {"loss", "accuracy"}
    assert model.history_ == {k: [v] for k, v in calls[0][1].items()}
    assert model.history_["accuracy"][0] >= 0.95


def test_accuracy_on_fresh_sample(fitted, moons) -> None:
    model, _, _ = fitted
    assert np.mean(model.predict(moons.x_test) == moons.y_test) >= 0.95


def test_ood_uncertainty_higher_than_on_training_points(fitted, moons) -> None:
    model, _, _ = fitted
    unc_train = model.predict_with_uncertainty(moons.x_train).uncertainty
    ood = model.predict_with_uncertainty(moons.x_ood)
    assert ood.uncertainty.mean() > 1.5 * unc_train.mean()
    assert ood.uncertainty.mean() > 0.2  # probabilities near 0.5 far from the data
    assert np.abs(ood.probs[:, 0] - 0.5).mean() < 0.15


def test_prediction_contract_and_batching(fitted, moons) -> None:
    model, _, _ = fitted
    x = moons.x_grid[::37]
    pred = model.predict_with_uncertainty(x)
    assert isinstance(pred, Prediction)
    assert pred.probs.shape == (x.shape[0], 2) and pred.uncertainty.shape == (x.shape[0],)
    assert pred.probs.dtype == np.float32 and pred.uncertainty.dtype == np.float32
    np.testing.assert_allclose(pred.probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        pred.uncertainty, 0.5 * (1 - (pred.probs.astype(np.float64) ** 2).sum(1)), atol=1e-6
    )
    np.testing.assert_array_equal(model.predict_proba(x), pred.probs)
    # Batched prediction (7 rows per batch, N not a multiple) gives the same numbers.
    small = ExactGPModel(model.config.__class__(**{**model.config.to_dict(), "predict_batch_size": 7}))
    small.gp_, small.input_dim = model.gp_, model.input_dim
    np.testing.assert_allclose(small.predict_with_uncertainty(x).probs, pred.probs, atol=1e-7)


def test_bad_input(fitted) -> None:
    model, _, _ = fitted
    with pytest.raises(ValueError, match="x: has 3 feature"):
        model.predict_proba(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="x: contains NaN"):
        model.predict_proba(np.array([[np.nan, 0.0]]))
    with pytest.raises(NotFittedError, match="not fitted"):
        ExactGPModel().predict_proba(np.zeros((1, 2)))
    with pytest.raises(NotFittedError):
        ExactGPModel().save("/nonexistent/never-written")
    with pytest.raises(ValueError, match="y: labels must be in"):
        ExactGPModel().fit(np.zeros((4, 2)), [0, 1, 2, 0])
    with pytest.raises(ValueError, match="y: exact_gp needs at least 2 distinct classes"):
        ExactGPModel().fit(np.zeros((4, 2)), [1, 1, 1, 1])


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_exact(fitted, moons, tmp_path) -> None:
    model, _, _ = fitted
    x = np.concatenate([moons.x_test, moons.x_ood])
    before = model.predict_with_uncertainty(x)
    path = model.save(tmp_path / "gp")
    assert sorted(p.name for p in path.iterdir()) == ["gp.joblib", "manifest.json", "model.json"]
    loaded = sngp_models.load_model(path)
    assert isinstance(loaded, ExactGPModel)
    assert loaded.config == model.config and loaded.input_dim == 2
    assert loaded.history_ == model.history_ and loaded.n_train_used_ == 1000
    after = loaded.predict_with_uncertainty(x)
    np.testing.assert_array_equal(after.probs, before.probs)
    np.testing.assert_array_equal(after.uncertainty, before.uncertainty)
    # Saving again over an existing model replaces it atomically.
    model.save(path)
    np.testing.assert_array_equal(sngp_models.load_model(path).predict_proba(x), before.probs)


def test_load_refuses_corrupt_or_incomplete(fitted, tmp_path) -> None:
    model, _, _ = fitted
    path = model.save(tmp_path / "gp")
    with open(path / "gp.joblib", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ValueError, match="checksum mismatch"):
        sngp_models.load_model(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        sngp_models.load_model(path)


# --------------------------------------------------------------------------- subsampling / multi-class


def test_subsamples_to_gp_max_train(moons) -> None:
    a = ExactGPModel(C.ModelConfig(seed=1, gp_max_train=150)).fit(moons.x_train, moons.y_train)
    b = ExactGPModel(C.ModelConfig(seed=1, gp_max_train=150)).fit(moons.x_train, moons.y_train)
    assert a.n_train_used_ == 150 and a.gp_.base_estimator_.X_train_.shape == (150, 2)
    np.testing.assert_array_equal(a.gp_.base_estimator_.X_train_, b.gp_.base_estimator_.X_train_)
    assert np.mean(a.predict(moons.x_test) == moons.y_test) >= 0.9


def test_multiclass_one_vs_rest() -> None:
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    y = np.repeat(np.arange(3), 30)
    x = centers[y] + rng.normal(scale=0.5, size=(90, 2))
    model = sngp_models.make_model("exact_gp", num_classes=3, seed=0).fit(x, y)
    pred = model.predict_with_uncertainty(centers)
    assert pred.probs.shape == (3, 3)
    np.testing.assert_array_equal(pred.probs.argmax(1), [0, 1, 2])
    np.testing.assert_allclose(pred.probs.sum(1), 1.0, atol=1e-6)
    # A class absent from the labels gets probability 0 and keeps its column.
    four = sngp_models.make_model("exact_gp", num_classes=4, seed=0).fit(x, y)
    probs = four.predict_proba(centers)
    assert probs.shape == (3, 4) and np.all(probs[:, 3] == 0.0)


def test_digits_accuracy_and_ood() -> None:
    """64-D inputs: the median-heuristic start keeps the optimiser off the constant-kernel optimum."""
    from sngp_models.digits import make_digits_dataset
    from sngp_models.metrics import ood_auroc

    data = make_digits_dataset(seed=0, known_classes=(0, 1, 2))
    model = sngp_models.make_model("exact_gp", num_classes=3, seed=0).fit(data.x_train, data.y_train)
    test = model.predict_with_uncertainty(data.x_test)
    assert np.mean(test.probs.argmax(1) == data.y_test) >= 0.9
    assert ood_auroc(test.uncertainty, model.predict_with_uncertainty(data.x_ood).uncertainty) > 0.8
