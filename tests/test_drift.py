"""The drift decision of `sngp monitor` (sngp_models.drift) against hand-computed values, and its
false-alarm rate under the null it is built for (fast, no servers)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sngp_models.drift import abstain_drift, critical_count, reference_counts


def test_binomial_fallback_matches_the_hand_computed_tail():
    # No reference uncertainties: P(X >= 3), X ~ Binomial(10, 0.1) = 1 - 0.9^10 - 10*0.1*0.9^9 - 45*0.01*0.9^8
    expected = 1 - 0.9**10 - 10 * 0.1 * 0.9**9 - 45 * 0.01 * 0.9**8
    test = abstain_drift(3, 10, threshold=0.2, target_coverage=0.9, alpha=0.05)
    assert test.method == "binomial" and test.reference_rows == 0
    assert test.p_value == pytest.approx(expected, rel=1e-9)  # 0.0701908...
    assert test.expected_rate == pytest.approx(0.1)
    assert test.abstain_rate == pytest.approx(0.3) and test.statistic == pytest.approx(0.2)
    assert not test.drift  # 0.070 >= 0.05
    assert abstain_drift(3, 10, threshold=0.2, target_coverage=0.9, alpha=0.08).drift


def test_beta_binomial_matches_the_hand_computed_tail():
    # 4 reference rows, 1 above the threshold: p ~ Beta(2, 3).
    reference = [0.1, 0.2, 0.3, 0.9]
    assert reference_counts(reference, 0.3) == (4, 1)
    one = abstain_drift(1, 1, threshold=0.3, target_coverage=0.75, reference_uncertainty=reference)
    assert one.method == "beta-binomial" and one.reference_rows == 4
    assert one.p_value == pytest.approx(2 / 5)  # E[p] = a / (a + b)
    assert one.expected_rate == pytest.approx(0.4)
    # m = 2: P(K = 2) = B(4, 3) / B(2, 3) = (1/60) / (1/12) = 0.2; P(K >= 1) = 1 - B(2, 5) / B(2, 3) = 0.6
    both = abstain_drift(2, 2, threshold=0.3, target_coverage=0.75, reference_uncertainty=reference)
    assert both.p_value == pytest.approx(0.2)
    some = abstain_drift(1, 2, threshold=0.3, target_coverage=0.75, reference_uncertainty=reference)
    assert some.p_value == pytest.approx(0.6)
    none = abstain_drift(0, 2, threshold=0.3, target_coverage=0.75, reference_uncertainty=reference)
    assert none.p_value == pytest.approx(1.0) and not none.drift and none.statistic == pytest.approx(-0.4)


def test_ties_at_the_threshold_count_as_accepted():
    # abstain means uncertainty > threshold: the reference rows equal to it are not abstained.
    assert reference_counts([0.1, 0.2, 0.3, 0.3], 0.3) == (4, 0)


def test_p_value_equal_to_alpha_is_not_drift():
    # P(X >= 1) = 0.5 exactly with X ~ Binomial(1, 0.5): at alpha 0.5, no drift (p < alpha is drift).
    assert abstain_drift(1, 1, threshold=0.3, target_coverage=0.5, alpha=0.5).p_value == 0.5
    assert not abstain_drift(1, 1, threshold=0.3, target_coverage=0.5, alpha=0.5).drift
    assert abstain_drift(1, 1, threshold=0.3, target_coverage=0.5, alpha=0.51).drift


def test_an_ood_heavy_batch_drifts_and_an_ordinary_one_does_not():
    # 500 reference rows with 25 above the threshold (95 % coverage), batches of 200 at alpha 0.01.
    reference = np.r_[np.linspace(0.0, 0.1, 475), np.linspace(0.2, 0.5, 25)]
    threshold = 0.1
    ordinary = abstain_drift(
        10, 200, threshold=threshold, target_coverage=0.95, reference_uncertainty=reference
    )
    assert not ordinary.drift and ordinary.p_value > 0.4
    # 30 % OOD rows, all abstained, plus 5 % of the rest: 60 + 7 = 67 of 200.
    shifted = abstain_drift(
        67, 200, threshold=threshold, target_coverage=0.95, reference_uncertainty=reference
    )
    assert (
        shifted.drift and shifted.p_value < 1e-12 and shifted.statistic == pytest.approx(67 / 200 - 26 / 501)
    )


def test_critical_count_is_the_first_count_called_drift():
    reference = np.r_[np.zeros(475), np.ones(25)]
    settings = dict(threshold=0.5, target_coverage=0.95, reference_uncertainty=reference, alpha=0.01)
    k = critical_count(200, **settings)
    assert abstain_drift(k, 200, **settings).drift and not abstain_drift(k - 1, 200, **settings).drift
    assert k == 21  # the beta-binomial's: a plain binomial test at p = 0.05 would already alarm at 19
    assert critical_count(200, threshold=0.5, target_coverage=0.95, alpha=0.01) == 19
    assert critical_count(1, threshold=0.5, target_coverage=0.95, alpha=1e-9) == 2  # never


def test_false_alarm_rate_stays_below_alpha_when_the_threshold_is_calibrated_on_a_sample():
    """The null the test is built for: reference and batch from the same distribution, the threshold the
    smallest that accepts 95 % of the reference. The beta-binomial's false-alarm rate is <= alpha; the
    plain binomial test's is not (it ignores that the threshold was estimated)."""
    rng = np.random.default_rng(0)
    alpha, n, m, trials = 0.05, 100, 200, 4000
    alarms = {"beta-binomial": 0, "binomial": 0}
    for _ in range(trials):
        reference = rng.random(n)
        threshold = np.sort(reference)[math.ceil(0.95 * n) - 1]
        k = int(np.count_nonzero(rng.random(m) > threshold))
        for uses_reference in (True, False):
            test = abstain_drift(
                k,
                m,
                threshold=threshold,
                target_coverage=0.95,
                reference_uncertainty=reference if uses_reference else None,
                alpha=alpha,
            )
            alarms[test.method] += test.drift
    rates = {name: count / trials for name, count in alarms.items()}
    assert rates["beta-binomial"] <= alpha + 0.01, rates  # ~0.04
    assert rates["binomial"] > alpha + 0.03, rates  # ~0.12


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (dict(abstained=1, rows=0), "rows"),
        (dict(abstained=3, rows=2), "abstained"),
        (dict(abstained=-1, rows=2), "abstained"),
        (dict(abstained=1, rows=2, alpha=0), "alpha"),
        (dict(abstained=1, rows=2, alpha=1), "alpha"),
        (dict(abstained=1, rows=2, alpha=True), "alpha"),
        (dict(abstained=1, rows=2, target_coverage=0), "target_coverage"),
        (dict(abstained=1, rows=2, reference_uncertainty=[0.1, float("nan")]), "finite"),
    ],
)
def test_bad_arguments_name_the_field(args, message):
    settings = dict(threshold=0.1, target_coverage=0.95) | args
    with pytest.raises(ValueError, match=message):
        abstain_drift(settings.pop("abstained"), settings.pop("rows"), **settings)
