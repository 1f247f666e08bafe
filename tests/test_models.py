"""The four uncertainty methods behind one interface: shapes, uncertainty, method-specific behaviour,
the batched ensemble, reproducibility and input validation. Short configs only (seconds per fit)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import sngp_models
from sngp_models.data import make_two_moons

METHODS = ("deterministic", "sngp", "mc_dropout", "deep_ensemble")
SHORT = dict(epochs=3, num_hidden=32, num_layers=2, ensemble_size=3, num_inducing=128, seed=0)
PREDICT_BATCH = 7


@pytest.fixture(scope="module")
def moons() -> tuple[np.ndarray, np.ndarray]:
    return make_two_moons(n_per_class=100, seed=0)


@pytest.fixture(scope="module")
def x_eval(moons) -> np.ndarray:
    # 205 rows: not a multiple of PREDICT_BATCH, includes points far from the data.
    far = np.array([[10.0, 10.0], [-10.0, 5.0], [2.5, -1.75], [0.0, -30.0], [50.0, 0.0]], np.float32)
    return np.concatenate([moons[0], far])


@pytest.fixture(scope="module")
def fitted(moons) -> dict[str, tuple[object, object]]:
    """method -> (model, what fit returned); one short fit per method, predict_batch_size=7."""
    x, y = moons
    out = {}
    for method in METHODS:
        model = sngp_models.make_model(method, **SHORT, predict_batch_size=PREDICT_BATCH)
        out[method] = (model, model.fit(x, y))
    return out


@pytest.fixture(scope="module")
def det_no_dropout(moons):
    return sngp_models.make_model("deterministic", **SHORT, dropout_rate=0.0).fit(*moons)


def _probs(model, x) -> np.ndarray:
    return model.predict_proba(x)


# --------------------------------------------------------------------------- interface


@pytest.mark.parametrize("method", METHODS)
def test_fit_returns_self_and_records_history(fitted, method) -> None:
    model, returned = fitted[method]
    assert returned is model
    assert model.method == method
    assert set(model.history_) == {"loss", "accuracy"}
    assert len(model.history_["loss"]) == SHORT["epochs"]
    assert np.isfinite(model.history_["loss"]).all()


@pytest.mark.parametrize("method", METHODS)
def test_predict_proba_shape_and_rows_sum_to_one(fitted, x_eval, method) -> None:
    model, _ = fitted[method]
    probs = model.predict_proba(x_eval)
    assert probs.shape == (len(x_eval), 2)
    assert np.isfinite(probs).all()
    assert (probs >= 0).all() and (probs <= 1).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(model.predict(x_eval), probs.argmax(axis=1))


@pytest.mark.parametrize("method", METHODS)
def test_uncertainty_is_half_gini_and_bounded(fitted, x_eval, method) -> None:
    model, _ = fitted[method]
    pred = model.predict_with_uncertainty(x_eval)
    assert isinstance(pred, sngp_models.Prediction)
    assert pred.probs.shape == (len(x_eval), 2) and pred.uncertainty.shape == (len(x_eval),)
    p = pred.probs.astype(np.float64)
    np.testing.assert_allclose(pred.uncertainty, (1 - (p**2).sum(axis=1)) / 2, atol=1e-6)
    # For two classes this is the study's p(1 - p).
    np.testing.assert_allclose(pred.uncertainty, p[:, 0] * (1 - p[:, 0]), atol=1e-6)
    assert pred.uncertainty.min() >= -1e-7 and pred.uncertainty.max() <= 0.25 + 1e-7
    np.testing.assert_array_equal(model.predict_proba(x_eval), pred.probs)


@pytest.mark.parametrize("method", ["deterministic", "sngp", "deep_ensemble"])
def test_batched_prediction_does_not_depend_on_batch_split(fitted, x_eval, method) -> None:
    model, _ = fitted[method]
    assert model.config.predict_batch_size == PREDICT_BATCH and len(x_eval) % PREDICT_BATCH != 0
    full = model.predict_with_uncertainty(x_eval)
    tail = model.predict_with_uncertainty(x_eval[196:])  # the last, partial batch on its own
    head = model.predict_with_uncertainty(x_eval[:100])
    one = model.predict_with_uncertainty(x_eval[-1:])
    np.testing.assert_allclose(full.probs[196:], tail.probs, atol=1e-6)
    np.testing.assert_allclose(full.uncertainty[196:], tail.uncertainty, atol=1e-6)
    np.testing.assert_allclose(full.probs[:100], head.probs, atol=1e-6)
    np.testing.assert_allclose(full.probs[-1:], one.probs, atol=1e-6)


def test_mc_dropout_partial_batches_are_valid_and_reproducible(fitted, x_eval) -> None:
    model, _ = fitted["mc_dropout"]
    a = model.predict_with_uncertainty(x_eval)
    b = model.predict_with_uncertainty(x_eval)
    np.testing.assert_array_equal(a.probs, b.probs)
    np.testing.assert_array_equal(a.uncertainty, b.uncertainty)
    assert a.probs.shape == (205, 2)
    np.testing.assert_allclose(a.probs.sum(axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- MC Dropout


def test_fresh_mc_dropout_net_equals_deterministic_net(fitted) -> None:
    det, _ = fitted["deterministic"]
    mc, _ = fitted["mc_dropout"]
    det_w, mc_w = det.net.all_weights, mc.net.all_weights
    assert len(det_w) == len(mc_w)
    for a, b in zip(det_w, mc_w):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_mc_dropout_differs_from_deterministic_with_same_weights(fitted, x_eval) -> None:
    from sngp_models.models import MCDropoutModel

    det, _ = fitted["deterministic"]
    mc, _ = fitted["mc_dropout"]
    reused = MCDropoutModel.from_deterministic(det)
    assert reused.net is det.net
    p_det = _probs(det, x_eval)
    p_mc = _probs(mc, x_eval)
    p_reused = _probs(reused, x_eval)
    # Same net, same seed, same batches -> the same dropout masks.
    np.testing.assert_allclose(p_reused, p_mc, atol=1e-6)
    # ... but dropout is on at prediction time, so the average differs from the single deterministic pass.
    assert np.abs(p_mc - p_det).max() > 1e-3
    assert np.abs(p_reused - p_det).max() > 1e-3
    # Still close on average (dropout 0.1 perturbs, it does not scramble).
    assert np.abs(p_mc - p_det).mean() < 0.1


def test_mc_dropout_averages_num_mc_samples_passes(fitted, moons) -> None:
    """Each row gets its own masks, so 400 copies of one point are 400 independent MC estimates.

    Their spread shrinks like 1/sqrt(num_mc_samples): 1 pass vs 16 passes -> about 4x.
    """
    from sngp_models.models import MCDropoutModel

    det, _ = fitted["deterministic"]
    copies = np.repeat(moons[0][:2], 400, axis=0)
    estimates = {}
    for k in (1, 16):
        config = dataclasses.replace(det.config, num_mc_samples=k, predict_batch_size=10_000)
        model = MCDropoutModel.from_deterministic(det, config)
        assert model.config.num_mc_samples == k
        estimates[k] = model.predict_proba(copies)[:, 0].reshape(2, 400)
    spread_1, spread_16 = estimates[1].std(axis=1), estimates[16].std(axis=1)
    assert (spread_1 > 1e-3).all(), "dropout has no effect at prediction time"
    ratio = spread_1 / spread_16
    assert ((ratio > 2.5) & (ratio < 6.5)).all(), f"spread ratio {ratio}, expected ~4 (sqrt(16))"
    # Both estimate the same expectation.
    np.testing.assert_allclose(estimates[1].mean(axis=1), estimates[16].mean(axis=1), atol=0.01)


@pytest.mark.parametrize(("field", "value"), [("dropout_rate", 0.5), ("num_hidden", 16), ("seed", 3)])
def test_from_deterministic_rejects_config_that_contradicts_the_net(fitted, field, value) -> None:
    """The reused net keeps its own dropout rate/architecture while save/load rebuilds it from the new
    config; a mismatch used to be accepted and then broke the round trip (dropout 0.5 vs 0.1: 0.1 apart)."""
    from sngp_models.models import MCDropoutModel

    det, _ = fitted["deterministic"]
    with _raises_naming(field):
        MCDropoutModel.from_deterministic(det, dataclasses.replace(det.config, **{field: value}))


def test_from_deterministic_round_trips_through_save(fitted, x_eval, tmp_path) -> None:
    from sngp_models.models import MCDropoutModel

    det, _ = fitted["deterministic"]
    mc = MCDropoutModel.from_deterministic(det, dataclasses.replace(det.config, num_mc_samples=4))
    loaded = sngp_models.load_model(mc.save(tmp_path / "mc"))
    assert loaded.method == "mc_dropout" and loaded.config.num_mc_samples == 4
    np.testing.assert_allclose(loaded.predict_proba(x_eval), mc.predict_proba(x_eval), atol=1e-6, rtol=0)


def test_mc_dropout_predictions_reproducible_across_instances(fitted, x_eval) -> None:
    from sngp_models.models import MCDropoutModel

    det, _ = fitted["deterministic"]
    mc, _ = fitted["mc_dropout"]
    first = MCDropoutModel.from_deterministic(det, mc.config).predict_proba(x_eval)
    second = MCDropoutModel.from_deterministic(det, mc.config).predict_proba(x_eval)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(mc.predict_proba(x_eval), mc.predict_proba(x_eval))


# --------------------------------------------------------------------------- Deep Ensemble


def test_deep_ensemble_members_differ_and_average(fitted, x_eval) -> None:
    import tensorflow as tf

    ens, _ = fitted["deep_ensemble"]
    det, _ = fitted["deterministic"]
    assert ens.net.num_members == SHORT["ensemble_size"] == 3
    logits = ens.net.logits(tf.constant(x_eval)).numpy()
    assert logits.shape == (3, len(x_eval), 2)
    member_probs = tf.nn.softmax(logits, axis=-1).numpy()
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(member_probs[i] - member_probs[j]).max() > 1e-2, (i, j)
    p_ens = _probs(ens, x_eval)
    np.testing.assert_allclose(p_ens, member_probs.mean(axis=0), atol=1e-6)
    assert np.abs(p_ens - _probs(det, x_eval)).max() > 1e-2


def test_one_member_ensemble_trains_exactly_like_deterministic(fitted, det_no_dropout, moons, x_eval) -> None:
    x, y = moons
    for dropout, det in ((0.0, det_no_dropout), (0.1, fitted["deterministic"][0])):
        assert det.config.dropout_rate == dropout
        cfg = {**SHORT, "dropout_rate": dropout}
        ens = sngp_models.make_model("deep_ensemble", **{**cfg, "ensemble_size": 1}).fit(x, y)
        assert ens.net.num_members == 1
        np.testing.assert_allclose(_probs(ens, x_eval), _probs(det, x_eval), atol=1e-5, err_msg=f"{dropout=}")


def test_batched_members_train_independently(det_no_dropout, moons, x_eval) -> None:
    """Without dropout each member's training depends only on its own init and batch order: member m of a
    batched ensemble equals member m of a smaller ensemble, and member 0 equals the deterministic net."""
    import tensorflow as tf

    x, y = moons
    cfg = {**SHORT, "dropout_rate": 0.0}
    det = det_no_dropout
    ens2 = sngp_models.make_model("deep_ensemble", **{**cfg, "ensemble_size": 2}).fit(x, y)
    ens3 = sngp_models.make_model("deep_ensemble", **{**cfg, "ensemble_size": 3}).fit(x, y)
    xt = tf.constant(x_eval)
    p2 = tf.nn.softmax(ens2.net.logits(xt), axis=-1).numpy()
    p3 = tf.nn.softmax(ens3.net.logits(xt), axis=-1).numpy()
    np.testing.assert_allclose(p3[0], _probs(det, x_eval), atol=1e-5)
    np.testing.assert_allclose(p3[:2], p2, atol=1e-5)
    for w2, w3 in zip(ens2.net.all_weights, ens3.net.all_weights):
        np.testing.assert_allclose(w3.numpy()[:2], w2.numpy(), atol=1e-5, err_msg=w2.name)
    assert np.abs(p3[2] - p3[0]).max() > 1e-2 and np.abs(p3[2] - p3[1]).max() > 1e-2


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_reproduces_and_other_seed_differs(fitted, moons, x_eval, method) -> None:
    x, y = moons
    model, _ = fitted[method]
    again = sngp_models.make_model(method, **SHORT, predict_batch_size=PREDICT_BATCH).fit(x, y)
    np.testing.assert_allclose(_probs(again, x_eval), _probs(model, x_eval), atol=1e-6)
    other = sngp_models.make_model(method, **{**SHORT, "seed": 1}, predict_batch_size=PREDICT_BATCH).fit(x, y)
    assert np.abs(_probs(other, x_eval) - _probs(model, x_eval)).max() > 1e-3


# --------------------------------------------------------------------------- bad input


def _raises_naming(name: str):
    return pytest.raises(ValueError, match=rf"(^|\W){re.escape(name)}\b")


_X = np.zeros((4, 2), np.float32)
_Y = np.array([0, 1, 0, 1])


@pytest.mark.parametrize(
    ("x", "y", "name"),
    [
        (np.zeros(4, np.float32), _Y, "x"),  # 1-D
        (np.zeros((4, 2, 1), np.float32), _Y, "x"),  # 3-D
        (np.array([[0.0, np.nan], [1, 1], [2, 2], [3, 3]]), _Y, "x"),
        (np.array([[0.0, np.inf], [1, 1], [2, 2], [3, 3]]), _Y, "x"),
        (np.array([[0.0, -np.inf], [1, 1], [2, 2], [3, 3]]), _Y, "x"),
        (np.zeros((0, 2), np.float32), np.zeros(0, np.int64), "x"),
        (np.zeros((4, 0), np.float32), _Y, "x"),
        ([["a", "b"]] * 4, _Y, "x"),
        (_X, np.array([0, 1, 2, 1]), "y"),  # label == num_classes
        (_X, np.array([0, 1, -1, 1]), "y"),
        (_X, np.array([0, 1, 0]), "y"),  # length mismatch
        (_X, np.array([0, 1, 0, 1, 1]), "y"),
        (_X, np.array([0.0, 1.5, 0.0, 1.0]), "y"),  # non-integer floats
        (_X, np.array([0.0, np.nan, 0.0, 1.0]), "y"),
        (_X, np.array([[0], [1], [0], [1]]), "y"),  # 2-D
        (_X, np.array(["0", "1", "0", "1"]), "y"),
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_fit_rejects_bad_input(method, x, y, name) -> None:
    model = sngp_models.make_model(method, **SHORT)
    with _raises_naming(name):
        model.fit(x, y)
    assert model.net is None  # nothing was trained


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((5, 3), np.float32),  # wrong feature count
        np.zeros((5, 1), np.float32),
        np.zeros(2, np.float32),
        np.zeros((0, 2), np.float32),
        np.array([[np.nan, 0.0]]),
        np.array([[np.inf, 0.0]]),
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_predict_rejects_bad_input(fitted, method, x) -> None:
    model, _ = fitted[method]
    with _raises_naming("x"):
        model.predict_with_uncertainty(x)
    with _raises_naming("x"):
        model.predict_proba(x)


def test_wrong_feature_count_message_says_what_was_fitted(fitted) -> None:
    model, _ = fitted["sngp"]
    with pytest.raises(ValueError, match=r"x: has 3 feature\(s\).*fitted on 2"):
        model.predict_proba(np.zeros((5, 3), np.float32))


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match=r"method.*'gp'.*deterministic.*sngp.*mc_dropout.*deep_ensemble"):
        sngp_models.make_model("gp")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("epochs", -1),
        ("epochs", 2.5),
        ("epochs", True),
        ("dropout_rate", 1.0),
        ("dropout_rate", -0.1),
        ("dropout_rate", float("nan")),
        ("spec_norm_bound", 0.0),
        ("spec_norm_bound", -0.9),
        ("ensemble_size", 0),
        ("learning_rate", 0.0),
        ("learning_rate", -1e-4),
        ("batch_size", 0),
        ("num_inducing", 0),
        ("num_mc_samples", 0),
        ("num_classes", 1),
        ("seed", -1),
        ("predict_batch_size", 0),
        ("gp_cov_momentum", 1.5),
        ("learning_rate", "fast"),
    ],
)
@pytest.mark.parametrize("method", ["sngp", "deep_ensemble"])
def test_bad_config_value(method, field, value) -> None:
    with _raises_naming(field):
        sngp_models.make_model(method, **{field: value})


def test_unknown_config_field_named_with_allowed_list() -> None:
    with pytest.raises(ValueError, match=r"unknown config field.*'epoch'.*allowed.*'epochs'"):
        sngp_models.make_model("deterministic", epoch=3)


@pytest.mark.parametrize("method", METHODS)
def test_predict_before_fit_raises_not_fitted(method, tmp_path) -> None:
    from sngp_models.validation import NotFittedError

    model = sngp_models.make_model(method, **SHORT)
    for call in (
        lambda: model.predict_proba(_X),
        lambda: model.predict_with_uncertainty(_X),
        lambda: model.predict(_X),
        lambda: model.save(tmp_path / "m"),
    ):
        with pytest.raises(NotFittedError, match=method) as info:
            call()
        assert isinstance(info.value, ValueError)
    assert not (tmp_path / "m").exists()


def test_models_load_every_kernel_library_at_import() -> None:
    """Building a model must not load TensorFlow kernel libraries (tf-models pulls in tensorflow_text's):
    a kernel library loaded while another thread runs TensorFlow graphs can deadlock both, which hung a
    pipeline run training three methods in threads. So importing the models loads them, once, up front."""
    import subprocess
    import sys

    probe = (
        "import sys, sngp_models.models; "
        "print(any(m.startswith('tensorflow_text') for m in sys.modules), "
        "'official.nlp.modeling.layers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"], out.stdout
