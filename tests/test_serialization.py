"""save/load round trips (checked in a fresh Python process) and the on-disk safety guarantees."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import sngp_models
from sngp_models.data import make_grid, make_ood, make_two_moons

METHODS = ("deterministic", "sngp", "mc_dropout", "deep_ensemble")
SHORT = dict(
    epochs=3, num_hidden=32, num_layers=2, ensemble_size=3, num_inducing=128, seed=0, predict_batch_size=256
)

LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    import sngp_models

    jobs = json.loads(Path(sys.argv[1]).read_text())
    x = np.load(sys.argv[2])
    report = {}
    for method, model_dir, out_dir in jobs:
        model = sngp_models.load_model(model_dir)
        pred = model.predict_with_uncertainty(x)
        out = Path(out_dir)
        np.save(out / "probs.npy", pred.probs)
        np.save(out / "uncertainty.npy", pred.uncertainty)
        if method == "sngp":
            np.save(out / "precision.npy", model.net.classifier._gp_cov_layer.precision_matrix.numpy())
        report[method] = {"method": model.method, "config": model.config.to_dict(), "history": model.history_}
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def x_eval() -> np.ndarray:
    far = np.array([[10.0, 10.0], [-20.0, 5.0], [0.0, -30.0]], np.float32)
    return np.concatenate([make_grid(n_grid=30), make_ood(n=100, seed=1), far]).astype(np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, x_eval):
    """method -> (model, saved dir, in-memory Prediction) for short fits of every method."""
    x, y = make_two_moons(n_per_class=100, seed=0)
    root = tmp_path_factory.mktemp("models")
    out = {}
    for method in METHODS:
        model = sngp_models.make_model(method, **SHORT).fit(x, y)
        path = model.save(root / method)
        out[method] = (model, Path(path), model.predict_with_uncertainty(x_eval))
    return out


@pytest.fixture(scope="module")
def fresh_process(saved, x_eval, tmp_path_factory):
    """Load every saved model in a new interpreter; returns method -> (output dir, report)."""
    work = tmp_path_factory.mktemp("fresh")
    jobs = []
    for method, (_, path, _) in saved.items():
        (work / method).mkdir()
        jobs.append([method, str(path), str(work / method)])
    (work / "jobs.json").write_text(json.dumps(jobs))
    np.save(work / "x.npy", x_eval)
    (work / "load.py").write_text(LOAD_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(work / "load.py"), str(work / "jobs.json"), str(work / "x.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {method: (work / method, report[method]) for method in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_in_fresh_process(saved, fresh_process, method) -> None:
    model, _, pred = saved[method]
    out, report = fresh_process[method]
    assert report["method"] == method
    assert report["config"] == model.config.to_dict()
    assert report["history"] == model.history_  # JSON round-trips floats exactly
    probs = np.load(out / "probs.npy")
    unc = np.load(out / "uncertainty.npy")
    assert probs.shape == pred.probs.shape and unc.shape == pred.uncertainty.shape
    np.testing.assert_allclose(probs, pred.probs, atol=1e-6, rtol=0)
    np.testing.assert_allclose(unc, pred.uncertainty, atol=1e-6, rtol=0)


def test_sngp_covariance_state_round_trips(saved, fresh_process, x_eval) -> None:
    import tensorflow as tf

    model, _, _ = saved["sngp"]
    out, _ = fresh_process["sngp"]
    original = model.net.classifier._gp_cov_layer.precision_matrix.numpy()
    loaded = np.load(out / "precision.npy")
    assert loaded.shape == (SHORT["num_inducing"],) * 2
    # Not the initial ridge * I: the training data were accumulated into it.
    assert np.abs(original - np.eye(len(original))).max() > 1e-2
    np.testing.assert_array_equal(loaded, original)
    # The variance (which depends on that state) survives as well, also far from the data.
    in_process = sngp_models.load_model(saved["sngp"][1])
    np.testing.assert_array_equal(in_process.net.classifier._gp_cov_layer.precision_matrix.numpy(), original)
    xt = tf.constant(x_eval)
    np.testing.assert_allclose(
        in_process.net.logits_and_variance(xt)[1].numpy(),
        model.net.logits_and_variance(xt)[1].numpy(),
        atol=1e-6,
        rtol=0,
    )


def test_loaded_model_can_be_saved_again(saved, tmp_path, x_eval) -> None:
    _, path, pred = saved["deep_ensemble"]
    loaded = sngp_models.load_model(path)
    again = sngp_models.load_model(loaded.save(tmp_path / "again"))
    np.testing.assert_allclose(again.predict_proba(x_eval), pred.probs, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- refusing bad directories


def _copy(saved, method: str, dest: Path) -> Path:
    return Path(shutil.copytree(saved[method][1], dest))


def test_directory_without_manifest_is_refused(saved, tmp_path) -> None:
    half = _copy(saved, "sngp", tmp_path / "half")
    (half / "manifest.json").unlink()  # what an interrupted save would leave behind
    with pytest.raises(ValueError, match="manifest"):
        sngp_models.load_model(half)


def test_truncated_weights_are_refused(saved, tmp_path) -> None:
    broken = _copy(saved, "deterministic", tmp_path / "broken")
    weights = broken / "weights.npz"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="checksum"):
        sngp_models.load_model(broken)


def test_altered_model_json_is_refused(saved, tmp_path) -> None:
    altered = _copy(saved, "mc_dropout", tmp_path / "altered")
    meta = json.loads((altered / "model.json").read_text())
    meta["config"]["num_mc_samples"] = 3
    (altered / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="checksum"):
        sngp_models.load_model(altered)


def test_missing_files_are_refused(saved, tmp_path) -> None:
    with pytest.raises(ValueError, match="manifest"):
        sngp_models.load_model(tmp_path / "does-not-exist")
    gone = _copy(saved, "deterministic", tmp_path / "gone")
    (gone / "weights.npz").unlink()
    with pytest.raises(ValueError):
        sngp_models.load_model(gone)


# --------------------------------------------------------------------------- atomic replacement


def test_saving_twice_replaces_the_model_without_leftovers(tmp_path, x_eval) -> None:
    x, y = make_two_moons(n_per_class=100, seed=0)
    first = sngp_models.make_model("deterministic", **SHORT).fit(x, y)
    second = sngp_models.make_model("deterministic", **{**SHORT, "seed": 5}).fit(x, y)
    target = tmp_path / "models" / "model"
    first.save(target)
    np.testing.assert_allclose(
        sngp_models.load_model(target).predict_proba(x_eval), first.predict_proba(x_eval), atol=1e-6, rtol=0
    )
    second.save(target)
    reloaded = sngp_models.load_model(target).predict_proba(x_eval)
    np.testing.assert_allclose(reloaded, second.predict_proba(x_eval), atol=1e-6, rtol=0)
    assert np.abs(reloaded - first.predict_proba(x_eval)).max() > 1e-3
    # Only the model itself: no .tmp-* staging dirs, no .old-* trash.
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "model.json", "weights.npz"]


def test_failed_save_keeps_the_previous_model(tmp_path, x_eval, monkeypatch) -> None:
    x, y = make_two_moons(n_per_class=100, seed=0)
    model = sngp_models.make_model("deterministic", **SHORT).fit(x, y)
    target = tmp_path / "model"
    model.save(target)
    before = sorted(p.name for p in tmp_path.iterdir())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError):
        model.save(target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no half-written staging dir left
    np.testing.assert_allclose(
        sngp_models.load_model(target).predict_proba(x_eval), model.predict_proba(x_eval), atol=1e-6, rtol=0
    )
