"""Drift of production traffic, judged by how often the model abstains: `abstain_drift(...) -> DriftTest`.

A model calibrates its abstention threshold on the uncertainties of an in-distribution reference split
(n rows; the threshold accepts `target_coverage` of them, so r = #(reference > threshold) rows of it
are abstained). On a batch of m production rows the model abstains on k of them. Traffic unlike the
training data (OOD inputs, a shifted population) makes a model that knows when it does not know
abstain more often: the test is one-sided, "more abstentions than in-distribution traffic would give".

The null distribution is exact. If the batch is exchangeable with the reference split, the chance
p = P(uncertainty > threshold) of a fresh in-distribution row is not exactly 1 - target_coverage: the
threshold is itself an order statistic of the n reference values, so p ~ Beta(r + 1, n - r) (for
continuous scores; ties at the threshold only make abstaining rarer, so the test stays conservative).
Given p the count is Binomial(m, p), so marginally k ~ BetaBinomial(m, r + 1, n - r), and

    p-value = P(K >= k),   K ~ BetaBinomial(m, r + 1, n - r),   drift if p-value < alpha.

A plain binomial test against 1 - target_coverage treats the threshold as exact and so raises false
alarms more often than alpha: with n = 500 reference rows, batches of 200 and alpha = 0.01 it alarms on
2.3 % of in-distribution batches (6 % with n = 200). The beta-binomial keeps the rate <= alpha at a
small cost in power (benchmarks/drift_bench.py measures both). Without reference uncertainties the
binomial test is the fallback (`reference_rows` is then 0).

Each batch is one decision at level alpha; no Bonferroni correction across batches: a batch stream has
no fixed family size, and alpha is then simply the false-alarm rate per batch (96 batches a day at
alpha 0.01: about one false alarm a day). Acting on alarms is rate-limited elsewhere (the retrain
automation's cooldown).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_ALPHA = 0.01


@dataclass(frozen=True)
class DriftTest:
    """One batch's test. `statistic` is the excess abstain rate over what in-distribution traffic gives
    (abstain_rate - expected_rate); `drift` is p_value < alpha."""

    rows: int
    abstained: int
    abstain_rate: float
    expected_rate: float
    statistic: float
    p_value: float
    alpha: float
    drift: bool
    reference_rows: int
    method: str  # "beta-binomial" (reference uncertainties known) or "binomial"

    def as_dict(self) -> dict:
        return asdict(self)


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0 < alpha < 1:
        raise ValueError(f"alpha: must be a number strictly between 0 and 1, got {alpha!r}")
    return float(alpha)


def reference_counts(reference_uncertainty, threshold: float) -> tuple[int, int]:
    """(n, r): the reference split's size and how many of it the threshold abstains on."""
    reference = np.asarray(reference_uncertainty, dtype=np.float64).ravel()
    if reference.size and not np.isfinite(reference).all():
        raise ValueError("reference uncertainties must be finite")
    return int(reference.size), int(np.count_nonzero(reference > threshold))


def abstain_drift(
    abstained: int,
    rows: int,
    *,
    threshold: float,
    target_coverage: float,
    reference_uncertainty=None,
    alpha: float = DEFAULT_ALPHA,
) -> DriftTest:
    """Is a batch of `rows` rows of which the model abstained on `abstained` drifting away from the
    model's reference split? See the module's text for the test."""
    from scipy import stats  # lazy: the library imports fast without it

    alpha = check_alpha(alpha)
    rows, abstained = int(rows), int(abstained)
    if rows < 1:
        raise ValueError(f"rows: a batch needs at least one row, got {rows}")
    if not 0 <= abstained <= rows:
        raise ValueError(f"abstained: must be between 0 and rows ({rows}), got {abstained}")
    if not 0 < target_coverage <= 1:
        raise ValueError(f"target_coverage: must be in (0, 1], got {target_coverage!r}")
    n, r = reference_counts([] if reference_uncertainty is None else reference_uncertainty, threshold)
    if n:
        a, b = r + 1, n - r
        expected = a / (a + b)
        p_value = float(stats.betabinom.sf(abstained - 1, rows, a, b))
        method = "beta-binomial"
    else:
        expected = 1.0 - float(target_coverage)
        p_value = float(stats.binomtest(abstained, rows, expected, alternative="greater").pvalue)
        method = "binomial"
    p_value = min(1.0, max(0.0, p_value))
    rate = abstained / rows
    return DriftTest(
        rows=rows,
        abstained=abstained,
        abstain_rate=rate,
        expected_rate=float(expected),
        statistic=float(rate - expected),
        p_value=p_value,
        alpha=alpha,
        drift=p_value < alpha,
        reference_rows=n,
        method=method,
    )


def critical_count(
    rows: int, *, threshold: float, target_coverage: float, reference_uncertainty=None, alpha=DEFAULT_ALPHA
) -> int:
    """The smallest abstain count of a batch of `rows` rows that the test calls drift (rows + 1: none).
    The p-value falls as the count rises, so a binary search finds it."""
    settings = dict(
        threshold=threshold,
        target_coverage=target_coverage,
        reference_uncertainty=reference_uncertainty,
        alpha=alpha,
    )
    low, high = 0, rows + 1  # drift at `high` (rows + 1 stands for "never"), unknown below
    while low < high:
        middle = (low + high) // 2
        if abstain_drift(middle, rows, **settings).drift:
            high = middle
        else:
            low = middle + 1
    return high
