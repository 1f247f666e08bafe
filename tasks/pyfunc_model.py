"""MLflow pyfunc wrapper: `mlflow.pyfunc.load_model(uri).predict(x)` -> probabilities + uncertainty.

The saved library model directory travels as the artefact `model_dir`; no Keras class needs to be
registered because the library saves config + weights and rebuilds the network itself. The model is
logged "from code" (this file is the model's code; no pickled object), and this module does not import
TensorFlow, so logging a model (also on a fully cached rerun) stays cheap.
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, Schema


class ModelInputError(ValueError):
    """The input frame does not fit the model (columns, types, values); the message says what is allowed."""


def feature_columns(input_dim: int) -> list[str]:
    return [f"x{i}" for i in range(input_dim)]


def output_columns(num_classes: int) -> list[str]:
    return [f"prob_{c}" for c in range(num_classes)] + ["uncertainty"]


def signature(input_dim: int, num_classes: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("double", name) for name in feature_columns(input_dim)]),
        outputs=Schema([ColSpec("float", name) for name in output_columns(num_classes)]),
    )


def to_features(model_input, input_dim: int) -> np.ndarray:
    """DataFrame (named or positional columns), ndarray or list -> finite float32 (N, input_dim)."""
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
        names = feature_columns(input_dim)
        if all(n in frame.columns for n in names):
            frame = frame[names]
        if frame.shape[1] != input_dim:
            raise ModelInputError(
                f"input has {frame.shape[1]} column(s); the model expects {input_dim}: {', '.join(names)}"
            )
        bad = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
        if bad:
            raise ModelInputError(f"column(s) {bad} are not numeric; every feature must be a number")
        values = frame.to_numpy(dtype=np.float64)
    else:
        try:
            values = np.asarray(model_input, dtype=np.float64)
        except (TypeError, ValueError):
            raise ModelInputError(
                "input must be numeric: a DataFrame or an (N, D) array of numbers"
            ) from None
        if values.ndim != 2 or values.shape[1] != input_dim:
            raise ModelInputError(f"input must have shape (N, {input_dim}), got {values.shape}")
    if values.shape[0] == 0:
        raise ModelInputError("input is empty (0 rows); give at least one row")
    finite = np.isfinite(values)
    if not finite.all():
        rows = np.flatnonzero(~finite.all(axis=1))
        raise ModelInputError(
            f"input has NaN or infinite values in {len(rows)} row(s), first at row {rows[0]}"
        )
    return values.astype(np.float32)


class UncertaintyPyfunc(mlflow.pyfunc.PythonModel):
    """Predicts one probability column per class plus `uncertainty` = (1 - sum_c p_c^2) / 2."""

    def load_context(self, context) -> None:
        import sngp_models

        self.model = sngp_models.load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        x = to_features(model_input, self.model.input_dim)
        pred = self.model.predict_with_uncertainty(x)
        columns = output_columns(pred.probs.shape[1])
        return pd.DataFrame(np.column_stack([pred.probs, pred.uncertainty]), columns=columns)


# Models-from-code entry point: MLflow executes this file to obtain the model object.
mlflow.models.set_model(UncertaintyPyfunc())
