"""Selective prediction: turn a model's uncertainty into "I don't know" (abstention), and measure it.

    ab = calibrate(test_uncertainty, target_coverage=0.95)   # the threshold, from in-distribution data
    abstain = ab.abstain(uncertainty)                         # bool (N,): uncertainty > ab.threshold
    ab.save("abstention.json"); same = Abstention.load("abstention.json")

An example is *accepted* (the model answers) when its uncertainty is <= the threshold and *abstained*
when it is above. `calibrate` picks the smallest threshold that accepts `target_coverage` of a
calibration split (the pipeline uses the in-distribution test split): the k-th smallest uncertainty,
k = ceil(target_coverage * n). Without ties that accepts exactly k of the n examples: the smallest
attainable coverage >= target_coverage, exactly target_coverage when target_coverage * n is an integer.
Ties: every example whose uncertainty equals the threshold is accepted (a rule on the value cannot tell
tied examples apart), so with ties at the threshold the calibration coverage is k/n plus the number of
tied examples beyond the k-th; no threshold can give less without giving less than the target.

The risk-coverage curve (Geifman & El-Yaniv, 2017) orders the examples by uncertainty, most certain
first; at coverage k/n its risk is the error rate of the k most certain examples. Tied uncertainties
have no order: within a tied group the curve takes the expected number of errors over every order of
the group (errors spread evenly), so the curve, and the AURC, do not depend on how ties were sorted.
AURC is the mean of the risk over k = 1..n (area under the step curve, coverage steps of 1/n).

Reference values, for an error rate r = e/n:
- a random score (uncertainty independent of the errors): expected risk r at every coverage, AURC ~ r;
  all scores tied: AURC = r exactly;
- a perfect score (every error more uncertain than every correct example): risk 0 up to coverage 1 - r,
  then the k most certain hold k - (n - e) errors, so AURC = (1/n) * sum_{j=1..e} j / (n - e + j). As
  n grows (coverage c continuous) this is the integral of (c - (1 - r)) / c over [1 - r, 1]:
  AURC* = r + (1 - r) * ln(1 - r), the lowest AURC any score can reach (e.g. r = 0.1: 0.0051755).

Only numpy: no TensorFlow, usable on any arrays of uncertainties and correctness flags.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Abstention",
    "DEFAULT_TARGET_COVERAGE",
    "aurc",
    "calibrate",
    "optimal_aurc",
    "reject_rate",
    "risk_at_coverage",
    "risk_coverage",
]

DEFAULT_TARGET_COVERAGE = 0.95
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- validation


def _uncertainty(values, name: str = "uncertainty") -> np.ndarray:
    try:
        u = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D array of numbers; got {type(values).__name__}") from exc
    if u.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {u.shape}")
    if u.size == 0:
        raise ValueError(f"{name} is empty; give at least one value")
    if not np.isfinite(u).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return u


def _correct(values, n: int) -> np.ndarray:
    c = np.asarray(values)
    if c.ndim != 1 or c.shape[0] != n:
        raise ValueError(f"correct must be 1-D with one flag per uncertainty ({n}); got shape {c.shape}")
    if c.dtype != bool and not np.isin(c, (0, 1)).all():
        raise ValueError("correct must hold booleans (or 0/1): True where the prediction is right")
    return c.astype(bool)


def _coverage(value, name: str = "target_coverage") -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in (0, 1]; got {value!r}")
    value = float(value)
    if not (0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1]; got {value!r}")
    return value


def _threshold(value, name: str = "threshold") -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number; got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite; got {value!r}")
    return float(value)


def accepted_count(target_coverage: float, n: int) -> int:
    """k = ceil(target_coverage * n): how many of n examples the threshold must accept (>= 1). The
    product is rounded to 9 decimals first, so 0.07 * 100 = 7.000000000000001 asks for 7, not 8."""
    return max(1, math.ceil(round(_coverage(target_coverage) * n, 9)))


# --------------------------------------------------------------------------- the threshold


@dataclass(frozen=True, eq=False)
class Abstention:
    """A calibrated abstention rule: abstain where uncertainty > `threshold`.

    `target_coverage`: the fraction of the calibration split it was asked to accept;
    `reference_uncertainty`: that split's uncertainties (float64, (n,)), the in-distribution reference a
    monitor compares production traffic with."""

    threshold: float
    target_coverage: float
    reference_uncertainty: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _threshold(self.threshold))
        object.__setattr__(self, "target_coverage", _coverage(self.target_coverage))
        reference = _uncertainty(self.reference_uncertainty, "reference_uncertainty").copy()
        reference.setflags(write=False)
        object.__setattr__(self, "reference_uncertainty", reference)

    @property
    def coverage(self) -> float:
        """The fraction of the reference (calibration) split accepted at the threshold."""
        return float(np.mean(self.reference_uncertainty <= self.threshold))

    def abstain(self, uncertainty, threshold: float | None = None) -> np.ndarray:
        """Bool (N,): True where `uncertainty` > the threshold (`threshold` overrides it)."""
        limit = self.threshold if threshold is None else _threshold(threshold)
        return np.asarray(uncertainty, dtype=np.float64) > limit

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "threshold": self.threshold,
            "target_coverage": self.target_coverage,
            "coverage": self.coverage,
            "reference_uncertainty": self.reference_uncertainty.tolist(),
        }

    def to_json(self) -> str:
        """JSON text; floats are written exactly (repr), so from_json gives the same values."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, raw: dict) -> Abstention:
        if not isinstance(raw, dict):
            raise ValueError(f"an abstention must be a JSON object; got {type(raw).__name__}")
        missing = [k for k in ("threshold", "target_coverage", "reference_uncertainty") if k not in raw]
        if missing:
            raise ValueError(f"abstention lacks {', '.join(missing)}")
        version = raw.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"abstention format_version {version!r} is not supported ({FORMAT_VERSION} is)")
        return cls(
            threshold=raw["threshold"],
            target_coverage=raw["target_coverage"],
            reference_uncertainty=np.asarray(raw["reference_uncertainty"], dtype=np.float64),
        )

    @classmethod
    def from_json(cls, text: str) -> Abstention:
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"abstention is not valid JSON: {exc}") from None
        return cls.from_dict(raw)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Abstention:
        return cls.from_json(Path(path).read_text())


def calibrate(uncertainty, target_coverage: float = DEFAULT_TARGET_COVERAGE) -> Abstention:
    """The smallest threshold that accepts (uncertainty <= threshold) at least `target_coverage` of
    `uncertainty` (the calibration split): its k-th smallest value, k = ceil(target_coverage * n). See
    the module docstring for ties. `target_coverage` = 1 accepts everything (threshold = the maximum)."""
    u = _uncertainty(uncertainty)
    k = accepted_count(target_coverage, u.size)
    threshold = float(np.partition(u, k - 1)[k - 1])
    return Abstention(threshold=threshold, target_coverage=target_coverage, reference_uncertainty=u)


def reject_rate(uncertainty, threshold: float) -> float:
    """The fraction of `uncertainty` abstained at `threshold` (uncertainty > threshold)."""
    u = _uncertainty(uncertainty)
    return float(np.mean(u > _threshold(threshold)))


# --------------------------------------------------------------------------- risk and coverage


def risk_coverage(correct, uncertainty) -> tuple[np.ndarray, np.ndarray]:
    """The risk-coverage curve -> (coverage, risk), both (n,): coverage k/n for k = 1..n and the error
    rate of the k most certain examples; within tied uncertainties the expected one (module docstring).
    A lower curve is a better score for abstaining."""
    u = _uncertainty(uncertainty)
    wrong = ~_correct(correct, u.size)
    order = np.argsort(u, kind="stable")
    u_sorted, wrong_sorted = u[order], wrong[order].astype(np.float64)
    # Tied groups: [start, end) runs of equal values; errors spread evenly over each group.
    starts = np.flatnonzero(np.r_[True, u_sorted[1:] != u_sorted[:-1]])
    ends = np.r_[starts[1:], u_sorted.size]
    group_errors = np.add.reduceat(wrong_sorted, starts)
    per_position = np.repeat(group_errors / (ends - starts), ends - starts)
    k = np.arange(1, u.size + 1, dtype=np.float64)
    errors = np.cumsum(per_position)
    # Exact at every group's end (the cumulative count of errors), whatever the float round-off inside.
    errors[ends - 1] = np.cumsum(group_errors)
    return k / u.size, errors / k


def aurc(correct, uncertainty) -> float:
    """Area under the risk-coverage curve with `uncertainty` as the score: the mean risk over coverages
    1/n .. 1. Lower is better; ~ the error rate for a score that knows nothing, optimal_aurc at best."""
    return float(np.mean(risk_coverage(correct, uncertainty)[1]))


def optimal_aurc(error_rate: float) -> float:
    """The AURC of a perfect score in the limit of many examples: r + (1 - r) ln(1 - r)."""
    r = float(error_rate)
    if not 0 <= r <= 1:
        raise ValueError(f"error_rate must be in [0, 1]; got {error_rate!r}")
    return r if r == 1 else r + (1 - r) * math.log1p(-r)


def risk_at_coverage(correct, uncertainty, coverage: float) -> float:
    """The error rate among the examples accepted by the threshold calibrated for `coverage` on these
    same examples (calibrate(uncertainty, coverage)): what a deployed model with that threshold gets
    wrong of what it answers. Ties at the threshold are all accepted, as in `calibrate`."""
    u = _uncertainty(uncertainty)
    right = _correct(correct, u.size)
    accepted = u <= calibrate(u, coverage).threshold
    return float(np.mean(~right[accepted]))
