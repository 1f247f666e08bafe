"""Hand-checked tests for sngp_models.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sngp_models import metrics as M

# --------------------------------------------------------------------------- fixtures

Y4 = np.array([0, 1, 0, 1])
PERFECT = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
CONSTANT = np.full((4, 2), 0.5)


# --------------------------------------------------------------------------- uncertainty


def test_uncertainty_binary_equals_p_one_minus_p() -> None:
    p0 = np.array([0.0, 0.1, 0.5, 0.9, 1.0])
    probs = np.stack([p0, 1 - p0], axis=1)
    np.testing.assert_allclose(M.uncertainty_score(probs), p0 * (1 - p0), atol=1e-15)


def test_uncertainty_constant_and_multiclass() -> None:
    np.testing.assert_allclose(M.uncertainty_score(CONSTANT), 0.25)
    # 3 uniform classes: (1 - 3 * 1/9) / 2 = 1/3
    np.testing.assert_allclose(M.uncertainty_score(np.full((2, 3), 1 / 3)), 1 / 3)
    assert M.uncertainty_score(PERFECT).shape == (4,)
    np.testing.assert_allclose(M.uncertainty_score(PERFECT), 0.0)


# --------------------------------------------------------------------------- classification


def test_perfect_classifier() -> None:
    out = M.classification_metrics(Y4, PERFECT)
    assert set(out) == {"accuracy", "nll", "brier", "ece"}
    assert out["accuracy"] == 1.0
    assert out["nll"] == pytest.approx(0.0, abs=1e-12)
    assert out["brier"] == 0.0
    assert out["ece"] == 0.0
    assert all(isinstance(v, float) for v in out.values())


def test_constant_predictor() -> None:
    # argmax of (0.5, 0.5) is class 0 -> correct on the two class-0 rows -> accuracy 2/4.
    assert M.accuracy(Y4, CONSTANT) == 0.5
    assert M.nll(Y4, CONSTANT) == pytest.approx(math.log(2))
    # (0.5-1)^2 + (0.5-0)^2 = 0.5 per row.
    assert M.brier(Y4, CONSTANT) == pytest.approx(0.5)
    # All confidences 0.5 -> one bin, acc 0.5, conf 0.5 -> ECE 0.
    assert M.ece(Y4, CONSTANT) == pytest.approx(0.0)


def test_nll_clips_zero_probability() -> None:
    probs = np.array([[1.0, 0.0]])
    assert M.nll([1], probs) == pytest.approx(-math.log(1e-12))
    assert M.nll([1], probs, eps=1e-3) == pytest.approx(-math.log(1e-3))


def test_brier_worst_case() -> None:
    # Confidently wrong: (1-0)^2 + (0-1)^2 = 2.
    assert M.brier([1], [[1.0, 0.0]]) == pytest.approx(2.0)


def test_ece_two_non_empty_bins() -> None:
    # n_bins=10.  Rows (max prob, correct?):
    #   bin (0.6, 0.7]: 0.65 correct, 0.65 wrong          -> acc 0.5,  conf 0.65, n=2
    #   bin (0.9, 1.0]: 0.95 correct, 0.95 correct        -> acc 1.0,  conf 0.95, n=2
    # ECE = 2/4 * |0.5 - 0.65| + 2/4 * |1.0 - 0.95| = 0.5*0.15 + 0.5*0.05 = 0.075 + 0.025 = 0.1
    probs = np.array([[0.65, 0.35], [0.65, 0.35], [0.05, 0.95], [0.95, 0.05]])
    y = np.array([0, 1, 1, 0])
    assert M.ece(y, probs, n_bins=10) == pytest.approx(0.1)


def test_ece_bin_edges_right_closed() -> None:
    # n_bins=2 -> bins [0, 0.5] and (0.5, 1].  The gaps of the two rows have opposite signs, so sharing
    # a bin or not changes the result.
    # Confidence exactly 1.0 (wrong) shares the last bin with 0.6 (correct):
    #   bin (0.5, 1]: acc (0 + 1)/2 = 0.5, conf (1.0 + 0.6)/2 = 0.8 -> ECE = 1 * |0.5 - 0.8| = 0.3
    # (a separate overflow bin for 1.0 would give 0.5*1 + 0.5*0.4 = 0.7; dropping it 0.5*0.4 = 0.2)
    probs = np.array([[1.0, 0.0], [0.6, 0.4]])
    y = np.array([1, 0])
    assert M.ece(y, probs, n_bins=2) == pytest.approx(0.3)
    # Confidence exactly 0.5 (an inner edge) goes into the lower bin [0, 0.5]:
    #   bin [0, 0.5]: conf 0.5, correct (argmax 0) -> 1/2 * |1 - 0.5| = 0.25
    #   bin (0.5, 1]: conf 1.0, wrong               -> 1/2 * |0 - 1|   = 0.5   -> ECE = 0.75
    # (0.5 in the upper bin would give |0.5 - 0.75| = 0.25)
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    y = np.array([0, 1])
    assert M.ece(y, probs, n_bins=2) == pytest.approx(0.75)


def test_accepts_lists_and_float_integer_labels() -> None:
    assert M.accuracy([0.0, 1.0], [[0.9, 0.1], [0.2, 0.8]]) == 1.0


# --------------------------------------------------------------------------- OOD


def test_ood_perfect_separation() -> None:
    unc_in = np.array([0.01, 0.02, 0.03])
    unc_ood = np.array([0.20, 0.21, 0.25, 0.3])
    out = M.ood_metrics(unc_in, unc_ood)
    assert set(out) == {"ood_auroc", "ood_aupr", "ood_fpr95"}
    assert out["ood_auroc"] == 1.0
    assert out["ood_aupr"] == 1.0
    assert out["ood_fpr95"] == 0.0


def test_ood_reversed() -> None:
    unc_in = np.array([0.5, 0.6, 0.7])
    unc_ood = np.array([0.1, 0.2])
    assert M.ood_auroc(unc_in, unc_ood) == 0.0
    # To reach TPR >= 0.95 every in-distribution example must be flagged as well.
    assert M.ood_fpr95(unc_in, unc_ood) == 1.0


def test_ood_fpr95_partial() -> None:
    # OOD scores 1..20; in-dist: 0 (below all) and 1.5, 2.5 (above the lowest OOD score).
    # TPR >= 0.95 needs 19 of 20 OOD -> threshold 2 -> in-dist above: 2.5 only -> FPR 1/3.
    unc_ood = np.arange(1.0, 21.0)
    unc_in = np.array([0.0, 1.5, 2.5])
    assert M.ood_fpr95(unc_in, unc_ood) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("y", "probs", "match"),
    [
        ([0], [0.5, 0.5], "probs must be 2-D"),
        ([0], [[1.0]], "probs must have at least 2 classes"),
        ([], np.zeros((0, 2)), "probs must contain at least one"),
        ([0], [[np.nan, 0.5]], "probs must be finite"),
        ([0], [[1.5, -0.5]], r"probs entries must lie in \[0, 1\]"),
        ([0], [[0.6, 0.6]], "probs rows must sum to 1"),
        ([[0]], [[0.5, 0.5]], "y_true must be 1-D"),
        ([0, 1], [[0.5, 0.5]], "y_true must have the same length"),
        ([2], [[0.5, 0.5]], r"y_true labels must lie in \[0, 2\)"),
        ([-1], [[0.5, 0.5]], "y_true labels must lie in"),
        ([0.5], [[0.5, 0.5]], "y_true must contain integer"),
        (["a"], [[0.5, 0.5]], "y_true must contain integer"),
    ],
)
@pytest.mark.parametrize("fn", [M.accuracy, M.nll, M.brier, M.ece, M.classification_metrics])
def test_bad_classification_inputs(fn, y, probs, match) -> None:
    with pytest.raises(ValueError, match=match):
        fn(y, probs)


def test_bad_uncertainty_input() -> None:
    with pytest.raises(ValueError, match="probs must be 2-D"):
        M.uncertainty_score(np.array([0.5, 0.5]))


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        M.ece(Y4, PERFECT, n_bins=0)
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        M.ece(Y4, PERFECT, n_bins=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps must be"):
        M.nll(Y4, PERFECT, eps=0.0)


@pytest.mark.parametrize(
    ("unc_in", "unc_ood", "match"),
    [
        ([], [0.1], "unc_in must be non-empty"),
        ([0.1], [], "unc_ood must be non-empty"),
        ([[0.1]], [0.1], "unc_in must be 1-D"),
        ([0.1], [[0.1]], "unc_ood must be 1-D"),
        ([np.nan], [0.1], "unc_in must be finite"),
        ([0.1], [np.inf], "unc_ood must be finite"),
    ],
)
@pytest.mark.parametrize("fn", [M.ood_auroc, M.ood_aupr, M.ood_fpr95, M.ood_metrics])
def test_bad_ood_inputs(fn, unc_in, unc_ood, match) -> None:
    with pytest.raises(ValueError, match=match):
        fn(unc_in, unc_ood)
