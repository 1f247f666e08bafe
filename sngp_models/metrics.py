"""Classification, calibration and out-of-distribution (OOD) metrics.

All functions take plain numpy arrays:

* ``probs``: predictive class probabilities, shape ``(N, C)`` with ``C >= 2``,
  entries in ``[0, 1]`` and rows summing to 1 (tolerance ``1e-3``).
* ``y_true``: integer class labels, shape ``(N,)``, values in ``[0, C)``.
* ``unc_in`` / ``unc_ood``: 1-D uncertainty scores of in-distribution and OOD
  examples; a higher score means "more likely OOD".
* ``x_query`` / ``x_train``: feature matrices of shape ``(N, D)`` / ``(M, D)`` (distance awareness).

Every input is validated and a :class:`ValueError` naming the offending
argument is raised on bad input.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from sklearn.neighbors import NearestNeighbors

__all__ = [
    "ReliabilityCurve",
    "accuracy",
    "brier",
    "classification_metrics",
    "distance_to_nearest",
    "distance_uncertainty_spearman",
    "ece",
    "nll",
    "ood_aupr",
    "ood_auroc",
    "ood_fpr95",
    "ood_metrics",
    "reliability_curve",
    "uncertainty_score",
]

_ROW_SUM_TOL = 1e-3
_DISTANCE_BATCH = 10_000
_KD_TREE_MAX_DIM = 15


# --------------------------------------------------------------------------- validation


def _float_array(values, name: str, shape: str) -> np.ndarray:
    """``values`` as a float64 array with as many dimensions as ``shape`` names, e.g. "(N, C)"."""
    ndim = len([axis for axis in shape.strip("()").split(",") if axis.strip()])
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        got = type(values).__name__
        raise ValueError(f"{name} must be a numeric array of shape {shape}; got {got}") from exc
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D with shape {shape}; got ndim={a.ndim} (shape {a.shape})")
    return a


def _check_probs(probs: np.ndarray, name: str = "probs") -> np.ndarray:
    """Return ``probs`` as a float64 ``(N, C)`` array or raise ``ValueError``."""
    p = _float_array(probs, name, "(N, C)")
    n, c = p.shape
    if n < 1:
        raise ValueError(f"{name} must contain at least one example (N >= 1); got shape {p.shape}")
    if c < 2:
        raise ValueError(f"{name} must have at least 2 classes (C >= 2); got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    if np.any(p < 0.0) or np.any(p > 1.0):
        raise ValueError(f"{name} entries must lie in [0, 1]; got min={p.min():g}, max={p.max():g}")
    row_sums = p.sum(axis=1)
    worst = float(np.max(np.abs(row_sums - 1.0)))
    if worst > _ROW_SUM_TOL:
        raise ValueError(f"{name} rows must sum to 1 (within {_ROW_SUM_TOL:g}); worst deviation is {worst:g}")
    return p


def _check_labels(y_true: np.ndarray, n: int, n_classes: int, name: str = "y_true") -> np.ndarray:
    """Return ``y_true`` as an int64 ``(n,)`` array with values in ``[0, n_classes)``."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D with shape (N,); got ndim={y.ndim} (shape {y.shape})")
    if y.shape[0] != n:
        raise ValueError(f"{name} must have the same length as probs ({n}); got {y.shape[0]}")
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{name} must contain integer class labels; got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating) and not (np.all(np.isfinite(y)) and np.all(y == np.round(y))):
        raise ValueError(f"{name} must contain integer class labels; got non-integer values")
    y = y.astype(np.int64)
    if np.any(y < 0) or np.any(y >= n_classes):
        raise ValueError(
            f"{name} labels must lie in [0, {n_classes}) (number of columns of probs); "
            f"got min={y.min()}, max={y.max()}"
        )
    return y


def _check_inputs(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = _check_probs(probs)
    y = _check_labels(y_true, p.shape[0], p.shape[1])
    return y, p


def _check_scores(scores: np.ndarray, name: str) -> np.ndarray:
    """Return a finite, non-empty 1-D float64 score array or raise ``ValueError``."""
    s = _float_array(scores, name, "(N,)")
    if s.size == 0:
        raise ValueError(f"{name} must be non-empty")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return s


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, (bool, np.bool_)) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    return int(n_bins)


def _check_features(x: np.ndarray, name: str) -> np.ndarray:
    """Return a finite, non-empty 2-D float64 ``(N, D)`` array or raise ``ValueError``."""
    a = _float_array(x, name, "(N, D)")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column; got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return a


def _ood_labels_scores(unc_in: np.ndarray, unc_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stack scores with binary labels: 0 = in-distribution, 1 = OOD (positive class)."""
    s_in = _check_scores(unc_in, "unc_in")
    s_ood = _check_scores(unc_ood, "unc_ood")
    labels = np.concatenate([np.zeros(s_in.size, dtype=np.int64), np.ones(s_ood.size, dtype=np.int64)])
    return labels, np.concatenate([s_in, s_ood])


# --------------------------------------------------------------------------- classification


def uncertainty_score(probs: np.ndarray) -> np.ndarray:
    r"""Per-example predictive uncertainty.

    .. math:: u_i = \frac{1}{2}\Bigl(1 - \sum_c p_{ic}^2\Bigr)

    i.e. half the Gini impurity. For two classes with ``p = p_{i0}`` this equals
    ``p (1 - p)`` (the quantity plotted in the SNGP tutorial): ``(1 - p^2 - (1-p)^2) / 2 = p(1-p)``.
    Range ``[0, (1 - 1/C) / 2]``; 0.25 for a uniform binary prediction.

    Args:
        probs: class probabilities, shape ``(N, C)``.

    Returns:
        Array of shape ``(N,)``.
    """
    p = _check_probs(probs)
    return 0.5 * (1.0 - np.sum(p * p, axis=1))


def accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    r"""Top-1 accuracy: :math:`\frac{1}{N}\sum_i \mathbb{1}[\arg\max_c p_{ic} = y_i]`.

    Ties in ``argmax`` resolve to the lowest class index (numpy convention).
    """
    y, p = _check_inputs(y_true, probs)
    return float(np.mean(np.argmax(p, axis=1) == y))


def nll(y_true: np.ndarray, probs: np.ndarray, eps: float = 1e-12) -> float:
    r"""Mean negative log-likelihood: :math:`-\frac{1}{N}\sum_i \log \tilde p_{i, y_i}`.

    where :math:`\tilde p = \mathrm{clip}(p, \varepsilon, 1)` avoids ``log(0)``.

    Args:
        y_true: integer labels ``(N,)``.
        probs: class probabilities ``(N, C)``.
        eps: lower clipping bound, must be in ``(0, 1)``.
    """
    if not (isinstance(eps, (int, float, np.floating)) and 0.0 < float(eps) < 1.0):
        raise ValueError(f"eps must be a float in (0, 1); got {eps!r}")
    y, p = _check_inputs(y_true, probs)
    p_true = np.clip(p[np.arange(p.shape[0]), y], float(eps), 1.0)
    return float(-np.mean(np.log(p_true)))


def brier(y_true: np.ndarray, probs: np.ndarray) -> float:
    r"""Multi-class Brier score: :math:`\frac{1}{N}\sum_i \sum_c (p_{ic} - \mathbb{1}[y_i = c])^2`.

    Range ``[0, 2]``; 0 for a perfect confident classifier, 0.5 for ``p = (0.5, 0.5)``.
    """
    y, p = _check_inputs(y_true, probs)
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def ece(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    r"""Expected calibration error with equal-width confidence bins.

    Confidence :math:`\hat c_i = \max_c p_{ic}`, prediction :math:`\hat y_i = \arg\max_c p_{ic}`.
    The interval ``[0, 1]`` is split into ``n_bins`` equal-width bins
    :math:`B_1 = [0, 1/M],\ B_b = ((b-1)/M, b/M]` for ``b > 1`` (so a confidence of
    exactly 1.0 falls into the last bin). Then

    .. math:: \mathrm{ECE} = \sum_{b:\,n_b > 0} \frac{n_b}{N}\,\bigl|\mathrm{acc}_b - \mathrm{conf}_b\bigr|

    with :math:`\mathrm{acc}_b` the mean of :math:`\mathbb{1}[\hat y_i = y_i]` and
    :math:`\mathrm{conf}_b` the mean of :math:`\hat c_i` over the examples in bin ``b``.
    Empty bins are skipped.
    """
    curve = reliability_curve(y_true, probs, n_bins)
    n = int(curve.count.sum())
    total = 0.0
    for conf_b, acc_b, n_b in zip(curve.confidence, curve.accuracy, curve.count):
        if n_b == 0:
            continue
        total += (int(n_b) / n) * abs(float(acc_b) - float(conf_b))
    return float(total)


class ReliabilityCurve(NamedTuple):
    """Per-bin statistics of :func:`reliability_curve`; arrays of length ``n_bins``."""

    confidence: np.ndarray  # mean max-probability of the examples in the bin (NaN if empty)
    accuracy: np.ndarray  # fraction of them predicted correctly (NaN if empty)
    count: np.ndarray  # number of examples in the bin (int64)


def reliability_curve(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> ReliabilityCurve:
    r"""Per-bin mean confidence, accuracy and count, with exactly the bins of :func:`ece`.

    Bins are ``[0, 1/M], ((b-1)/M, b/M]`` (``M = n_bins``). Empty bins have count 0 and NaN
    confidence and accuracy. With :math:`N = \sum_b n_b`,
    :math:`\mathrm{ECE} = \sum_{b:\,n_b > 0} \frac{n_b}{N} |\mathrm{acc}_b - \mathrm{conf}_b|`.

    Returns:
        :class:`ReliabilityCurve` ``(confidence, accuracy, count)``, a named tuple of three arrays.
    """
    n_bins = _check_n_bins(n_bins)
    y, p = _check_inputs(y_true, probs)
    conf = np.max(p, axis=1)
    correct = (np.argmax(p, axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" on the inner edges: conf == edge goes to the lower bin -> bins are (lo, hi],
    # conf == 0 goes to bin 0 and conf == 1 to the last bin.
    bin_idx = np.searchsorted(edges[1:-1], conf, side="left")
    confidence = np.full(n_bins, np.nan)
    acc = np.full(n_bins, np.nan)
    count = np.zeros(n_bins, dtype=np.int64)
    for b in range(n_bins):
        mask = bin_idx == b
        count[b] = int(mask.sum())
        if count[b]:
            confidence[b] = float(conf[mask].mean())
            acc[b] = float(correct[mask].mean())
    return ReliabilityCurve(confidence=confidence, accuracy=acc, count=count)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """All classification metrics: keys ``accuracy``, ``nll``, ``brier``, ``ece`` (default settings)."""
    y, p = _check_inputs(y_true, probs)
    return {
        "accuracy": accuracy(y, p),
        "nll": nll(y, p),
        "brier": brier(y, p),
        "ece": ece(y, p),
    }


# --------------------------------------------------------------------------- OOD detection


def ood_auroc(unc_in: np.ndarray, unc_ood: np.ndarray) -> float:
    r"""Area under the ROC curve for separating OOD (positive) from in-distribution (negative).

    Score = uncertainty. Equals :math:`P(u_{ood} > u_{in}) + \tfrac12 P(u_{ood} = u_{in})`;
    1.0 = perfect separation, 0.5 = chance, 0.0 = perfectly reversed.
    """
    labels, scores = _ood_labels_scores(unc_in, unc_ood)
    return float(roc_auc_score(labels, scores))


def ood_aupr(unc_in: np.ndarray, unc_ood: np.ndarray) -> float:
    r"""Area under the precision-recall curve with OOD as positive class (average precision).

    :math:`\mathrm{AP} = \sum_k (R_k - R_{k-1}) P_k` over decreasing score thresholds
    (``sklearn.metrics.average_precision_score``). Chance level is the OOD fraction.
    """
    labels, scores = _ood_labels_scores(unc_in, unc_ood)
    return float(average_precision_score(labels, scores))


def ood_fpr95(unc_in: np.ndarray, unc_ood: np.ndarray) -> float:
    r"""False-positive rate at 95 % true-positive rate (lower is better).

    :math:`\min\{\mathrm{FPR}(t) : \mathrm{TPR}(t) \ge 0.95\}` over all thresholds ``t`` of
    ``sklearn.metrics.roc_curve`` (OOD positive, score = uncertainty).
    """
    labels, scores = _ood_labels_scores(unc_in, unc_ood)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(np.min(fpr[tpr >= 0.95]))


def ood_metrics(unc_in: np.ndarray, unc_ood: np.ndarray) -> dict[str, float]:
    """All OOD metrics: keys ``ood_auroc``, ``ood_aupr``, ``ood_fpr95``."""
    s_in = _check_scores(unc_in, "unc_in")
    s_ood = _check_scores(unc_ood, "unc_ood")
    return {
        "ood_auroc": ood_auroc(s_in, s_ood),
        "ood_aupr": ood_aupr(s_in, s_ood),
        "ood_fpr95": ood_fpr95(s_in, s_ood),
    }


# --------------------------------------------------------------------------- distance awareness


def distance_to_nearest(
    x_query: np.ndarray, x_train: np.ndarray, batch_size: int = _DISTANCE_BATCH
) -> np.ndarray:
    r"""Euclidean distance from every query point to its nearest training point.

    :math:`d_i = \min_j \lVert x^{q}_i - x^{tr}_j \rVert_2`, computed with a scikit-learn tree
    index (KD-tree for ``D <= 15``, ball tree above) queried in batches of ``batch_size`` rows, so
    memory is O(N + M) and no N x M distance matrix is built. Trees compute each distance directly,
    so a query equal to a training point gets exactly 0 (the brute-force ``|a|^2 - 2ab + |b|^2``
    expansion can leave ~1e-7 there).

    Args:
        x_query: ``(N, D)`` points to measure.
        x_train: ``(M, D)`` training points.
        batch_size: query rows per batch (positive integer).

    Returns:
        Array of shape ``(N,)`` (float64, >= 0).
    """
    if (
        isinstance(batch_size, (bool, np.bool_))
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    q = _check_features(x_query, "x_query")
    t = _check_features(x_train, "x_train")
    if q.shape[1] != t.shape[1]:
        raise ValueError(
            f"x_query must have the same number of features as x_train ({t.shape[1]}); got {q.shape[1]}"
        )
    algorithm = "kd_tree" if t.shape[1] <= _KD_TREE_MAX_DIM else "ball_tree"
    index = NearestNeighbors(n_neighbors=1, algorithm=algorithm).fit(t)
    out = np.empty(q.shape[0], dtype=np.float64)
    for start in range(0, q.shape[0], int(batch_size)):
        dist, _ = index.kneighbors(q[start : start + int(batch_size)], return_distance=True)
        out[start : start + int(batch_size)] = dist[:, 0]
    return out


def distance_uncertainty_spearman(uncertainty: np.ndarray, distances: np.ndarray) -> float:
    r"""Spearman rank correlation between uncertainty and distance to the training data.

    +1 = uncertainty rises monotonically with distance (perfectly distance aware), 0 = unrelated,
    -1 = more certain further away. NaN-safe: if either input is constant (the rank correlation is
    undefined, e.g. a model that always predicts the same probabilities) the result is 0.0.

    Args:
        uncertainty: per-example uncertainty scores ``(N,)``.
        distances: per-example distances ``(N,)``, e.g. from :func:`distance_to_nearest`.
    """
    u = _check_scores(uncertainty, "uncertainty")
    d = _check_scores(distances, "distances")
    if u.size != d.size:
        raise ValueError(f"distances must have the same length as uncertainty ({u.size}); got {d.size}")
    if u.size < 2 or np.all(u == u[0]) or np.all(d == d[0]):
        return 0.0
    rho = float(spearmanr(u, d).statistic)
    return rho if np.isfinite(rho) else 0.0
