"""Optional fifth method `exact_gp`: an exact Gaussian-process classifier, the reference SNGP approximates.

scikit-learn's `GaussianProcessClassifier` with kernel ConstantKernel * RBF (hyperparameters fitted by
maximising the Laplace-approximated marginal likelihood; multi-class as one-vs-rest), behind the same
interface as the four study methods (models.py). The RBF length scale starts at the median pairwise
distance of the training points (the "median heuristic"): from the default 1.0, on standardised 64-D
digits every point looks unrelated to every other, and the optimiser ran off to the upper bound
(a constant kernel, test accuracy 0.20); from the median it finds 0.99. On two moons both starts reach
the same optimum.

    model = make_model("exact_gp", seed=0); model.fit(x, y)
    pred = model.predict_with_uncertainty(x)     # pred.probs (N, C), pred.uncertainty (N,)
    model.save(path); same = load_model(path)    # exact round trip

With `standardize=True` the inputs are standardised with the train statistics first
(interface.Classifier), and the median heuristic runs on the standardised points.

Cost is O(N^3) in the training points, so at most `gp_max_train` of them (ModelConfig, default 1000 =
the whole two-moons training set: 5-15 s on 2 busy shared cores) are used; a larger training set is
subsampled at random (seeded by `seed`). Prediction runs in batches of `predict_batch_size` rows.
No TensorFlow here.

BLAS runs single-threaded inside fit and predict (threadpoolctl; process-wide while they run): the
hyperparameter search makes many 1000 x 1000 factorisations, and with OpenBLAS's two threads on a
shared 2-core machine one fit took 35-86 s instead of 5-15 s single-threaded.

The fitted classifier is saved with joblib (pickle) inside the checksummed save directory: the manifest
detects corruption, not tampering, so load only directories you trust.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from scipy.spatial.distance import pdist
from sklearn.gaussian_process import GaussianProcessClassifier
from sklearn.gaussian_process.kernels import RBF, ConstantKernel
from threadpoolctl import threadpool_limits

from .config import ModelConfig
from .interface import Classifier, Prediction, uncertainty_from_probs, write_model_dir

GP_FILE = "gp.joblib"
_SUBSAMPLE_STREAM = 0x6B
_MEDIAN_STREAM = 0x6C
_MEDIAN_MAX_POINTS = 1000


class ExactGPModel(Classifier):
    """Exact GP classification (Laplace approximation) with the shared uncertainty-model interface."""

    method = "exact_gp"

    def __init__(self, config: ModelConfig | None = None) -> None:
        self.config = config or ModelConfig()
        self.gp_: GaussianProcessClassifier | None = None
        self.history_: dict[str, list[float]] = {}
        self.n_train_used_: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method!r}, seed={self.config.seed})"

    # --- public interface -----------------------------------------------------------------------
    def fit(self, x, y, on_epoch_end=None, feature_names=None, class_names=None) -> ExactGPModel:
        """Fit on x (N, D) float and y (N,) int labels (at most `gp_max_train` rows are used).

        There are no epochs: `on_epoch_end(0, {"loss", "accuracy"})` is called once with the mean
        cross-entropy and the accuracy on the whole training set, which is also `history_`.
        `feature_names` / `class_names` as for the other methods (models.UncertaintyModel.fit).
        """
        raw = x
        x, y = self.prepare_fit(x, y, feature_names, class_names)
        x_fit, y_fit = self._subsample(x, y)
        if np.unique(y_fit).size < 2:
            raise ValueError(
                f"y: exact_gp needs at least 2 distinct classes in the training labels, "
                f"got only {np.unique(y_fit).tolist()}"
            )
        gp = GaussianProcessClassifier(
            kernel=ConstantKernel(1.0) * RBF(self._initial_length_scale(x_fit)),
            random_state=self.config.seed,
            # Reuses the Laplace mode between optimiser steps: same result, several times faster.
            warm_start=True,
        )
        with threadpool_limits(limits=1, user_api="blas"):
            gp.fit(x_fit.astype(np.float64), y_fit)
        self.gp_, self.n_train_used_ = gp, int(x_fit.shape[0])
        probs = self.predict_proba(raw)
        p_true = np.clip(probs[np.arange(y.size), y].astype(np.float64), 1e-12, 1.0)
        logs = {"loss": float(-np.mean(np.log(p_true))), "accuracy": float(np.mean(probs.argmax(1) == y))}
        self.history_ = {name: [value] for name, value in logs.items()}
        if on_epoch_end is not None:
            on_epoch_end(0, logs)
        return self

    def is_fitted(self) -> bool:
        return self.gp_ is not None

    def predict_with_uncertainty(self, x) -> Prediction:
        x = self.prepare_predict(x)
        size = self.config.predict_batch_size
        probs = np.empty((x.shape[0], self.config.num_classes), dtype=np.float32)
        unc = np.empty((x.shape[0],), dtype=np.float32)
        with threadpool_limits(limits=1, user_api="blas"):
            for start in range(0, x.shape[0], size):
                p = self._batch_probs(self.scale(x[start : start + size]))
                probs[start : start + size] = p
                unc[start : start + size] = uncertainty_from_probs(p)
        return Prediction(probs=probs, uncertainty=unc)

    def save(self, path: str | os.PathLike) -> Path:
        """Write config + fitted classifier atomically (same directory format as the other methods)."""
        self.check_fitted()
        meta = {
            "method": self.method,
            "config": self.config.to_dict(),
            **self.interface_meta(),
            "history": self.history_,
            "n_train_used": self.n_train_used_,
            "classes": [int(c) for c in self.gp_.classes_],
        }
        return write_model_dir(path, meta, lambda tmp: joblib.dump(self.gp_, tmp / GP_FILE))

    def restore(self, path: Path, meta: dict[str, Any]) -> ExactGPModel:
        """Fill this (unfitted) model from a directory `interface.read_model_dir` has checked."""
        gp = joblib.load(Path(path) / GP_FILE)
        if not isinstance(gp, GaussianProcessClassifier) or [int(c) for c in gp.classes_] != meta["classes"]:
            raise ValueError(f"{path}: {GP_FILE} does not hold the classifier model.json describes")
        self.restore_interface(meta)
        self.gp_ = gp
        self.history_ = meta.get("history", {})
        self.n_train_used_ = meta.get("n_train_used")
        return self

    # --- internals ------------------------------------------------------------------------------
    def _subsample(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        limit = self.config.gp_max_train
        if x.shape[0] <= limit:
            return x, y
        rng = np.random.default_rng([self.config.seed, _SUBSAMPLE_STREAM])
        index = np.sort(rng.choice(x.shape[0], size=limit, replace=False))
        return x[index], y[index]

    def _initial_length_scale(self, x: np.ndarray) -> float:
        """Median pairwise distance of (at most 1000, seeded) training points; 1.0 if they coincide."""
        if x.shape[0] > _MEDIAN_MAX_POINTS:
            rng = np.random.default_rng([self.config.seed, _MEDIAN_STREAM])
            x = x[rng.choice(x.shape[0], size=_MEDIAN_MAX_POINTS, replace=False)]
        median = float(np.median(pdist(x.astype(np.float64))))
        return median if np.isfinite(median) and median > 0 else 1.0

    def _batch_probs(self, x: np.ndarray) -> np.ndarray:
        """(B, num_classes) float64; classes absent from the training labels get probability 0."""
        p = self.gp_.predict_proba(x.astype(np.float64))
        full = np.zeros((x.shape[0], self.config.num_classes), dtype=np.float64)
        full[:, self.gp_.classes_] = p
        return full
