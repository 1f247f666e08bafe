"""Input checks shared by every method: one clear ValueError naming the argument and what is allowed."""

from __future__ import annotations

import numpy as np


class NotFittedError(ValueError, AttributeError):
    """Raised when predicting or saving with a model that has not been fitted (as in scikit-learn)."""


def check_features(x, name: str = "x", input_dim: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{name}: must be a numeric array of shape (N, D), could not convert: {exc}"
        ) from None
    if arr.ndim != 2:
        raise ValueError(f"{name}: must be 2-D with shape (N, D), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: is empty (0 rows); at least one row is required")
    if input_dim is not None and arr.shape[1] != input_dim:
        raise ValueError(
            f"{name}: has {arr.shape[1]} feature(s) per row, but the model was fitted on {input_dim}"
        )
    if arr.shape[1] == 0:
        raise ValueError(f"{name}: has 0 features per row; at least one is required")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(
            f"{name}: contains NaN or infinite values in {bad} row(s); all values must be finite"
        )
    return arr


def check_labels(y, n_rows: int, num_classes: int, name: str = "y") -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name}: must be 1-D with shape (N,), got shape {arr.shape}")
    if arr.shape[0] != n_rows:
        raise ValueError(f"{name}: has {arr.shape[0]} labels but x has {n_rows} rows; they must match")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name}: must hold integer class labels in [0, {num_classes - 1}]")
    elif arr.dtype.kind not in "iub":
        raise ValueError(
            f"{name}: must hold integer class labels in [0, {num_classes - 1}], got dtype {arr.dtype}"
        )
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(
            f"{name}: labels must be in [0, {num_classes - 1}] (num_classes={num_classes}), "
            f"got values in [{arr.min()}, {arr.max()}]"
        )
    return arr
