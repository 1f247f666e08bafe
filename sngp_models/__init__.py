"""Uncertainty-aware classifiers from the SNGP study behind one scikit-learn-like interface.

    model = sngp_models.make_model("sngp", epochs=100, seed=0)
    model.fit(x_train, y_train)
    pred = model.predict_with_uncertainty(x)      # pred.probs (N, C), pred.uncertainty (N,)
    model.save(path); same = sngp_models.load_model(path)
    data = sngp_models.load_table("data/*.parquet", label="outcome")   # your own CSV/Parquet table

Importing this package is cheap: TensorFlow is imported only when a model is made or loaded, and
`TF_USE_LEGACY_KERAS=1` is set here first, because tf-models-official's layers need Keras 2 semantics.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# Silence TensorFlow's C++ start-up chatter unless the user asked for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from .config import METHODS, ModelConfig  # noqa: E402

__all__ = [
    "METHODS",
    "ModelConfig",
    "make_model",
    "load_model",
    "Prediction",
    "load_table",
    "TableData",
    "TableError",
]

_LAZY = {
    "make_model": "models",
    "load_model": "models",
    "Prediction": "interface",
    # pandas (and pyarrow for Parquet) only when a table is read.
    "load_table": "table",
    "TableData": "table",
    "TableError": "table",
}


def __getattr__(name: str):
    # Lazy so that data/metrics/plots (and the pipeline's warm path) never pay TensorFlow's import.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'sngp_models' has no attribute {name!r}")
