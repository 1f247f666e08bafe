"""The study's acceptance signal at its full settings (make_model defaults: 100 epochs, 6 x 128 ResNet,
1024 random features). Slow (~20 s of training on an idle 2-core machine) but run in CI too."""

from __future__ import annotations

import numpy as np
import pytest

import sngp_models
from sngp_models.abstention import calibrate, reject_rate
from sngp_models.data import make_dataset

pytestmark = pytest.mark.slow


def _figures(method: str, seed: int) -> dict[str, float]:
    data = make_dataset(seed=seed)
    model = sngp_models.make_model(method, seed=seed).fit(data.x_train, data.y_train)
    test = model.predict_with_uncertainty(data.x_test)
    ood = model.predict_with_uncertainty(data.x_ood)
    train = model.predict_with_uncertainty(data.x_train)
    grid = model.predict_with_uncertainty(data.x_grid)
    figures = {
        "test_accuracy": float(np.mean(test.probs.argmax(axis=1) == data.y_test)),
        "ood_mean_max_prob": float(ood.probs.max(axis=1).mean()),
        "ood_mean_uncertainty": float(ood.uncertainty.mean()),
        "train_mean_uncertainty": float(train.uncertainty.mean()),
        "grid_mean_uncertainty": float(grid.uncertainty.mean()),
    }
    figures["ood_to_train_uncertainty"] = figures["ood_mean_uncertainty"] / figures["train_mean_uncertainty"]
    # Abstention (issue 15): the threshold accepting 95 % of the test split, applied to the OOD cluster.
    figures["ood_reject_rate"] = reject_rate(ood.uncertainty, calibrate(test.uncertainty, 0.95).threshold)
    print(f"\nstudy {method} seed={seed}: " + ", ".join(f"{k}={v:.4f}" for k, v in figures.items()))
    return figures


@pytest.fixture(scope="module")
def deterministic() -> dict[str, float]:
    return _figures("deterministic", 0)


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def sngp(request) -> dict[str, float]:
    return _figures("sngp", request.param)


def test_deterministic_is_accurate(deterministic) -> None:
    assert deterministic["test_accuracy"] >= 0.95


def test_deterministic_is_overconfident_on_ood(deterministic) -> None:
    assert deterministic["ood_mean_max_prob"] >= 0.95


def test_deterministic_abstains_on_almost_none_of_the_ood_cluster(deterministic) -> None:
    assert deterministic["ood_reject_rate"] <= 0.05


def test_sngp_abstains_on_the_ood_cluster(sngp) -> None:
    assert sngp["ood_reject_rate"] >= 0.95


def test_sngp_is_accurate(sngp) -> None:
    assert sngp["test_accuracy"] >= 0.95


def test_sngp_is_uncertain_on_ood(sngp) -> None:
    assert sngp["ood_mean_max_prob"] <= 0.65


def test_sngp_uncertainty_grows_away_from_the_data(sngp) -> None:
    assert sngp["ood_mean_uncertainty"] >= 3 * sngp["train_mean_uncertainty"]


def test_sngp_more_uncertain_than_deterministic_over_the_grid(sngp, deterministic) -> None:
    assert sngp["grid_mean_uncertainty"] > 5 * deterministic["grid_mean_uncertainty"]
