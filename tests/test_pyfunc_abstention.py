"""The logged pyfunc model's abstention contract (DESIGN.md "The model contract"), on a small SNGP model
logged by the pipeline's own tasks.tracking.log_model into a real MLflow SQLite store, loaded and used
with mlflow.pyfunc.load_model in fresh processes:

- outputs `predicted`, `prob_<class>`, `uncertainty`, `abstain` (uncertainty > the calibrated threshold;
  `predicted` still given when abstaining); the OOD cluster abstained, the test split at the target;
- `unwrap_python_model().abstention` is the calibrated Abstention (threshold, target_coverage,
  reference_uncertainty) and the signature declares the param `abstain_threshold`, which overrides it;
- bad inputs and params raise MlflowException(INVALID_PARAMETER_VALUE) that is also a ValueError;
- neither logging nor loading warns "Add type hints to the `predict` method";
- loading imports neither `tasks` nor `flows`, and the model carries sngp_models and pinned requirements.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.cli import REPO, run_python

TYPE_HINT_WARNING = "Add type hints to the `predict` method"

LOG = r"""
import json, sys, warnings
warnings.simplefilter("always")
from pathlib import Path
import mlflow, numpy as np
import sngp_models
from sngp_models import evaluation
from sngp_models.data import make_dataset
from tasks import tracking

out = Path(sys.argv[1])
data = make_dataset(seed=0, n_per_class=100, n_test_per_class=100, n_grid=10, n_ood=100)
model = sngp_models.make_model(
    "sngp", seed=0, epochs=10, batch_size=32, learning_rate=0.003, num_layers=2, num_hidden=32,
    num_inducing=128,
).fit(data.x_train, data.y_train)
model.save(out / "model")
arrays, _ = evaluation.predict_splits(model, data)
abstention = evaluation.calibrate_test(arrays, 0.9)
abstention.save(out / "abstention.json")
metrics = evaluation.metrics_from_predictions(data, arrays, abstention)
np.savez(out / "inputs.npz", x_test=data.x_test, x_ood=data.x_ood, **arrays)
uri = f"sqlite:///{out / 'mlflow.db'}"
experiment = tracking.setup(uri, "pyfunc-abstention")
with mlflow.start_run(experiment_id=experiment):
    info = tracking.log_model(str(out / "model"), str(out / "abstention.json"))
print("LOGGED " + json.dumps({"uri": uri, "model_uri": info.model_uri, "metrics": metrics}), flush=True)
"""

USE = r"""
import json, sys, warnings
warnings.simplefilter("always")
import mlflow, numpy as np, pandas as pd
from mlflow.exceptions import MlflowException

mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
with np.load(sys.argv[3]) as f:
    x_test, x_ood = f["x_test"], f["x_ood"]
frame = lambda x: pd.DataFrame(x.astype(np.float64), columns=["x0", "x1"])
python_model = model.unwrap_python_model()
ab = python_model.abstention
report = {
    "abstention": {
        "type": type(ab).__name__,
        "threshold": ab.threshold,
        "target_coverage": ab.target_coverage,
        "reference": np.asarray(ab.reference_uncertainty).tolist(),
    },
    "params_schema": model.metadata.get_params_schema().to_dict(),
    "outputs": model.metadata.get_output_schema().to_dict(),
}
test, ood = model.predict(frame(x_test)), model.predict(frame(x_ood))
report["columns"] = list(test.columns)
report["dtypes"] = {c: str(t) for c, t in test.dtypes.items()}
report["test"] = {c: test[c].astype(str if c == "predicted" else float).tolist() for c in test.columns}
report["ood_abstain"] = ood["abstain"].tolist()
report["override"] = {
    str(t): model.predict(frame(x_test), params={"abstain_threshold": t})["abstain"].tolist()
    for t in (0.0, -1.0, 1.0, 0.05)
}
report["int_param"] = model.predict(frame(x_test[:3]), params={"abstain_threshold": 1})["abstain"].tolist()
errors = {}
cases = {
    "nan-input": lambda: model.predict(pd.DataFrame({"x0": [np.nan], "x1": [0.0]})),
    "empty": lambda: model.predict(pd.DataFrame({"x0": np.zeros(0), "x1": np.zeros(0)})),
    "nan-param": lambda: model.predict(frame(x_test[:2]), params={"abstain_threshold": float("nan")}),
    "string-param": lambda: model.predict(frame(x_test[:2]), params={"abstain_threshold": "high"}),
    "direct-unknown-param": lambda: python_model.predict(None, frame(x_test[:2]), params={"thresh": 0.1}),
    "direct-bool-param": lambda: python_model.predict(
        None, frame(x_test[:2]), params={"abstain_threshold": True}
    ),
}
for name, call in cases.items():
    try:
        call()
        errors[name] = None
    except Exception as exc:
        errors[name] = {
            "type": type(exc).__name__,
            "mlflow": isinstance(exc, MlflowException),
            "value_error": isinstance(exc, ValueError),
            "code": getattr(exc, "error_code", None),
            "message": str(exc)[:1000],
        }
report["errors"] = errors
report["imported"] = sorted({m.split(".")[0] for m in sys.modules} & {"tasks", "flows", "prefect"})
print("REPORT " + json.dumps(report), flush=True)
"""


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    out = tmp_path_factory.mktemp("pyfunc-abstention")
    result, log = run_python(LOG, str(out), cwd=REPO)
    return out, result, log


@pytest.fixture(scope="module")
def used(logged):
    out, result, _ = logged
    cwd = out / "elsewhere"
    cwd.mkdir()
    return run_python(USE, result["uri"], result["model_uri"], str(out / "inputs.npz"), cwd=cwd)


def test_logging_and_loading_do_not_ask_for_type_hints(logged, used):
    assert TYPE_HINT_WARNING not in logged[2], logged[2][-3000:]
    assert TYPE_HINT_WARNING not in used[1], used[1][-3000:]


def test_outputs_abstain_above_the_calibrated_threshold(logged, used):
    out, result, _ = logged
    report, _ = used
    assert report["columns"] == ["predicted", "prob_0", "prob_1", "uncertainty", "abstain"]
    assert report["dtypes"]["abstain"] == "bool"
    test = report["test"]
    threshold = report["abstention"]["threshold"]
    assert result["metrics"]["abstain_threshold"] == threshold
    unc = np.asarray(test["uncertainty"])
    assert [bool(a) for a in test["abstain"]] == (unc > threshold).tolist()
    # predicted is given on every row, abstained or not
    argmax = np.argmax(np.c_[test["prob_0"], test["prob_1"]], axis=1)
    assert test["predicted"] == [str(i) for i in argmax]
    # ~ target coverage of the test split accepted (the same split it was calibrated on)
    assert abs((1 - np.mean(test["abstain"])) - 0.9) <= 0.02, np.mean(test["abstain"])
    # the OOD cluster: SNGP abstains on (nearly) all of it, as the metric says
    assert np.mean(report["ood_abstain"]) == pytest.approx(result["metrics"]["ood_reject_rate"], abs=0.02)
    assert np.mean(report["ood_abstain"]) >= 0.9, np.mean(report["ood_abstain"])


def test_unwrapped_model_carries_the_abstention(logged, used):
    out, _, _ = logged
    report, _ = used
    from sngp_models.abstention import Abstention

    saved = Abstention.load(out / "abstention.json")
    ab = report["abstention"]
    assert ab["type"] == "Abstention"
    assert ab["threshold"] == saved.threshold and ab["target_coverage"] == 0.9
    np.testing.assert_array_equal(ab["reference"], saved.reference_uncertainty)
    with np.load(out / "inputs.npz") as f:
        np.testing.assert_array_equal(ab["reference"], f["test_uncertainty"].astype(np.float64))


def test_signature_declares_the_threshold_param(used):
    report, _ = used
    assert report["params_schema"] == [
        {
            "name": "abstain_threshold",
            "type": "double",
            "default": report["abstention"]["threshold"],
            "shape": None,
        }
    ]
    assert {"name": "abstain", "type": "boolean", "required": True} in report["outputs"]


def test_params_override_the_threshold(used):
    report, _ = used
    unc = np.asarray(report["test"]["uncertainty"])
    override = report["override"]
    assert override["0.0"] == (unc > 0).tolist()
    assert all(override["-1.0"]) and not any(override["1.0"])
    assert override["0.05"] == (unc > 0.05).tolist()
    assert report["int_param"] == [False] * 3  # an int is a number too


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("nan-input", ["NaN or infinite", "row 0"]),
        ("empty", ["empty", "0 rows"]),
        ("nan-param", ["abstain_threshold", "finite"]),
        ("string-param", ["abstain_threshold"]),
        ("direct-unknown-param", ["thresh", "abstain_threshold"]),
        ("direct-bool-param", ["abstain_threshold", "number"]),
    ],
)
def test_bad_input_is_an_invalid_parameter_value(used, case, words):
    error = used[0]["errors"][case]
    assert error is not None, case
    assert error["mlflow"] and error["code"] == "INVALID_PARAMETER_VALUE", error
    if case != "string-param":  # MLflow's own params check: an MlflowException only
        assert error["type"] == "ModelInputError" and error["value_error"], error
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert "Traceback" not in error["message"]


def test_model_is_self_contained(logged, used):
    """Loading imports neither the project's tasks nor flows (nor Prefect); the model directory carries
    the library and its requirements pinned to this environment's versions."""
    import importlib.metadata

    import mlflow

    out, result, _ = logged
    assert used[0]["imported"] == []
    mlflow.set_tracking_uri(result["uri"])
    local = Path(mlflow.artifacts.download_artifacts(result["model_uri"], dst_path=str(out / "download")))
    assert (local / "code" / "sngp_models" / "abstention.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    requirements = (local / "requirements.txt").read_text().split()
    for name in ("tensorflow", "tf-keras", "tf-models-official", "numpy", "pandas", "scikit-learn", "mlflow"):
        assert f"{name}=={importlib.metadata.version(name)}" in requirements, (name, requirements)
