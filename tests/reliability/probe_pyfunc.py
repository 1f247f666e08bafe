"""Run by the battery in a fresh process (python probe_pyfunc.py SPEC_JSON); prints `REPORT {json}` last.

- roundtrip: every logged model, loaded with mlflow.pyfunc.load_model, predicts the run's test inputs;
  the largest difference to the probabilities/uncertainty the evaluate task saved (.npz);
- bad: how one model answers each bad input in BAD_INPUTS (exception type, its bases, message);
- big: predicting `big_rows` rows in one call (batched inside): seconds, RSS before, peak RSS after.

Nothing from the project is imported: the models must load from MLflow alone, as for any user.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings

import mlflow
import numpy as np
import pandas as pd
import psutil

COLUMNS = ["x0", "x1"]


def _frame(rows, dtype=np.float64) -> pd.DataFrame:
    return pd.DataFrame(np.asarray(rows, dtype=dtype), columns=COLUMNS)


# name -> (input factory, how it must be answered, words the message must contain)
#   "schema": MlflowException from the model's signature (before our code runs)
#   "input":  ModelInputError (a ValueError) from tasks/pyfunc_model.py
#   "ignored": MLflow drops columns the signature does not name (documented, with a warning); the
#              prediction must equal the one without the extra column
BAD_INPUTS = {
    "one-column": (lambda: pd.DataFrame({"x0": [0.5]}), "schema", ["missing inputs", "x1"]),
    "three-positional-columns": (lambda: np.zeros((2, 3)), "schema", ["missing inputs"]),
    "positional-frame": (lambda: pd.DataFrame(np.zeros((2, 2))), "schema", ["missing inputs", "x0"]),
    "1-d-array": (lambda: np.zeros(2), "schema", ["missing inputs"]),
    "list-of-lists": (lambda: [[0.0, 1.0]], "schema", ["missing inputs"]),
    "none": (lambda: None, "schema", ["DataFrame"]),
    "strings": (
        lambda: pd.DataFrame({"x0": ["a"], "x1": ["b"]}),
        "schema",
        ["Incompatible input types", "x0"],
    ),
    "numeric-strings": (
        lambda: pd.DataFrame({"x0": ["1.0"], "x1": ["2"]}),
        "schema",
        ["Incompatible input types"],
    ),
    "booleans": (lambda: pd.DataFrame({"x0": [True], "x1": [False]}), "schema", ["Incompatible input types"]),
    "int64-columns": (lambda: pd.DataFrame({"x0": [1], "x1": [2]}), "schema", ["int64"]),
    "nan": (lambda: _frame([[np.nan, 0.0], [0.0, 0.0]]), "input", ["NaN or infinite", "1 row", "row 0"]),
    "plus-inf": (lambda: _frame([[0.0, 0.0], [np.inf, 0.0]]), "input", ["NaN or infinite", "row 1"]),
    "minus-inf": (lambda: _frame([[0.0, -np.inf]]), "input", ["NaN or infinite"]),
    "none-in-float-column": (
        lambda: pd.DataFrame({"x0": [None, 1.0], "x1": [0.0, 1.0]}),
        "input",
        ["NaN or infinite"],
    ),
    "empty-frame": (lambda: _frame(np.zeros((0, 2))), "input", ["empty", "0 rows"]),
    "extra-named-column": (lambda: pd.DataFrame({"x0": [0.5], "x1": [0.25], "x2": [9.0]}), "ignored", []),
}


def roundtrip(spec: dict, x_test: np.ndarray) -> tuple[dict, dict]:
    frame = _frame(x_test)
    report, models = {}, {}
    for method, uri in spec["models"].items():
        model = models[method] = mlflow.pyfunc.load_model(uri)
        out = model.predict(frame)
        probs = out[[c for c in out.columns if c.startswith("prob_")]].to_numpy()
        with np.load(spec["predictions"][method]) as saved:
            want_probs, want_unc = saved["test_probs"], saved["test_uncertainty"]
        report[method] = {
            "columns": list(out.columns),
            "rows": len(out),
            "probs_diff": float(np.abs(probs - want_probs).max()),
            "uncertainty_diff": float(np.abs(out["uncertainty"].to_numpy() - want_unc).max()),
        }
    return report, models


def bad_inputs(model) -> dict:
    report = {}
    for name, (make, _, _) in BAD_INPUTS.items():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = model.predict(make())
            reference = model.predict(pd.DataFrame({"x0": [0.5], "x1": [0.25]}))
            report[name] = {
                "raised": False,
                "rows": len(out),
                "equals_without_extra": bool(
                    len(out) == 1
                    and list(out["predicted"]) == list(reference["predicted"])
                    and np.allclose(out.select_dtypes("number"), reference.select_dtypes("number"))
                ),
                "warnings": [str(w.message)[:300] for w in caught],
            }
        except Exception as exc:  # noqa: BLE001 - the report says what was raised
            report[name] = {
                "raised": True,
                "type": type(exc).__name__,
                "bases": [c.__name__ for c in type(exc).__mro__],
                "message": str(exc)[:2000],
            }
    return report


def big(model, rows: int) -> dict:
    rng = np.random.default_rng(0)
    rss_before = psutil.Process().memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    x = pd.DataFrame({"x0": rng.uniform(-3.5, 3.5, rows), "x1": rng.uniform(-2.5, 2.5, rows)})
    started = time.perf_counter()
    out = model.predict(x)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    probs = out[[c for c in out.columns if c.startswith("prob_")]].to_numpy()
    return {
        "rows": rows,
        "seconds": seconds,
        "rss_before": rss_before,
        "peak_before": peak_before,
        "peak": peak,
        "input_bytes": int(x.memory_usage(deep=True).sum()),
        "output_rows": len(out),
        "output_columns": list(out.columns),
        "finite": bool(np.isfinite(out.select_dtypes("number").to_numpy()).all()),
        "row_sum_error": float(np.abs(probs.sum(axis=1) - 1).max()),
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    mlflow.set_tracking_uri(spec["tracking_uri"])
    with np.load(spec["data_path"]) as data:
        x_test = data["x_test"]
    report = {}
    report["roundtrip"], models = roundtrip(spec, x_test)
    model = models[spec["bad_input_model"]]
    report["bad"] = bad_inputs(model)
    report["big"] = big(model, int(spec["big_rows"]))
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
