"""The fast paths give the straightforward path's results (issue 9).

* Training runs each epoch as one graph call (a tf.while_loop over the mini-batches); it must produce
  the same weights and history as one tf.function call per mini-batch with a host sync per step.
* MC Dropout evaluates its K passes as one tiled batch; it must equal K separate passes with the same
  dropout masks, averaged.
(The batched deep ensemble's equivalence to separate fits is tested in test_models.py.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import sngp_models
from sngp_models.config import ModelConfig
from sngp_models.data import make_two_moons
from sngp_models.models import MC_SEED_STREAM, MCDropoutModel
from sngp_models.networks import SHUFFLE_STREAM, ResNetMembers, SNGPResNet, member_seed
from sngp_models.tf_setup import tf, tf_keras
from sngp_models.training import fit_network

SHORT = dict(epochs=3, num_hidden=32, num_layers=2, num_inducing=128, ensemble_size=3, seed=0)


@pytest.fixture(scope="module")
def moons():
    # 150 per class: 300 rows, not a multiple of the batch size 128 (a short last batch).
    return make_two_moons(n_per_class=150, seed=0)


def straightforward_fit(net, x, y, config: ModelConfig) -> dict[str, list[float]]:
    """The plain loop: one compiled step per mini-batch, the loss read back after every step.

    Its train step is a deliberate copy of sngp_models.training.make_train_step: the reference must not
    share the code it checks, or a bug in that code would pass unnoticed."""
    x_all, y_all = tf.constant(x, tf.float32), tf.constant(y, tf.int64)
    n, members = len(x), net.num_members
    optimizer = tf_keras.optimizers.legacy.Adam(learning_rate=config.learning_rate)
    shufflers = [np.random.default_rng(member_seed(config.seed, m, SHUFFLE_STREAM)) for m in range(members)]
    variables = net.trainable_weights

    @tf.function
    def step_fn(index, dropout_seed):
        xb, yb = tf.gather(x_all, index), tf.gather(y_all, index)
        with tf.GradientTape() as tape:
            logits = net.train_logits(xb, dropout_seed)
            ce = tf_keras.losses.sparse_categorical_crossentropy(yb, logits, from_logits=True)
            member_loss = tf.reduce_mean(ce, axis=1)
            loss = tf.reduce_sum(member_loss) + net.regularization_loss()
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1), yb), tf.float32))
        return tf.reduce_mean(member_loss), correct

    history = {"loss": [], "accuracy": []}
    step = 0
    for epoch in range(config.epochs):
        net.on_epoch_begin(epoch)
        order = np.stack([rng.permutation(n) for rng in shufflers])
        loss_sum = correct_sum = 0.0
        for s in range(math.ceil(n / config.batch_size)):
            index = order[:, s * config.batch_size : (s + 1) * config.batch_size]
            batch_loss, correct = step_fn(tf.constant(index), tf.constant([config.seed, step], tf.int64))
            loss_sum += float(batch_loss) * index.shape[1]
            correct_sum += float(correct)
            step += 1
        history["loss"].append(loss_sum / n)
        history["accuracy"].append(correct_sum / (n * members))
    net.finalize()
    return history


NETS = {
    "deterministic": lambda d, c: ResNetMembers(d, c, num_members=1),
    "deep_ensemble": lambda d, c: ResNetMembers(d, c, num_members=c.ensemble_size),
    "sngp": lambda d, c: SNGPResNet(d, c),
}


@pytest.mark.parametrize("kind", list(NETS))
def test_epoch_in_one_graph_equals_one_call_per_batch(moons, kind) -> None:
    x, y = moons
    config = ModelConfig(**SHORT)
    fast_net, plain_net = NETS[kind](2, config), NETS[kind](2, config)
    for a, b in zip(fast_net.all_weights, plain_net.all_weights):  # same start
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    fast = fit_network(fast_net, x, y, config)
    plain = straightforward_fit(plain_net, x, y, config)
    np.testing.assert_allclose(fast["loss"], plain["loss"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fast["accuracy"], plain["accuracy"], rtol=0, atol=1e-9)
    for a, b in zip(fast_net.all_weights, plain_net.all_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6, err_msg=a.name)
    # Not vacuous: training moved the weights.
    start = NETS[kind](2, config)
    moved = max(
        float(np.abs(a.numpy() - b.numpy()).max())
        for a, b in zip(fast_net.trainable_weights, start.trainable_weights)
    )
    assert moved > 1e-4


@pytest.fixture(scope="module")
def mc_model(moons):
    return sngp_models.make_model("mc_dropout", **SHORT, num_mc_samples=4, predict_batch_size=64).fit(*moons)


def _loop_of_passes(model: MCDropoutModel, x: np.ndarray, batch_index: int) -> np.ndarray:
    """K separate forward passes in numpy, pass k using rows k*B..(k+1)*B-1 of each layer's mask."""
    cfg, net = model.config, model.net
    k, rate, b = cfg.num_mc_samples, cfg.dropout_rate, len(x)
    seed = tf.random.experimental.stateless_fold_in(
        tf.constant([cfg.seed, MC_SEED_STREAM], tf.int64), tf.constant(batch_index, tf.int64)
    )
    masks = [  # what stateless_dropout draws for the (K*B, H) tiled batch at layer `layer`
        tf.random.stateless_uniform(
            (k * b, cfg.num_hidden), seed=tf.random.experimental.stateless_fold_in(seed, layer)
        ).numpy()
        >= rate
        for layer in range(cfg.num_layers)
    ]
    w_in, b_in = net.w_in.numpy()[0], net.b_in.numpy()[0]
    kernels = [w.numpy()[0] for w in net.kernels]
    biases = [v.numpy()[0] for v in net.biases]
    w_out, b_out = net.w_out.numpy()[0], net.b_out.numpy()[0]
    probs = []
    for p in range(k):
        h = x @ w_in + b_in
        for layer, (w, bias) in enumerate(zip(kernels, biases)):
            resid = np.maximum(h @ w + bias, 0.0)
            h = h + np.where(masks[layer][p * b : (p + 1) * b], resid / (1 - rate), 0.0)
        logits = h @ w_out + b_out
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs.append(e / e.sum(axis=1, keepdims=True))
    return np.mean(probs, axis=0)


def test_tiled_mc_dropout_equals_a_loop_of_k_passes(mc_model, moons) -> None:
    x = moons[0][:50].astype(np.float32)  # one prediction batch (predict_batch_size=64): batch_index 0
    fast = mc_model.predict_proba(x)
    loop = _loop_of_passes(mc_model, x, batch_index=0)
    np.testing.assert_allclose(fast, loop, rtol=0, atol=1e-5)
    # Not vacuous: the passes differ, so the average is not the deterministic output.
    det = mc_model.net.logits(tf.constant(x))[0].numpy()
    det = np.exp(det - det.max(axis=1, keepdims=True))
    det /= det.sum(axis=1, keepdims=True)
    assert np.abs(fast - det).max() > 1e-4


def test_second_prediction_batch_uses_its_own_masks(mc_model, moons) -> None:
    x = moons[0][:100].astype(np.float32)  # rows 64..99 are prediction batch 1
    fast = mc_model.predict_proba(x)
    np.testing.assert_allclose(fast[64:], _loop_of_passes(mc_model, x[64:], batch_index=1), rtol=0, atol=1e-5)


def test_one_tiled_pass_is_one_dropout_pass(moons) -> None:
    base = sngp_models.make_model("deterministic", **SHORT).fit(*moons)
    one = MCDropoutModel.from_deterministic(
        base, base.config.__class__(**{**base.config.to_dict(), "num_mc_samples": 1})
    )
    x = moons[0][:40].astype(np.float32)
    seed = tf.random.experimental.stateless_fold_in(
        tf.constant([one.config.seed, MC_SEED_STREAM], tf.int64), tf.constant(0, tf.int64)
    )
    single = tf.nn.softmax(one.net.logits(tf.constant(x), dropout_seed=seed)[0], axis=-1).numpy()
    np.testing.assert_allclose(one.predict_proba(x), single, rtol=0, atol=1e-6)
