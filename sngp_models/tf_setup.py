"""Import TensorFlow with Keras 2 semantics (tf-models-official's layers need tf_keras)."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

if not tf.keras.__name__.startswith("tf_keras"):  # pragma: no cover - depends on import order
    raise ImportError(
        "TensorFlow was imported before sngp_models without TF_USE_LEGACY_KERAS=1, so tf.keras is Keras 3 "
        "and tf-models-official's SNGP layers will not work. Import sngp_models first, or set "
        "TF_USE_LEGACY_KERAS=1 in the environment."
    )

__all__ = ["tf", "tf_keras"]
