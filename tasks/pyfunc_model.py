"""MLflow pyfunc wrapper: `mlflow.pyfunc.load_model(uri).predict(frame)` -> predicted class, probabilities,
uncertainty, abstain (DESIGN.md's model contract).

Input: a DataFrame with the model's feature columns by name (two moons `x0`, `x1`; digits `x0`..`x63`; a
table its own column names), in any order; extra columns are ignored, missing ones are an error naming
them. The input scaling is inside the library model. Output columns: `predicted` (the class name, given
also when abstaining), `prob_<class name>` per class, `uncertainty` = (1 - sum_c p_c^2) / 2, `abstain`
(bool: uncertainty > the model's calibrated threshold). Param `abstain_threshold` (float, declared in
the signature; its default is the calibrated threshold) overrides the threshold for one call/request.

Artefacts: the saved library model directory (`model_dir`; no Keras class needs to be registered because
the library saves config + weights and rebuilds the network itself) and the abstention rule
(`abstention`: sngp_models.abstention.Abstention JSON, calibrated at evaluation on the in-distribution
test split); `unwrap_python_model().abstention` is that Abstention (threshold, target_coverage,
reference_uncertainty). The model is logged "from code" (this file is the model's code; no pickled
object) with `sngp_models` as its code path, so it loads without this project: this file imports only
MLflow, numpy, pandas and sngp_models (never `tasks` or `flows`), and no TensorFlow until load_context,
so logging a model (also on a fully cached rerun) stays cheap.

Bad input (columns, types, values, params) raises ModelInputError: an MlflowException with error code
INVALID_PARAMETER_VALUE (MLflow's scoring server answers HTTP 400 with the message, no traceback) that
is also a ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from sngp_models.abstention import Abstention

PREDICTED = "predicted"
UNCERTAINTY = "uncertainty"
ABSTAIN = "abstain"
ABSTAIN_THRESHOLD = "abstain_threshold"  # the param overriding the threshold


class ModelInputError(MlflowException, ValueError):
    """The input frame (or a param) does not fit the model (columns, types, values); the message says
    what is allowed. An MlflowException (INVALID_PARAMETER_VALUE: HTTP 400 when served) and a ValueError."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def feature_columns(input_dim: int) -> list[str]:
    """The default feature names (two moons, digits): x0 .. x{D-1}."""
    return [f"x{i}" for i in range(input_dim)]


def class_columns(class_names: Sequence[str]) -> list[str]:
    return [f"prob_{name}" for name in class_names]


def output_columns(class_names: Sequence[str]) -> list[str]:
    return [PREDICTED, *class_columns(class_names), UNCERTAINTY, ABSTAIN]


def signature(feature_names: Sequence[str], class_names: Sequence[str], threshold: float) -> ModelSignature:
    """Inputs: the feature columns (double); outputs: output_columns; params: `abstain_threshold`
    (double, default: the calibrated `threshold`)."""
    return ModelSignature(
        inputs=Schema([ColSpec("double", name) for name in feature_names]),
        outputs=Schema(
            [ColSpec("string", PREDICTED)]
            + [ColSpec("float", name) for name in [*class_columns(class_names), UNCERTAINTY]]
            + [ColSpec("boolean", ABSTAIN)]
        ),
        params=ParamSchema([ParamSpec(ABSTAIN_THRESHOLD, "double", float(threshold))]),
    )


def threshold_from(params: dict[str, Any] | None, default: float) -> float:
    """The `abstain_threshold` param (a finite number), else `default`; other params are errors."""
    params = params or {}
    unknown = sorted(set(params) - {ABSTAIN_THRESHOLD})
    if unknown:
        raise ModelInputError(f"unknown param(s) {unknown}; the model takes: {ABSTAIN_THRESHOLD} (a number)")
    value = params.get(ABSTAIN_THRESHOLD)
    if value is None:
        return float(default)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ModelInputError(f"param {ABSTAIN_THRESHOLD} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ModelInputError(f"param {ABSTAIN_THRESHOLD} must be a finite number, got {value!r}")
    return float(value)


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


def prediction_frame(
    probs: np.ndarray, uncertainty: np.ndarray, class_names: Sequence[str], threshold: float
) -> pd.DataFrame:
    """The output frame: `predicted` (class name; a categorical column, so a large batch costs one byte
    a row, not a Python string), `prob_<class name>` per class, `uncertainty`, `abstain`
    (uncertainty > threshold)."""
    predicted = pd.Categorical.from_codes(np.argmax(probs, axis=1), categories=list(class_names))
    frame = pd.DataFrame(probs, columns=class_columns(class_names))
    frame.insert(0, PREDICTED, predicted)
    frame[UNCERTAINTY] = uncertainty
    frame[ABSTAIN] = np.asarray(uncertainty, dtype=np.float64) > threshold
    return frame


class UncertaintyPyfunc(mlflow.pyfunc.PythonModel):
    """Predicts the class name, one probability column per class, `uncertainty` and `abstain`."""

    def load_context(self, context) -> None:
        import sngp_models

        self.model = sngp_models.load_model(context.artifacts["model_dir"])
        self.abstention = Abstention.load(context.artifacts["abstention"])

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        threshold = threshold_from(params, self.abstention.threshold)
        x = to_features(model_input, self.model.feature_names)
        pred = self.model.predict_with_uncertainty(x)
        return prediction_frame(pred.probs, pred.uncertainty, self.model.class_names, threshold)


# Models-from-code entry point: MLflow executes this file to obtain the model object.
mlflow.models.set_model(UncertaintyPyfunc())
