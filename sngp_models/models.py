"""The four uncertainty methods behind one scikit-learn-like interface.

    make_model(method, **config) -> model;  model.fit(x, y) -> model
    model.predict_proba(x) -> (N, C);  model.predict_with_uncertainty(x) -> Prediction(probs, uncertainty)
    model.save(path);  load_model(path) -> model (exact round trip)

The uncertainty score is the study's p(1-p) generalised to C classes: (1 - sum_c p_c^2) / 2.
Every model carries its `feature_names`, `class_names` and, with `standardize=True`, its input scaling
(fitted on the train x in `fit`, applied to every prediction, saved and restored); see interface.Classifier.
Prediction runs in batches of `predict_batch_size` rows through one compiled function per model.
A fifth, optional method `exact_gp` (exact_gp.py, scikit-learn, no TensorFlow) shares this interface and
the save format (interface.py); make_model and load_model dispatch to it too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .config import AUTO, RELEVANT_FIELDS, ModelConfig, check_method
from .exact_gp import ExactGPModel
from .interface import FORMAT_VERSION, Classifier, Prediction, read_model_dir, write_model_dir  # noqa: F401 (re-exported)
from .networks import ResNetMembers, SNGPResNet, kernel_scale_sample
from .tf_setup import tf
from .training import EpochCallback, fit_network

MC_SEED_STREAM = 0x5EED


def _uncertainty(probs: tf.Tensor) -> tf.Tensor:
    return 0.5 * (1.0 - tf.reduce_sum(tf.square(probs), axis=-1))


class UncertaintyModel(Classifier):
    """Shared behaviour: validation, batched prediction, saving. Subclasses define the net and one batch."""

    method: str = ""

    def __init__(self, config: ModelConfig | None = None) -> None:
        self.config = config or ModelConfig()
        self.net = None
        self.history_: dict[str, list[float]] = {}
        self._predict_fn = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method!r}, seed={self.config.seed})"

    # --- subclass hooks -------------------------------------------------------------------------
    def _build_net(self, input_dim: int, x: np.ndarray | None = None):
        """The method's network; `x` is the (scaled) train x when building for `fit`, None on load."""
        return ResNetMembers(input_dim, self.config, num_members=1)

    def _batch_probs(self, x: tf.Tensor, batch_index: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    # --- public interface -----------------------------------------------------------------------
    def fit(
        self,
        x,
        y,
        on_epoch_end: EpochCallback | None = None,
        feature_names: list[str] | None = None,
        class_names: list[str] | None = None,
    ) -> UncertaintyModel:
        """Train on x (N, D) float and y (N,) int labels; `on_epoch_end(epoch, {"loss", "accuracy"})`.

        `feature_names` (D strings, default "x0".."x{D-1}") and `class_names` (num_classes strings,
        default "0".."C-1") are stored as `model.feature_names` / `model.class_names` and saved.
        """
        x, y = self.prepare_fit(x, y, feature_names, class_names)
        self.net = self._build_net(self.input_dim, x)
        self._predict_fn = None
        self.history_ = fit_network(self.net, x, y, self.config, on_epoch_end)
        return self

    def is_fitted(self) -> bool:
        return self.net is not None

    def predict_with_uncertainty(self, x) -> Prediction:
        x = self.prepare_predict(x)
        fn = self._compiled_predict()
        size = self.config.predict_batch_size
        probs = np.empty((x.shape[0], self.config.num_classes), dtype=np.float32)
        unc = np.empty((x.shape[0],), dtype=np.float32)
        for b, start in enumerate(range(0, x.shape[0], size)):
            xb = self.scale(x[start : start + size])
            p, u = fn(tf.constant(xb), tf.constant(b, dtype=tf.int64))
            probs[start : start + size] = p.numpy()
            unc[start : start + size] = u.numpy()
        return Prediction(probs=probs, uncertainty=unc)

    def save(self, path: str | os.PathLike) -> Path:
        """Write config + weights atomically: a directory appears at `path` only once complete."""
        self.check_fitted()
        weights = {f"w{i:03d}": v.numpy() for i, v in enumerate(self.net.all_weights)}
        meta = {
            "method": self.method,
            "config": self.config.to_dict(),
            **self.interface_meta(),
            "history": self.history_,
            "weight_shapes": [list(w.shape) for w in weights.values()],
        }
        return write_model_dir(path, meta, lambda tmp: np.savez(tmp / "weights.npz", **weights))

    def restore(self, path: Path, meta: dict[str, Any]) -> UncertaintyModel:
        """Fill this (unfitted) model from a directory `interface.read_model_dir` has checked."""
        self.restore_interface(meta)
        self.net = self._build_net(self.input_dim)
        with np.load(path / "weights.npz") as weights:
            arrays = [weights[f"w{i:03d}"] for i in range(len(weights.files))]
        variables = self.net.all_weights
        if len(arrays) != len(variables) or any(a.shape != tuple(v.shape) for a, v in zip(arrays, variables)):
            raise ValueError(
                f"{path}: saved weights do not match a {meta['method']} network with this config"
            )
        for var, arr in zip(variables, arrays):
            var.assign(arr)
        self.net.finalize()
        self.history_ = meta.get("history", {})
        return self

    # --- internals ------------------------------------------------------------------------------
    def _compiled_predict(self):
        if self._predict_fn is None:
            # autograph=False: plain tensor code, nothing to convert (see training.fit_network's loop)
            @tf.function(
                input_signature=[
                    tf.TensorSpec([None, self.input_dim], tf.float32),
                    tf.TensorSpec([], tf.int64),
                ],
                autograph=False,
            )
            def predict(x, batch_index):
                probs = self._batch_probs(x, batch_index)
                return probs, _uncertainty(probs)

            self._predict_fn = predict
        return self._predict_fn


class DeterministicModel(UncertaintyModel):
    """The tutorial's DeepResNet: one softmax over the logits of one network."""

    method = "deterministic"

    def _batch_probs(self, x, batch_index):
        return tf.nn.softmax(self.net.logits(x)[0], axis=-1)


class MCDropoutModel(UncertaintyModel):
    """The deterministic net, called `num_mc_samples` times with dropout on; softmax averaged.

    All passes run as one batched forward (the batch tiled K times). Masks are stateless and seeded by
    (seed, batch index), so a prediction is reproducible, also after save/load.
    """

    method = "mc_dropout"

    @classmethod
    def from_deterministic(
        cls, model: DeterministicModel, config: ModelConfig | None = None
    ) -> MCDropoutModel:
        """Reuse a trained deterministic net (the tutorial does exactly this) instead of training again.

        `config` may change prediction settings (num_mc_samples, predict_batch_size) but not the fields
        that define the trained net (dropout_rate, architecture, training, seed): the net keeps its own,
        and save/load rebuilds it from `config`, so a mismatch would break the exact round trip.
        """
        model.check_fitted()
        config = config or model.config
        for name in RELEVANT_FIELDS["deterministic"]:
            if getattr(config, name) != getattr(model.config, name):
                raise ValueError(
                    f"{name}: must equal the deterministic model's {getattr(model.config, name)!r} "
                    f"(it defines the trained net), got {getattr(config, name)!r}"
                )
        new = cls(config)
        new.copy_interface(model)
        new.net, new.history_ = model.net, dict(model.history_)
        return new

    def _batch_probs(self, x, batch_index):
        k = self.config.num_mc_samples
        seed = tf.random.experimental.stateless_fold_in(
            tf.constant([self.config.seed, MC_SEED_STREAM], tf.int64), batch_index
        )
        tiled = tf.tile(x, [k, 1])  # (K*B, D): every pass gets its own dropout masks
        logits = self.net.logits(tiled, dropout_seed=seed)[0]
        probs = tf.nn.softmax(tf.reshape(logits, [k, -1, self.config.num_classes]), axis=-1)
        return tf.reduce_mean(probs, axis=0)


class DeepEnsembleModel(UncertaintyModel):
    """`ensemble_size` independently initialised DeepResNets, one batched graph; softmax averaged."""

    method = "deep_ensemble"

    def _build_net(self, input_dim, x=None):
        return ResNetMembers(input_dim, self.config, num_members=self.config.ensemble_size)

    def _batch_probs(self, x, batch_index):
        return tf.reduce_mean(tf.nn.softmax(self.net.logits(x), axis=-1), axis=0)


class SNGPModel(UncertaintyModel):
    """Spectral-normalised ResNet with a random-feature GP output; mean-field softmax, single pass.

    `gp_kernel_scale_` is the random features' kernel scale in use: `config.gp_kernel_scale`, or with
    "auto" the value chosen from the train data at fit time (networks.auto_kernel_scale: the squared
    median pairwise distance of the input projection of a seeded subsample of the scaled train x).
    """

    method = "sngp"

    def _build_net(self, input_dim, x=None):
        if x is None:  # load_model: the scale chosen at fit time
            net = SNGPResNet(input_dim, self.config, kernel_scale=self.gp_kernel_scale_)
        elif self.config.gp_kernel_scale == AUTO:
            net = SNGPResNet(input_dim, self.config, auto_sample=kernel_scale_sample(x, self.config.seed))
        else:
            net = SNGPResNet(input_dim, self.config)
        self.gp_kernel_scale_ = net.kernel_scale
        return net

    def interface_meta(self) -> dict[str, Any]:
        return {**super().interface_meta(), "gp_kernel_scale": self.gp_kernel_scale_}

    def restore_interface(self, meta: dict[str, Any]) -> None:
        super().restore_interface(meta)
        saved = meta.get("gp_kernel_scale", self.config.gp_kernel_scale)
        if saved == AUTO or saved is None:
            raise ValueError(
                "model.json: an sngp model with gp_kernel_scale 'auto' must record the chosen value"
            )
        self.gp_kernel_scale_ = float(saved)

    def _batch_probs(self, x, batch_index):
        return tf.nn.softmax(self.net.mean_field_logits(x), axis=-1)


_CLASSES = {
    cls.method: cls
    for cls in (DeterministicModel, SNGPModel, MCDropoutModel, DeepEnsembleModel, ExactGPModel)
}


def make_model(
    method: str, config: ModelConfig | None = None, **overrides: Any
) -> UncertaintyModel | ExactGPModel:
    """A new, unfitted model; any ModelConfig field by name overrides the study's defaults."""
    check_method(method)
    base = config.to_dict() if config is not None else {}
    return _CLASSES[method](ModelConfig.from_kwargs(**{**base, **overrides}))


def load_model(path: str | os.PathLike) -> UncertaintyModel | ExactGPModel:
    """Load a model written by `save` (any method); refuses incomplete or altered directories."""
    path = Path(path)
    meta = read_model_dir(path)
    model = make_model(meta["method"], ModelConfig.from_kwargs(**meta["config"]))
    return model.restore(path, meta)
