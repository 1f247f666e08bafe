"""Round trips: every logged model (the study's four methods and exact_gp), loaded with
mlflow.pyfunc.load_model in a fresh process, predicts what the pipeline's own model predicted (the test
probabilities and uncertainty the evaluate task saved), to 1e-6; so does the cached model directory
loaded with sngp_models.load_model here."""

from __future__ import annotations

import numpy as np
import pytest
from support.records import ALL_METHODS

TOLERANCE = 1e-6


@pytest.mark.parametrize("method", ALL_METHODS)
def test_logged_model_predicts_what_the_pipeline_predicted(method, pyfunc_report):
    result = pyfunc_report["roundtrip"][method]
    assert result["columns"] == ["predicted", "prob_0", "prob_1", "uncertainty", "abstain"], result
    assert result["rows"] == 200
    assert result["probs_diff"] <= TOLERANCE, result
    assert result["uncertainty_diff"] <= TOLERANCE, result


@pytest.mark.parametrize("method", ALL_METHODS)
def test_cached_model_dir_predicts_what_the_pipeline_predicted(method, smoke_run):
    import sngp_models
    from tasks.data import load_data

    data = load_data(str(smoke_run.data_file()))
    pred = sngp_models.load_model(smoke_run.cache_file("models", method)).predict_with_uncertainty(
        data.x_test
    )
    with np.load(smoke_run.cache_file("predictions", method, ".npz")) as saved:
        np.testing.assert_allclose(pred.probs, saved["test_probs"], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(pred.uncertainty, saved["test_uncertainty"], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(pred.probs.sum(axis=1), 1.0, atol=1e-5)
