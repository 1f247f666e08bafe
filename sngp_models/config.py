"""One typed configuration object for every method; its defaults are the study's settings.

Plain dataclass (no pydantic) so the library stays usable with TensorFlow, numpy and scikit-learn only.
Every bad value raises ValueError naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

# The four methods of the study; pipelines iterate over these.
METHODS = ("deterministic", "sngp", "mc_dropout", "deep_ensemble")
# Optional methods behind the same interface, not part of the study's comparison by default.
EXTRA_METHODS = ("exact_gp",)
ALL_METHODS = METHODS + EXTRA_METHODS
# ModelConfig.gp_kernel_scale's value for "choose it from the data".
AUTO = "auto"

# Fields that change what a given method learns or predicts. Used to key caches so that changing one
# method's setting retrains only that method.
_COMMON = (
    "num_classes",
    "standardize",
    "num_layers",
    "num_hidden",
    "dropout_rate",
    "epochs",
    "batch_size",
    "learning_rate",
    "seed",
)
RELEVANT_FIELDS = {
    "deterministic": _COMMON,
    "mc_dropout": _COMMON + ("num_mc_samples",),
    "deep_ensemble": _COMMON + ("ensemble_size",),
    "sngp": _COMMON
    + (
        "spec_norm_bound",
        "spec_norm_iterations",
        "num_inducing",
        "gp_cov_momentum",
        "gp_cov_ridge_penalty",
        "gp_kernel_scale",
        "mean_field_factor",
    ),
    "exact_gp": ("num_classes", "standardize", "seed", "gp_max_train"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, training and prediction settings (defaults = the SNGP tutorial).

    One `seed` drives all randomness: weight initialisation, the frozen input projection, SNGP's random
    features, mini-batch order, dropout masks in training and MC Dropout's masks at prediction time.
    """

    num_classes: int = 2
    # Standardise the inputs inside the model: `fit` takes the train x's per-feature mean and std (a
    # constant feature keeps std 1, i.e. is only centred), every prediction applies them, and they are
    # saved with the model. False (the study's two moons) feeds x as given.
    standardize: bool = False
    num_layers: int = 6
    num_hidden: int = 128
    dropout_rate: float = 0.1
    # SNGP
    spec_norm_bound: float = 0.9
    spec_norm_iterations: int = 1
    num_inducing: int = 1024
    gp_cov_momentum: float = -1.0
    gp_cov_ridge_penalty: float = 1.0
    # The random features' squared RBF length scale (see networks.SNGPResNet), or "auto": chosen from the
    # train data at fit time by the median heuristic (networks.auto_kernel_scale); the value used is the
    # fitted model's `gp_kernel_scale_`.
    gp_kernel_scale: float | str = 1.0
    mean_field_factor: float = math.pi / 8
    # MC Dropout / Deep Ensemble
    num_mc_samples: int = 10
    ensemble_size: int = 10
    # Exact GP (optional method): the classifier is O(N^3) in the training points, so it trains on at
    # most this many, drawn at random (seeded) without replacement when the training set is larger.
    # 1000 = the whole two-moons training set (fits in a few seconds).
    gp_max_train: int = 1000
    # Training
    epochs: int = 100
    batch_size: int = 128
    learning_rate: float = 1e-4
    seed: int = 0
    # Prediction: rows per batch, so any N fits in memory.
    predict_batch_size: int = 10_000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "gp_kernel_scale":
                self._check_kernel_scale(value)
            elif f.type in ("bool", bool):
                if not isinstance(value, (bool, np.bool_)):
                    raise ValueError(f"{f.name}: expected true or false, got {value!r}")
                object.__setattr__(self, f.name, bool(value))
            elif f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    if isinstance(value, float) and value.is_integer():
                        object.__setattr__(self, f.name, int(value))
                    else:
                        raise ValueError(f"{f.name}: expected an integer, got {value!r}")
            elif f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{f.name}: expected a number, got {value!r}")
                if not math.isfinite(value):
                    raise ValueError(f"{f.name}: expected a finite number, got {value!r}")
                object.__setattr__(self, f.name, float(value))
        checks = [
            ("num_classes", self.num_classes >= 2, "must be an integer >= 2"),
            ("num_layers", self.num_layers >= 0, "must be an integer >= 0"),
            ("num_hidden", self.num_hidden >= 1, "must be an integer >= 1"),
            ("dropout_rate", 0.0 <= self.dropout_rate < 1.0, "must be in [0, 1)"),
            ("spec_norm_bound", self.spec_norm_bound > 0, "must be > 0"),
            ("spec_norm_iterations", self.spec_norm_iterations >= 1, "must be an integer >= 1"),
            ("num_inducing", self.num_inducing >= 1, "must be an integer >= 1"),
            (
                "gp_cov_momentum",
                self.gp_cov_momentum == -1.0 or 0.0 < self.gp_cov_momentum < 1.0,
                "must be -1 (exact sum over an epoch) or in (0, 1)",
            ),
            ("gp_cov_ridge_penalty", self.gp_cov_ridge_penalty > 0, "must be > 0"),
            ("mean_field_factor", self.mean_field_factor >= 0, "must be >= 0 (0 disables the adjustment)"),
            ("num_mc_samples", self.num_mc_samples >= 1, "must be an integer >= 1"),
            ("ensemble_size", self.ensemble_size >= 1, "must be an integer >= 1"),
            ("gp_max_train", self.gp_max_train >= 2, "must be an integer >= 2"),
            ("epochs", self.epochs >= 1, "must be an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "must be an integer >= 1"),
            ("learning_rate", self.learning_rate > 0, "must be > 0"),
            ("seed", 0 <= self.seed < 2**31, "must be an integer in [0, 2**31)"),
            ("predict_batch_size", self.predict_batch_size >= 1, "must be an integer >= 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}: {allowed}, got {getattr(self, name)!r}")

    def _check_kernel_scale(self, value: Any) -> None:
        if isinstance(value, str) and value == AUTO:
            return
        allowed = f"must be a number > 0 or {AUTO!r}"
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)
        ):
            raise ValueError(f"gp_kernel_scale: {allowed}, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"gp_kernel_scale: {allowed}, got {value!r}")
        object.__setattr__(self, "gp_kernel_scale", float(value))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ModelConfig:
        """Build from keyword arguments, rejecting unknown names with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def relevant(self, method: str) -> dict[str, Any]:
        """The fields that change what `method` learns or predicts (for cache keys and params)."""
        check_method(method)
        return {name: getattr(self, name) for name in RELEVANT_FIELDS[method]}


def check_method(method: str) -> str:
    """Accept the study's methods and the optional extra ones (ALL_METHODS)."""
    if method not in ALL_METHODS:
        raise ValueError(f"method: unknown method {method!r}; allowed: {', '.join(ALL_METHODS)}")
    return method
