"""MLflow pyfunc wrapper: `mlflow.pyfunc.load_model(uri).predict(frame)` -> predicted class, probabilities,
uncertainty (DESIGN.md's model contract).

Input: a DataFrame with the model's feature columns by name (two moons `x0`, `x1`; digits `x0`..`x63`; a
table its own column names), in any order; extra columns are ignored, missing ones are an error naming
them. The input scaling is inside the library model. Output columns: `predicted` (the class name),
`prob_<class name>` per class, `uncertainty` = (1 - sum_c p_c^2) / 2.

The saved library model directory travels as the artefact `model_dir`; no Keras class needs to be
registered because the library saves config + weights and rebuilds the network itself. The model is
logged "from code" (this file is the model's code; no pickled object), and this module does not import
TensorFlow, so logging a model (also on a fully cached rerun) stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, Schema

PREDICTED = "predicted"
UNCERTAINTY = "uncertainty"


class ModelInputError(ValueError):
    """The input frame does not fit the model (columns, types, values); the message says what is allowed."""


def feature_columns(input_dim: int) -> list[str]:
    """The default feature names (two moons, digits): x0 .. x{D-1}."""
    return [f"x{i}" for i in range(input_dim)]


def class_columns(class_names: Sequence[str]) -> list[str]:
    return [f"prob_{name}" for name in class_names]


def output_columns(class_names: Sequence[str]) -> list[str]:
    return [PREDICTED, *class_columns(class_names), UNCERTAINTY]


def signature(feature_names: Sequence[str], class_names: Sequence[str]) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("double", name) for name in feature_names]),
        outputs=Schema(
            [ColSpec("string", PREDICTED)]
            + [ColSpec("float", name) for name in [*class_columns(class_names), UNCERTAINTY]]
        ),
    )


def to_features(model_input, feature_names: Sequence[str]) -> np.ndarray:
    """DataFrame (the feature columns by name, any order, others ignored), ndarray or list (columns in
    the model's order) -> finite float32 (N, D)."""
    names = list(feature_names)
    input_dim = len(names)
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
        named = [n for n in names if n in frame.columns]
        if named:
            missing = [n for n in names if n not in frame.columns]
            if missing:
                raise ModelInputError(
                    f"input lacks the feature column(s) {missing}; the model expects: {', '.join(names)}"
                )
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


def prediction_frame(probs: np.ndarray, uncertainty: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """The output frame: `predicted` (class name; a categorical column, so a large batch costs one byte
    a row, not a Python string), `prob_<class name>` per class, `uncertainty`."""
    predicted = pd.Categorical.from_codes(np.argmax(probs, axis=1), categories=list(class_names))
    frame = pd.DataFrame(probs, columns=class_columns(class_names))
    frame.insert(0, PREDICTED, predicted)
    frame[UNCERTAINTY] = uncertainty
    return frame


class UncertaintyPyfunc(mlflow.pyfunc.PythonModel):
    """Predicts the class name, one probability column per class and `uncertainty`."""

    def load_context(self, context) -> None:
        import sngp_models

        self.model = sngp_models.load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        x = to_features(model_input, self.model.feature_names)
        pred = self.model.predict_with_uncertainty(x)
        return prediction_frame(pred.probs, pred.uncertainty, self.model.class_names)


# Models-from-code entry point: MLflow executes this file to obtain the model object.
mlflow.models.set_model(UncertaintyPyfunc())
