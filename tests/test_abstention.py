"""sngp_models.abstention against hand-computed values: the calibrated threshold's exact coverage, the
risk-coverage curve, AURC of a perfect and of a random score, reject rates, the JSON round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sngp_models.abstention import (
    Abstention,
    aurc,
    calibrate,
    optimal_aurc,
    reject_rate,
    risk_at_coverage,
    risk_coverage,
)

# --------------------------------------------------------------------------- calibration


def test_threshold_accepts_exactly_the_target_coverage():
    u = np.arange(1, 101) / 1000.0  # 0.001 .. 0.100, no ties; shuffled: order must not matter
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(u)
    ab = calibrate(shuffled, 0.95)
    assert ab.threshold == 0.095  # the 95th smallest: accepts 95 of 100
    assert ab.coverage == 0.95
    assert np.mean(shuffled <= ab.threshold) == 0.95
    assert ab.abstain(shuffled).sum() == 5
    # The smallest such threshold: the next value down accepts only 94.
    assert np.mean(shuffled <= np.nextafter(ab.threshold, 0)) == 0.94


@pytest.mark.parametrize(
    ("n", "target", "accepted"),
    [
        (100, 0.07, 7),  # 0.07 * 100 = 7.000000000000001 in floating point: still 7
        (100, 0.57, 57),  # 56.99999999999999
        (10, 0.95, 10),  # 9.5 rows cannot be accepted: the smallest coverage >= 0.95 is 10/10
        (3, 0.5, 2),
        (7, 1.0, 7),  # all: the threshold is the maximum
        (7, 1e-9, 1),  # at least one
    ],
)
def test_coverage_is_the_smallest_attainable_at_or_above_the_target(n, target, accepted):
    u = np.linspace(0.0, 0.5, n)
    ab = calibrate(u, target)
    assert ab.threshold == u[accepted - 1]
    assert (u <= ab.threshold).sum() == accepted


def test_ties_at_the_threshold_are_all_accepted():
    # 10 values, four tied at 0.2 (positions 5..8 sorted); target 0.6 -> the 6th smallest is 0.2,
    # and all four 0.2s are accepted: coverage 0.8, the least any threshold >= 0.6 can give.
    u = np.array([0.05, 0.1, 0.12, 0.15, 0.2, 0.2, 0.2, 0.2, 0.3, 0.4])
    ab = calibrate(u, 0.6)
    assert ab.threshold == 0.2
    assert ab.coverage == 0.8
    assert np.mean(u <= np.nextafter(0.2, 0)) == 0.4  # any smaller threshold falls below the target


def test_reject_rate_and_override():
    u = np.array([0.0, 0.1, 0.2, 0.3])
    assert reject_rate(u, 0.15) == 0.5
    assert reject_rate(u, 0.3) == 0.0  # equal to the threshold: accepted
    assert reject_rate(u, -1.0) == 1.0
    ab = calibrate(u, 0.5)
    assert ab.threshold == 0.1
    assert ab.abstain(u).tolist() == [False, False, True, True]
    assert ab.abstain(u, threshold=0.25).tolist() == [False, False, False, True]


def test_json_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(1)
    u = rng.uniform(0, 0.25, 257).astype(np.float32)  # model uncertainties are float32
    ab = calibrate(u, 0.9)
    same = Abstention.from_json(ab.to_json())
    assert same.threshold == ab.threshold and same.target_coverage == 0.9
    np.testing.assert_array_equal(same.reference_uncertainty, u.astype(np.float64))
    loaded = Abstention.load(ab.save(tmp_path / "abstention.json"))
    assert loaded.threshold == ab.threshold and loaded.coverage == ab.coverage
    # float32 uncertainties compare with the float64 threshold exactly as they did at calibration
    assert np.array_equal(loaded.abstain(u), u > np.float32(ab.threshold))


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: calibrate([0.1, 0.2], 0.0), ["target_coverage", "(0, 1]"]),
        (lambda: calibrate([0.1, 0.2], 1.5), ["target_coverage", "(0, 1]"]),
        (lambda: calibrate([0.1, 0.2], True), ["target_coverage"]),
        (lambda: calibrate([], 0.9), ["empty"]),
        (lambda: calibrate([0.1, float("nan")], 0.9), ["finite"]),
        (lambda: calibrate([[0.1, 0.2]], 0.9), ["1-D"]),
        (lambda: reject_rate([0.1], float("inf")), ["threshold", "finite"]),
        (lambda: aurc([True], [0.1, 0.2]), ["correct", "one flag"]),
        (lambda: aurc([2, 0], [0.1, 0.2]), ["correct", "booleans"]),
        (lambda: Abstention.from_json("{}"), ["threshold", "reference_uncertainty"]),
        (lambda: Abstention.from_json("not json"), ["not valid JSON"]),
    ],
)
def test_bad_input_names_the_argument(call, words):
    with pytest.raises(ValueError) as caught:
        call()
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


# --------------------------------------------------------------------------- risk-coverage and AURC


def test_risk_coverage_curve_by_hand():
    # Sorted by uncertainty: right, wrong, right, wrong -> risks 0/1, 1/2, 1/3, 2/4.
    correct = np.array([True, False, True, False])
    u = np.array([0.1, 0.2, 0.3, 0.4])
    coverage, risk = risk_coverage(correct[::-1], u[::-1])  # input order does not matter
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.5, 1 / 3, 0.5])
    assert aurc(correct, u) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)


def test_tied_scores_take_the_expected_risk():
    # All tied: every order is equally likely; the expected risk at every coverage is the error rate.
    correct = np.array([True, True, True, False])
    coverage, risk = risk_coverage(correct, np.zeros(4))
    np.testing.assert_allclose(risk, [0.25] * 4)
    assert aurc(correct, np.zeros(4)) == pytest.approx(0.25)
    # A tie of one right and one wrong after a sure right: errors 0, 0.5, 1 -> risks 0, 1/4, 1/3.
    _, risk = risk_coverage([True, True, False], [0.0, 0.5, 0.5])
    np.testing.assert_allclose(risk, [0.0, 0.25, 1 / 3])


def test_aurc_of_a_perfect_score():
    """Every error more uncertain than every correct example: risk 0 up to coverage 1 - r, then the k
    most certain hold k - (n - e) errors, AURC = (1/n) sum_{j=1..e} j / (n - e + j); for many examples
    r + (1 - r) ln(1 - r) (the integral of (c - (1 - r)) / c over c in [1 - r, 1])."""
    n, e = 1000, 100  # error rate 0.1
    correct = np.r_[np.ones(n - e, bool), np.zeros(e, bool)]
    u = np.r_[np.linspace(0, 0.1, n - e), np.linspace(0.2, 0.25, e)]
    exact = sum(j / (n - e + j) for j in range(1, e + 1)) / n
    assert aurc(correct, u) == pytest.approx(exact, rel=1e-12)
    assert optimal_aurc(0.1) == pytest.approx(0.1 + 0.9 * math.log(0.9))  # 0.0051755...
    assert optimal_aurc(0.1) == pytest.approx(0.0051755, abs=1e-7)
    assert aurc(correct, u) == pytest.approx(optimal_aurc(0.1), abs=1e-4)  # 0.0052255 (n = 1000) vs 0.0051755
    # ... and the perfect score is the best any score can do: reversed it is the worst.
    assert aurc(correct, -u) > 0.1 > aurc(correct, u)


def test_aurc_of_a_random_score_is_the_error_rate():
    rng = np.random.default_rng(0)
    n = 20_000
    correct = rng.random(n) >= 0.2  # error rate ~0.2
    rate = 1 - correct.mean()
    values = [aurc(correct, rng.random(n)) for _ in range(5)]
    # The risk at coverage k/n is the error rate of a random k-subset: mean r, sd sqrt(r(1-r)/k).
    assert np.mean(values) == pytest.approx(rate, abs=0.005), (values, rate)


def test_risk_at_coverage():
    # 10 examples sorted by uncertainty; wrong at positions 4 and 9 (0-based).
    u = np.arange(10) / 10.0
    correct = np.ones(10, bool)
    correct[[4, 9]] = False
    assert risk_at_coverage(correct, u, 0.9) == pytest.approx(1 / 9)  # first 9 accepted, one wrong
    assert risk_at_coverage(correct, u, 0.4) == 0.0
    assert risk_at_coverage(correct, u, 1.0) == pytest.approx(0.2)


# --------------------------------------------------------------------------- evaluation and plot


def _arrays(rng, n_test=200, n_ood=50):
    """predict_splits-like arrays: the OOD set far more uncertain than the test split."""
    probs = rng.dirichlet([5.0, 1.0], n_test)
    return {
        "test_probs": probs,
        "test_uncertainty": (1 - (probs**2).sum(axis=1)) / 2,
        "ood_probs": np.full((n_ood, 2), 0.5),
        "ood_uncertainty": np.r_[np.full(n_ood - 5, 0.25), np.zeros(5)],
    }


def test_selective_metrics_of_the_evaluation():
    from types import SimpleNamespace

    from sngp_models import evaluation

    rng = np.random.default_rng(3)
    arrays = _arrays(rng)
    data = SimpleNamespace(y_test=rng.integers(0, 2, 200))
    ab = evaluation.calibrate_test(arrays, 0.9)
    values = evaluation.selective_metrics(data, arrays, ab)
    correct = arrays["test_probs"].argmax(axis=1) == data.y_test
    assert values["abstain_threshold"] == ab.threshold == np.sort(arrays["test_uncertainty"])[179]
    assert values["aurc"] == aurc(correct, arrays["test_uncertainty"])
    assert values["risk_at_target_coverage"] == risk_at_coverage(correct, arrays["test_uncertainty"], 0.9)
    assert values["ood_reject_rate"] == 0.9  # 45 of 50 above any test uncertainty (< 0.25), 5 at 0
    assert set(values) <= set(evaluation.METRIC_NAMES)
    assert "ood_reject_rate" in evaluation.OOD_METRICS
    assert {"aurc", "ood_reject_rate"} <= set(evaluation.SUMMARY_METRICS)
    # No OOD set: no ood_reject_rate
    empty = {**arrays, "ood_probs": np.zeros((0, 2)), "ood_uncertainty": np.zeros(0)}
    assert "ood_reject_rate" not in evaluation.selective_metrics(data, empty, ab)


def test_plot_risk_coverage(tmp_path):
    from matplotlib.figure import Figure

    from sngp_models import plots

    rng = np.random.default_rng(0)
    correct = rng.random(300) > 0.1
    curves = {"sngp": (correct, rng.random(300)), "deterministic": (correct, rng.random(300))}
    fig = plots.plot_risk_coverage(curves, target_coverage=0.95)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.lines) == 2 * 2 + 1  # curve + optimum per method, the target line
    assert "AURC" in ax.get_legend().get_texts()[0].get_text()
    fig.savefig(tmp_path / "rc.png")
    assert (tmp_path / "rc.png").stat().st_size > 1000
    assert len(plots.plot_risk_coverage({"sngp": curves["sngp"]}).axes[0].lines) == 2
    with pytest.raises(ValueError, match="non-empty mapping"):
        plots.plot_risk_coverage({})
    with pytest.raises(ValueError, match="pair"):
        plots.plot_risk_coverage({"sngp": (correct,)})
