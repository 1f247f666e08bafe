"""The study's networks: a residual MLP (one or many members evaluated together) and its SNGP variant.

DeepResNet (tutorial):  h = W_in x (frozen);  h <- h + Dropout(relu(W_k h + b_k)), k = 1..L;
logits = W_out h.
SNGP: each hidden W_k wrapped in spectral normalisation (||W_k||_2 <= c), and the Dense output replaced by
a random-feature Gaussian process layer; both layers come from tf-models-official.

Every network exposes the same small surface to the shared training loop (`training.fit_network`):
`num_members`, `trainable_weights`, `all_weights`, `train_logits(x_members, seed)`,
`regularization_loss()`, `on_epoch_begin(epoch)` and `finalize()`.
Dropout uses stateless, explicitly seeded masks so training and MC-Dropout prediction are reproducible
and independent of other threads using TensorFlow's global random state.
"""

from __future__ import annotations

import threading

import numpy as np

# tf-models' layers at import, never lazily: this also loads tensorflow_text's kernel libraries, and a
# kernel library loaded (dlopen) while another thread runs TensorFlow graphs can deadlock both in
# TensorFlow's kernel registry (seen: a cold run hung for good when the SNGP training thread imported this
# while the deterministic one trained). At import it happens under this module's import lock, before any
# model of this process exists. TF_USE_LEGACY_KERAS is already set: sngp_models/__init__.py runs first.
from official.nlp.modeling import layers as nlp_layers
from scipy.spatial.distance import pdist

from .config import AUTO, ModelConfig
from .tf_setup import tf, tf_keras

# Building the SNGP network draws from TensorFlow's global seed (tf-models' layers take no seeds);
# serialise those few milliseconds so concurrent builds in threads stay reproducible.
_GLOBAL_SEED_LOCK = threading.Lock()


def member_seed(seed: int, member: int, stream: int) -> int:
    """Independent 31-bit seeds for (member, purpose) derived from the one config seed."""
    return int(np.random.SeedSequence([seed, member, stream]).generate_state(1)[0] % (2**31 - 1))


INIT_STREAM, SHUFFLE_STREAM, KERNEL_SCALE_STREAM = 0, 1, 2
# gp_kernel_scale "auto" looks at this many train points (seeded subsample): 1000 points give ~500k
# pairwise distances, a stable median, in milliseconds.
KERNEL_SCALE_POINTS = 1000


def kernel_scale_sample(x: np.ndarray, seed: int, max_points: int = KERNEL_SCALE_POINTS) -> np.ndarray:
    """At most `max_points` rows of x, drawn without replacement (seeded by `seed`), in their order."""
    if x.shape[0] <= max_points:
        return x
    rng = np.random.default_rng(member_seed(seed, 0, KERNEL_SCALE_STREAM))
    return x[np.sort(rng.choice(x.shape[0], size=max_points, replace=False))]


def auto_kernel_scale(h: np.ndarray) -> float:
    """The median heuristic for RandomFeatureGaussianProcess's `gp_kernel_scale`: median(||h_i - h_j||)^2.

    tf-models' layer computes the random features phi(h) = sqrt(2/M) cos(W h / sqrt(s) + b), W ~ N(0, 1),
    b ~ U(0, 2 pi), s = gp_kernel_scale, so phi(h).phi(h') approximates the RBF kernel
    exp(-||h - h'||^2 / (2 s)): s is the SQUARED length scale. The median heuristic sets the length scale
    to the median pairwise distance d of the GP layer's inputs, so s = d^2: a typical pair of points has
    kernel value exp(-1/2), neither all ~1 (one smooth function, no distance awareness) nor all ~0
    (every random feature noise). 1.0 if the points coincide.
    """
    h = np.asarray(h, dtype=np.float64)
    median = float(np.median(pdist(h))) if h.shape[0] >= 2 else 0.0
    return median**2 if np.isfinite(median) and median > 0 else 1.0


def _glorot(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    # Same distribution as Keras' default Dense initialiser (GlorotUniform).
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)


def _dropout(h: tf.Tensor, rate: float, seed: tf.Tensor, layer: int) -> tf.Tensor:
    if rate <= 0.0 or seed is None:
        return h
    layer_seed = tf.random.experimental.stateless_fold_in(seed, layer)
    return tf.nn.experimental.stateless_dropout(h, rate=rate, seed=layer_seed)


class ResNetMembers(tf.Module):
    """`num_members` independent DeepResNets whose weights are stacked on a leading member axis.

    One member is the deterministic net (and MC Dropout's); ten are the deep ensemble, trained in one
    graph with independent initialisations, mini-batch orders and losses: with Adam, whose update is
    element-wise, the sum of the members' losses gives each member exactly its own update.
    """

    def __init__(self, input_dim: int, config: ModelConfig, num_members: int = 1) -> None:
        super().__init__(name="resnet_members")
        self.config = config
        self.num_members = num_members
        hidden, classes = config.num_hidden, config.num_classes
        inits = []
        for m in range(num_members):
            rng = np.random.default_rng(member_seed(config.seed, m, INIT_STREAM))
            w_in = _glorot(rng, input_dim, hidden)
            kernels = [_glorot(rng, hidden, hidden) for _ in range(config.num_layers)]
            w_out = _glorot(rng, hidden, classes)
            inits.append((w_in, kernels, w_out))
        stack = lambda arrays: np.stack(arrays).astype(np.float32)  # noqa: E731
        # The input projection is frozen, as in the tutorial (Dense(128, trainable=False)).
        self.w_in = tf.Variable(stack([i[0] for i in inits]), trainable=False, name="w_in")
        self.b_in = tf.Variable(tf.zeros((num_members, hidden)), trainable=False, name="b_in")
        self.kernels = [
            tf.Variable(stack([i[1][k] for i in inits]), name=f"kernel_{k}") for k in range(config.num_layers)
        ]
        self.biases = [
            tf.Variable(tf.zeros((num_members, hidden)), name=f"bias_{k}") for k in range(config.num_layers)
        ]
        self.w_out = tf.Variable(stack([i[2] for i in inits]), name="w_out")
        self.b_out = tf.Variable(tf.zeros((num_members, classes)), name="b_out")

    @property
    def trainable_weights(self) -> list[tf.Variable]:
        return [*self.kernels, *self.biases, self.w_out, self.b_out]

    @property
    def all_weights(self) -> list[tf.Variable]:
        return [self.w_in, self.b_in, *self.kernels, *self.biases, self.w_out, self.b_out]

    def logits(self, x: tf.Tensor, dropout_seed: tf.Tensor | None = None) -> tf.Tensor:
        """x: (B, D) shared by all members or (M, B, D) per member -> logits (M, B, C)."""
        eq = "bd,mdh->mbh" if x.shape.rank == 2 else "mbd,mdh->mbh"
        h = tf.einsum(eq, x, self.w_in) + self.b_in[:, None, :]
        for k, (w, b) in enumerate(zip(self.kernels, self.biases)):
            resid = tf.nn.relu(tf.einsum("mbh,mhk->mbk", h, w) + b[:, None, :])
            h = h + _dropout(resid, self.config.dropout_rate, dropout_seed, k)
        return tf.einsum("mbh,mhc->mbc", h, self.w_out) + self.b_out[:, None, :]

    def train_logits(self, x_members: tf.Tensor, dropout_seed: tf.Tensor) -> tf.Tensor:
        return self.logits(x_members, dropout_seed)

    def regularization_loss(self) -> tf.Tensor:
        return tf.constant(0.0)

    def on_epoch_begin(self, epoch: int) -> None:
        pass

    def finalize(self) -> None:
        pass


class SNGPResNet(tf_keras.Model):
    """DeepResNet with spectrally normalised hidden layers and a random-feature GP output layer.

    GP posterior (Laplace, Gaussian likelihood, gp_cov_momentum=-1): the precision matrix
    P = s I + sum_i phi_i phi_i^T is accumulated over an epoch (reset at the start of every epoch after the
    first), so after training it holds exactly the last epoch's random features phi. The predictive
    variance of x is var(x) = s * phi(x)^T P^{-1} phi(x); P^{-1} is computed once in `finalize`, so
    prediction costs O(N) memory and never forms the N x N covariance the library's layer returns.
    Mean-field logits: logits / sqrt(1 + lambda * var), lambda = pi/8.

    The random features' kernel scale `kernel_scale` is `kernel_scale` if given (a loaded model's chosen
    value), else `config.gp_kernel_scale` if a number, else ("auto") `auto_kernel_scale` of the input
    projection W_in x of `auto_sample` (a seeded subsample of the scaled train x). The input projection
    is frozen, so the GP layer's input starts as exactly this h and the residual layers (spectrally
    normalised, ||W_k|| <= 0.9) only add bounded, learned corrections to it.
    """

    def __init__(
        self,
        input_dim: int,
        config: ModelConfig,
        kernel_scale: float | None = None,
        auto_sample: np.ndarray | None = None,
    ) -> None:
        super().__init__(name="sngp_resnet")
        self.config = config
        self.num_members = 1
        hidden = config.num_hidden
        with _GLOBAL_SEED_LOCK:
            tf_keras.utils.set_random_seed(member_seed(config.seed, 0, INIT_STREAM))
            self.input_layer = tf_keras.layers.Dense(hidden, trainable=False, name="input_projection")
            self.dense_layers = [
                nlp_layers.SpectralNormalization(
                    tf_keras.layers.Dense(hidden, activation="relu"),
                    norm_multiplier=config.spec_norm_bound,
                    iteration=config.spec_norm_iterations,
                )
                for _ in range(config.num_layers)
            ]
            self.hidden_features(tf.zeros((1, input_dim)), training=False)
            self.kernel_scale = self._kernel_scale(config, kernel_scale, auto_sample)
            self.classifier = nlp_layers.RandomFeatureGaussianProcess(
                config.num_classes,
                num_inducing=config.num_inducing,
                gp_cov_momentum=config.gp_cov_momentum,
                gp_cov_ridge_penalty=config.gp_cov_ridge_penalty,
                gp_kernel_scale=self.kernel_scale,
            )
            self.classifier(tf.zeros((1, hidden)), training=False)
        # P^{-1}, set by finalize(); not saved (recomputed from the saved precision matrix on load).
        self.feature_covariance = tf.Variable(
            tf.eye(config.num_inducing), trainable=False, name="feature_covariance"
        )

    def _kernel_scale(
        self, config: ModelConfig, kernel_scale: float | None, auto_sample: np.ndarray | None
    ) -> float:
        if kernel_scale is not None:
            return float(kernel_scale)
        if config.gp_kernel_scale != AUTO:
            return float(config.gp_kernel_scale)
        if auto_sample is None:
            raise ValueError("gp_kernel_scale: 'auto' needs the train x to choose from (auto_sample)")
        h = self.input_layer(tf.constant(auto_sample, dtype=tf.float32)).numpy()
        return auto_kernel_scale(h)

    @property
    def all_weights(self) -> list[tf.Variable]:
        return [w for w in self.weights if w is not self.feature_covariance]

    def hidden_features(
        self, x: tf.Tensor, training: bool, dropout_seed: tf.Tensor | None = None
    ) -> tf.Tensor:
        h = self.input_layer(x)
        for k, layer in enumerate(self.dense_layers):
            # training must be explicit: tf-models' SpectralNormalization runs power iteration (and
            # rescales its kernel) whenever training is None.
            resid = layer(h, training=training)
            h = h + _dropout(resid, self.config.dropout_rate, dropout_seed if training else None, k)
        return h

    def train_logits(self, x_members: tf.Tensor, dropout_seed: tf.Tensor) -> tf.Tensor:
        h = self.hidden_features(x_members[0], training=True, dropout_seed=dropout_seed)
        logits, _ = self.classifier(h, training=True)  # training=True also accumulates the precision
        return logits[None]

    def regularization_loss(self) -> tf.Tensor:
        return tf.add_n(self.losses) if self.losses else tf.constant(0.0)

    def on_epoch_begin(self, epoch: int) -> None:
        if epoch > 0:
            self.classifier.reset_covariance_matrix()

    def finalize(self) -> None:
        precision = self.classifier._gp_cov_layer.precision_matrix
        self.feature_covariance.assign(tf.linalg.inv(precision))

    def random_features(self, h: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """GP logits and random features phi(h), following RandomFeatureGaussianProcess.call."""
        gp = self.classifier
        gp_inputs = h
        if gp.normalize_input:
            gp_inputs = gp._input_norm_layer(gp_inputs)
        elif gp.use_custom_random_features:
            gp_inputs = gp_inputs * tf.cast(gp.gp_input_scale, h.dtype)
        phi = gp._random_feature(gp_inputs)
        if gp.scale_random_features:
            phi = phi * tf.cast(gp.gp_feature_scale, h.dtype)
        logits = gp._gp_output_layer(phi) + gp._gp_output_bias
        return logits, phi

    def logits_and_variance(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Posterior-mean logits (N, C) and the predictive variance diag (N,), O(N) memory."""
        logits, phi = self.random_features(self.hidden_features(x, training=False))
        ridge = self.classifier._gp_cov_layer.ridge_penalty
        variance = ridge * tf.reduce_sum(tf.matmul(phi, self.feature_covariance) * phi, axis=-1)
        return logits, variance

    def mean_field_logits(self, x: tf.Tensor) -> tf.Tensor:
        logits, variance = self.logits_and_variance(x)
        return logits / tf.sqrt(1.0 + self.config.mean_field_factor * variance)[:, None]
