"""Bad table input through `sngp run`: each case one line on stderr naming the file/column/value and what
is allowed, exit code 2, before Prefect or MLflow start (so no MLflow run exists, let alone RUNNING).
Real files written by the test, CSV and Parquet; nothing mocked. Each case is one test id.

The same checks guard a deployment run (the retrain flow's `config_path`): the flow fails with the
same message before it opens an MLflow run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from support.cli import describe, run_sngp

from flows.config import ConfigError, config_from_flow_parameters

pytestmark = pytest.mark.e2e

GOOD = pd.DataFrame(
    {
        "id": np.arange(40),
        "a": np.linspace(0.0, 1.0, 40),
        "b": np.linspace(5.0, -5.0, 40) ** 2,
        "label": ["x", "y"] * 20,
    }
)


def write(tmp_path, name: str, frame: pd.DataFrame) -> str:
    path = tmp_path / name
    if name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return str(path)


def with_nan(tmp_path) -> dict:
    frame = GOOD.copy()
    frame.loc[[7, 9, 30], "b"] = [np.nan, np.inf, np.nan]
    return {"path": write(tmp_path, "t.csv", frame), "label": "label"}


def single_class(tmp_path) -> dict:
    return {"path": write(tmp_path, "t.parquet", GOOD.assign(label="x")), "label": "label"}


def rare_class(tmp_path) -> dict:
    frame = GOOD.copy()
    frame.loc[0, "label"] = "z"  # one row of class z: fewer than 2 training rows, whichever side
    return {"path": write(tmp_path, "t.csv", frame), "label": "label"}


def corrupt_parquet(tmp_path) -> dict:
    (tmp_path / "t.parquet").write_bytes(b"PAR1 this is not a parquet file" * 10)
    return {"path": str(tmp_path / "t.parquet"), "label": "label"}


def corrupt_csv(tmp_path) -> dict:
    (tmp_path / "t.csv").write_bytes(b"a,b,label\n\xff\xfe\x00\x81,2,x\n")
    return {"path": str(tmp_path / "t.csv"), "label": "label"}


def empty_csv(tmp_path) -> dict:
    (tmp_path / "t.csv").write_text("")
    return {"path": str(tmp_path / "t.csv"), "label": "label"}


def header_only(tmp_path) -> dict:
    (tmp_path / "t.csv").write_text("a,b,label\n")
    return {"path": str(tmp_path / "t.csv"), "label": "label"}


def duplicate_columns(tmp_path) -> dict:
    (tmp_path / "t.csv").write_text("a,a,label\n1,2,x\n3,4,y\n")
    return {"path": str(tmp_path / "t.csv"), "label": "label"}


def text_feature(tmp_path) -> dict:
    frame = GOOD.assign(colour=["red", "blue"] * 20)
    return {"path": write(tmp_path, "t.parquet", frame), "label": "label", "features": ["a", "colour"]}


def ood_columns(tmp_path) -> dict:
    ood = write(tmp_path, "ood.csv", pd.DataFrame({"a": [1.0, 2.0], "c": [3.0, 4.0]}))
    return {"path": write(tmp_path, "t.csv", GOOD), "label": "label", "ood_path": ood}


def beyond_float32(tmp_path) -> dict:
    return {"path": write(tmp_path, "t.csv", GOOD.assign(a=1e300)), "label": "label"}


def ood_text(tmp_path) -> dict:
    ood = write(tmp_path, "ood.csv", pd.DataFrame({"id": [1, 2], "a": ["far", "away"], "b": [3.0, 4.0]}))
    return {"path": write(tmp_path, "t.csv", GOOD), "label": "label", "ood_path": ood}


def glob_extra_column(tmp_path) -> dict:
    write(tmp_path, "p1.csv", GOOD)
    write(tmp_path, "p2.csv", GOOD.assign(c=1.0))
    return {"path": str(tmp_path / "p*.csv"), "label": "label"}


def at(*parts: str):
    """A table section whose path is `parts` under the data folder (which holds nothing)."""
    return lambda tmp_path: {"path": str(tmp_path.joinpath(*parts)), "label": "label"}


def good(**extra):
    return lambda tmp_path: {"path": write(tmp_path, "t.csv", GOOD), "label": "label", **extra}


# name -> (table section factory, words the one error line must contain)
CASES = {
    "missing-file": (at("nope.csv"), ["nope.csv", "does not exist"]),
    "glob-matches-nothing": (at("new", "*.parquet"), ["*.parquet", "matches no file"]),
    "directory": (at(), ["is a directory", "CSV or Parquet"]),
    "corrupt-csv": (corrupt_csv, ["t.csv", "not a readable CSV"]),
    "corrupt-parquet": (corrupt_parquet, ["t.parquet", "not a readable Parquet"]),
    "empty-file": (empty_csv, ["t.csv", "empty"]),
    "header-only": (header_only, ["t.csv", "no data rows"]),
    "label-missing": (good(label="outcome"), ["table.label", "'outcome'", "columns"]),
    "feature-not-numeric": (text_feature, ["table.features", "'colour'", "not numeric", "'red'"]),
    "nan-or-inf": (with_nan, ["3 row(s)", "data row 8", "column 'b'", "missing: drop"]),
    "single-class": (single_class, ["table.label", "at least 2 classes", "'x'"]),
    "class-with-one-row": (rare_class, ["table.label", "class 'z'", "at least 2 per class"]),
    "ood-class-not-a-label": (good(ood_classes=["w"]), ["table.ood_classes", "'w'", "'x', 'y'"]),
    "all-classes-held-out": (good(ood_classes=["x", "y"]), ["table.label", "all classes are held out"]),
    "ood-columns-differ": (ood_columns, ["table.ood_path", "'b'"]),
    "duplicate-columns": (duplicate_columns, ["t.csv", "duplicate column", "'a'"]),
    "feature-absent": (good(features=["a", "z"]), ["table.features", "'z'", "columns"]),
    "test-fraction-one": (good(test_fraction=1.0), ["table.test_fraction", "less than 1"]),
    "test-fraction-zero": (good(test_fraction=0), ["table.test_fraction", "greater than 0"]),
    "no-label-key": (lambda p: {"path": write(p, "t.csv", GOOD)}, ["table.label", "required"]),
    "unknown-key": (good(lable="label"), ["table.lable", "unknown key", "label"]),
    "missing-policy": (good(missing="skip"), ["table.missing", "'error' or 'drop'", "skip"]),
    "beyond-float32": (beyond_float32, ["t.csv", "data row 1", "float32"]),
    "ood-not-numeric": (ood_text, ["table.ood_path", "ood.csv", "'a'", "not numeric", "'far'"]),
    "glob-files-differ": (glob_extra_column, ["p2.csv", "other columns than p1.csv (extra: 'c')"]),
}  # fmt: skip


def config_file(tmp_path, table: dict) -> str:
    config = {"dataset": "table", "table": table, "methods": ["sngp"], "training": {"epochs": 1}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_table_fails_in_one_line(case, tmp_path):
    make, words = CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = run_sngp(["run", "--config", config_file(tmp_path, make(data))], workdir)
    assert proc.returncode == 2, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sngp run: error: "), describe(proc)
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (workdir / "mlflow.db").exists(), "an MLflow store was created for bad input"
    assert not (workdir / "prefect").exists(), "Prefect started for bad input"


def test_deployment_parameters_get_the_same_check(tmp_path):
    """What a `retrain/nightly` run with `config_path` does first: the same one-line error, before any
    MLflow run exists."""
    path = config_file(tmp_path, {"path": str(tmp_path / "nope.csv"), "label": "label"})
    with pytest.raises(ConfigError, match=r"table\.path: .*nope\.csv does not exist"):
        config_from_flow_parameters({"config_path": path, "seed": 0, "methods": None})
