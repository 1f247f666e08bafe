"""The one training routine every method uses (torch-uncertainty style: methods differ only in the net).

Adam (the tutorial's legacy Adam, lr 1e-4) on SparseCategoricalCrossentropy(from_logits=True), batch
size 128, reshuffled every epoch. A network with M members gets M independent shuffles and the sum of
its members' mean losses, so a batched ensemble trains exactly like M separate fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ._tf import tf, tf_keras
from .config import ModelConfig
from .networks import SHUFFLE_STREAM, member_seed

EpochCallback = Callable[[int, dict[str, float]], None]


def fit_network(
    net, x: np.ndarray, y: np.ndarray, config: ModelConfig, on_epoch_end: EpochCallback | None = None
) -> dict[str, list[float]]:
    """Train `net` in place; returns per-epoch `loss` and `accuracy` (means over members and batches)."""
    x_all = tf.constant(x, dtype=tf.float32)
    y_all = tf.constant(y, dtype=tf.int64)
    n = int(x.shape[0])
    members = net.num_members
    optimizer = tf_keras.optimizers.legacy.Adam(learning_rate=config.learning_rate)
    shufflers = [np.random.default_rng(member_seed(config.seed, m, SHUFFLE_STREAM)) for m in range(members)]
    variables = net.trainable_weights

    @tf.function(reduce_retracing=True)
    def train_step(index: tf.Tensor, dropout_seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        xb = tf.gather(x_all, index)  # (M, b, D): each member sees its own mini-batch
        yb = tf.gather(y_all, index)
        with tf.GradientTape() as tape:
            logits = net.train_logits(xb, dropout_seed)
            ce = tf_keras.losses.sparse_categorical_crossentropy(yb, logits, from_logits=True)
            member_loss = tf.reduce_mean(ce, axis=1)
            loss = tf.reduce_sum(member_loss) + net.regularization_loss()
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1), yb), tf.float32))
        return tf.reduce_mean(member_loss), correct

    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    steps = math.ceil(n / config.batch_size)
    step = 0
    for epoch in range(config.epochs):
        net.on_epoch_begin(epoch)
        order = np.stack([rng.permutation(n) for rng in shufflers])
        loss_sum, correct_sum = 0.0, 0.0
        for s in range(steps):
            index = order[:, s * config.batch_size:(s + 1) * config.batch_size]
            seed = tf.constant([config.seed, step], dtype=tf.int64)
            batch_loss, correct = train_step(tf.constant(index), seed)
            loss_sum += float(batch_loss) * index.shape[1]
            correct_sum += float(correct)
            step += 1
        logs = {"loss": loss_sum / n, "accuracy": correct_sum / (n * members)}
        if not (math.isfinite(logs["loss"])):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1}: loss is {logs['loss']}")
        history["loss"].append(logs["loss"])
        history["accuracy"].append(logs["accuracy"])
        if on_epoch_end is not None:
            on_epoch_end(epoch, logs)
    net.finalize()
    return history
