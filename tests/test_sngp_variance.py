"""SNGP's O(N) predictive variance against tf-models' own N x N covariance, and prediction on 10^6 points."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import sngp_models
from sngp_models.data import make_two_moons

SHORT = dict(epochs=3, num_hidden=32, num_layers=2, seed=0)  # num_inducing stays at the study's 1024


@pytest.fixture(scope="module")
def moons():
    return make_two_moons(n_per_class=100, seed=0)


@pytest.fixture(scope="module")
def model(moons):
    return sngp_models.make_model("sngp", **SHORT).fit(*moons)


@pytest.fixture(scope="module")
def points(moons) -> np.ndarray:
    """200 points: 140 training points and 60 far away (radius 5 to 100)."""
    rng = np.random.default_rng(0)
    angle, radius = rng.uniform(0, 2 * np.pi, 60), rng.uniform(5, 100, 60)
    far = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return np.concatenate([moons[0][:140], far]).astype(np.float32)


@pytest.fixture(scope="module")
def library_covariance(model, points):
    """tf-models' RandomFeatureGaussianProcess output on the same hidden features: (logits, N x N covmat)."""
    import tensorflow as tf

    h = model.net.hidden_features(tf.constant(points), training=False)
    logits, covmat = model.net.classifier(h, training=False)
    return logits.numpy(), covmat.numpy()


def test_variance_equals_diagonal_of_library_covariance(model, points, library_covariance) -> None:
    import tensorflow as tf

    ref_logits, covmat = library_covariance
    assert covmat.shape == (200, 200)
    logits, variance = (t.numpy() for t in model.net.logits_and_variance(tf.constant(points)))
    assert variance.shape == (200,)
    np.testing.assert_allclose(variance, np.diag(covmat), atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
    # The comparison is not vacuous: the variance grows with distance from the training data.
    assert variance[:140].mean() < 0.2 < 0.6 < variance[140:].mean()


def test_mean_field_probabilities_match_library_helper(model, points, library_covariance) -> None:
    import tensorflow as tf
    from official.nlp.modeling.layers import gaussian_process

    logits, covmat = library_covariance
    adjusted = gaussian_process.mean_field_logits(
        tf.constant(logits), tf.constant(covmat), mean_field_factor=math.pi / 8
    )
    expected = tf.nn.softmax(adjusted, axis=-1).numpy()
    pred = model.predict_with_uncertainty(points)
    np.testing.assert_allclose(pred.probs, expected, atol=1e-5, rtol=0)
    # And by hand: softmax(logits / sqrt(1 + pi/8 * var)).
    scaled = logits / np.sqrt(1 + math.pi / 8 * np.diag(covmat))[:, None]
    by_hand = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    by_hand /= by_hand.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(pred.probs, by_hand, atol=1e-5, rtol=0)
    # Far points are pulled towards 0.5 (the study's distance awareness), more than training points.
    assert pred.uncertainty[140:].mean() > pred.uncertainty[:140].mean()


def test_precision_holds_exactly_the_last_epoch(model, moons) -> None:
    """P = s I + sum_i phi_i phi_i^T over one epoch (reset each epoch). ||phi||^2 ~ 1 with the layer's
    default feature scaling sqrt(2 / num_inducing), so trace(P - s I) ~ N, not epochs * N."""
    precision = model.net.classifier._gp_cov_layer.precision_matrix.numpy()
    ridge = model.config.gp_cov_ridge_penalty
    n = len(moons[0])
    accumulated = np.trace(precision) - ridge * len(precision)
    assert 0.7 * n < accumulated < 1.3 * n, f"trace(P - sI) = {accumulated:.1f}, N = {n}, epochs = 3"
    np.testing.assert_allclose(precision, precision.T, atol=1e-4)


MILLION_SCRIPT = textwrap.dedent(
    """
    import json, resource, time
    import numpy as np
    import sngp_models
    from sngp_models.data import make_two_moons

    def rss_kb():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    x, y = make_two_moons(n_per_class=500, seed=0)
    model = sngp_models.make_model("sngp", epochs=1, seed=0).fit(x, y)
    model.predict_with_uncertainty(x[:10])  # compile outside the measurement
    points = np.random.default_rng(0).uniform(-10, 10, size=(1_000_000, 2)).astype(np.float32)
    before = rss_kb()
    start = time.perf_counter()
    pred = model.predict_with_uncertainty(points)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({
        "growth_bytes": (peak - before) * 1024,
        "seconds": seconds,
        "probs_shape": list(pred.probs.shape),
        "uncertainty_shape": list(pred.uncertainty.shape),
        "finite": bool(np.isfinite(pred.probs).all() and np.isfinite(pred.uncertainty).all()),
        "row_sum_err": float(np.abs(pred.probs.sum(axis=1) - 1).max()),
        "unc_range": [float(pred.uncertainty.min()), float(pred.uncertainty.max())],
        "predict_batch_size": model.config.predict_batch_size,
        "num_inducing": model.config.num_inducing,
    }))
    """
)


def test_one_million_points_without_the_n_by_n_covariance(tmp_path) -> None:
    """Run in a fresh process so the peak RSS is this prediction's, not an earlier test's."""
    script = tmp_path / "million.py"
    script.write_text(MILLION_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n1e6-point SNGP prediction: {result}")
    assert result["predict_batch_size"] == 10_000 and result["num_inducing"] == 1024
    assert result["probs_shape"] == [1_000_000, 2] and result["uncertainty_shape"] == [1_000_000]
    assert result["finite"]
    assert result["row_sum_err"] < 1e-5
    assert -1e-7 <= result["unc_range"][0] and result["unc_range"][1] <= 0.25 + 1e-7
    # A 1e6 x 1e6 float32 covariance is 4 TB, one 1e5 x 1e5 block 40 GB; batching needs ~100 MB.
    assert result["growth_bytes"] < 2 * 1024**3, f"peak RSS grew by {result['growth_bytes'] / 1e9:.2f} GB"
