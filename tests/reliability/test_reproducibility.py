"""Reproducibility on CPU: the same config and seed, computed twice from scratch (separate processes and
cache folders), give the same metrics to 1e-6; a different seed gives different data and metrics.

The two computations: the shared smoke run (conftest.smoke_run) and the concurrent batch
(conftest.concurrent_sqlite, a fresh cache of its own, trained in other processes at the same time).
The different seed: the crash-resume run uses seed 1 on the same data settings; exact_gp's model does not
depend on the training epochs it also changes, so its metrics are comparable with the smoke run's.
Timings (`*_seconds`) are wall-clock and excluded.
"""

from __future__ import annotations

import numpy as np
from support.records import ALL_METHODS, comparable_metrics

TOLERANCE = 1e-6


def test_same_config_and_seed_give_the_same_metrics(smoke_run, concurrent_sqlite):
    first = comparable_metrics(smoke_run.kids())
    second = comparable_metrics(concurrent_sqlite[1].kids())
    assert sorted(first) == sorted(second) == sorted(ALL_METHODS)
    assert smoke_run.cache != concurrent_sqlite[1].cache  # computed twice, not read from one cache
    for method in ALL_METHODS:
        assert sorted(first[method]) == sorted(second[method]), method
        for name, value in first[method].items():
            assert abs(value - second[method][name]) <= TOLERANCE, (method, name, value, second[method][name])
    # The data and each model's saved test predictions are identical too.
    with np.load(smoke_run.data_file()) as a, np.load(concurrent_sqlite[1].data_file()) as b:
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for method in ALL_METHODS:
        with (
            np.load(smoke_run.cache_file("predictions", method, ".npz")) as a,
            np.load(concurrent_sqlite[1].cache_file("predictions", method, ".npz")) as b,
        ):
            np.testing.assert_allclose(a["test_probs"], b["test_probs"], atol=TOLERANCE, err_msg=method)


def test_a_different_seed_gives_different_data_and_metrics(smoke_run, resumed_run):
    with np.load(smoke_run.data_file()) as a, np.load(resumed_run.data_file()) as b:
        assert a["x_train"].shape == b["x_train"].shape
        assert not np.allclose(a["x_train"], b["x_train"]), "seed 1 drew the same training set as seed 0"
        assert not np.allclose(a["x_test"], b["x_test"])
    seed0 = comparable_metrics(smoke_run.kids())["exact_gp"]
    seed1 = comparable_metrics(resumed_run.kids())["exact_gp"]
    differing = [k for k in seed0 if abs(seed0[k] - seed1[k]) > TOLERANCE]
    assert len(differing) >= 3, (seed0, seed1)
    assert smoke_run.kids()["exact_gp"].data.params["seed"] == "0"
    assert resumed_run.kids()["exact_gp"].data.params["seed"] == "1"
