"""Your own data (`dataset: table`) end to end: real tables shipped with scikit-learn, written to CSV and
Parquet by the test, through `sngp run` and `sngp retrain` (real Prefect, real MLflow, nothing mocked).

- wine (CSV, 3 classes, 13 features, an id column, no OOD source: OOD metrics skipped and said so);
- breast cancer (Parquet, 2 classes, 30 features, string labels, an `ood_path` of far-away inputs);
- digits as a table (Parquet, two files matched by a glob, 64 pixel columns, `ood_classes` 5-9).

Each run: a complete MLflow record, the datasets logged (`run.inputs.dataset_inputs`: train, test, ood),
the data params, and a pyfunc model that answers by column name (any order, extra columns ignored,
a missing one named) with `predicted` (class name), `prob_<class name>` and `uncertainty`.
Retraining: a file appended to a glob means more training rows, a hold-out without any training row,
and an untouched source is a cache hit. `pytest -s` prints every method's metrics per table.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import sklearn.datasets
import yaml
from support.cli import describe, run_python, run_sngp
from support.records import STUDY_METHODS, check_data_lineage, children, logged_models

from sngp_models.evaluation import GRID_METRICS, METRIC_NAMES, OOD_METRICS
from sngp_models.table import test_side

pytestmark = pytest.mark.e2e

SMALL = {  # seconds per method on 2 shared cores
    "methods": list(STUDY_METHODS),
    "model": {"num_layers": 2, "num_hidden": 32},
    "training": {"epochs": 8, "batch_size": 64, "learning_rate": 0.003},
    "sngp": {"num_inducing": 128},
    "mc_dropout": {"num_samples": 3},
    "deep_ensemble": {"ensemble_size": 2},
}


# ---------------------------------------------------------------------------------------------------------
# The tables, as a team would have them


def wine_frame() -> pd.DataFrame:
    wine = sklearn.datasets.load_wine(as_frame=True)
    frame = wine.frame.drop(columns="target")
    frame.insert(0, "sample_id", np.arange(1, len(frame) + 1))
    frame["cultivar"] = np.asarray(wine.target_names)[wine.target]
    return frame


def cancer_frame() -> pd.DataFrame:
    cancer = sklearn.datasets.load_breast_cancer(as_frame=True)
    frame = cancer.frame.drop(columns="target")
    frame["diagnosis"] = np.asarray(cancer.target_names)[cancer.target]  # "malignant" / "benign"
    return frame


def digits_frame() -> pd.DataFrame:
    digits = sklearn.datasets.load_digits(as_frame=True)
    frame = digits.frame.drop(columns="target").astype(np.float64)
    frame["digit"] = digits.target
    return frame


def write_config(workdir, name: str, table: dict, **sections) -> str:
    config = {"seed": 0, "dataset": "table", "table": table, **SMALL, "mlflow": {"experiment": name}}
    config.update(sections)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# Checks


def expected_metrics(has_ood: bool, grid: bool) -> set[str]:
    """The grid metrics only for 2-feature tables, the OOD metrics only with an OOD set."""
    return {m for m in METRIC_NAMES if (grid or m not in GRID_METRICS) and (has_ood or m not in OOD_METRICS)}


def check_table_record(
    uri: str, parent_id: str, rows: dict[str, int], classes: list[str], grid: bool = False
) -> dict:
    """A FINISHED parent with config.yaml and comparison.csv (+ comparison.png with a grid); per method
    a FINISHED child with exactly its metrics (finite), per-epoch curves, cache tags, the reliability
    plot (+ the surfaces with a grid), one pyfunc model; on every run the datasets (train/test/ood with
    name, source, digest, rows) and the data params."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED", parent.info.status
    parent_files = {a.path for a in client.list_artifacts(parent_id)}
    parent_files |= {a.path for a in client.list_artifacts(parent_id, "plots")}
    assert {"config.yaml", "comparison.csv"} <= parent_files
    assert ("plots/comparison.png" in parent_files) == grid, parent_files
    kids = children(client, parent_id)
    assert sorted(kids) == sorted(STUDY_METHODS), sorted(kids)
    for run in [parent, *kids.values()]:
        check_data_lineage(run, rows, classes)
    for method, run in kids.items():
        assert run.info.status == "FINISHED", (method, run.info.status)
        assert set(run.data.metrics) - {"loss", "accuracy"} == expected_metrics(rows["ood"] > 0, grid), (
            method,
            sorted(run.data.metrics),
        )
        assert all(math.isfinite(v) for v in run.data.metrics.values()), (method, run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "loss")) == SMALL["training"]["epochs"]
        plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert "plots/reliability.png" in plots, (method, plots)
        assert ("plots/uncertainty_histogram.png" in plots) == (rows["ood"] > 0), (method, plots)
        surfaces = {"plots/class_probability.png", "plots/uncertainty.png", "plots/distance_curve.png"}
        assert surfaces & plots == (surfaces if grid else set()), (method, plots)  # 2 features only
        assert len(logged_models(uri, run)) == 1, method
        assert {run.data.tags.get(f"cached.{s}") for s in ("train", "evaluate", "plot")} <= {"true", "false"}
    sngp = kids["sngp"].data.params
    assert sngp["gp_kernel_scale"] == "auto" and float(sngp["gp_kernel_scale_chosen"]) > 0, sngp
    return kids


PREDICT = r"""
import io, json, sys
import mlflow, numpy as np, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
frame = pd.read_json(io.StringIO(sys.argv[2]), orient="split").astype("float64")  # features are doubles
frame = frame[frame.columns[::-1]]            # any column order
frame["not_a_feature"] = 1.0                  # extra columns are ignored
out = {}
for uri in sys.argv[4:]:
    model = mlflow.pyfunc.load_model(uri)
    pred = model.predict(frame)
    try:
        model.predict(frame.drop(columns=[sys.argv[3]]))
        missing = None
    except Exception as exc:
        missing = f"{type(exc).__name__}: {exc}"
    probs = pred[[c for c in pred.columns if c.startswith("prob_")]].to_numpy(dtype=float)
    out[uri] = {
        "columns": list(pred.columns),
        "predicted": [str(p) for p in pred["predicted"]],
        "argmax": probs.argmax(axis=1).tolist(),
        "row_sums": probs.sum(axis=1).tolist(),
        "uncertainty_error": float(np.abs(pred["uncertainty"] - (1 - (probs**2).sum(axis=1)) / 2).max()),
        "missing": missing,
    }
print("RESULT " + json.dumps(out))
"""


def check_pyfunc(uri: str, kids: dict, frame: pd.DataFrame, classes: list[str], workdir) -> dict:
    """Every method's logged model, in a fresh process, by column name (see PREDICT)."""
    models = {m: f"models:/{logged_models(uri, r)[0].model_id}" for m, r in kids.items()}
    dropped = frame.columns[-1]
    results, _ = run_python(
        PREDICT, uri, frame.to_json(orient="split"), dropped, *models.values(), cwd=workdir
    )
    for method, model_uri in models.items():
        r = results[model_uri]
        columns = ["predicted", *[f"prob_{c}" for c in classes], "uncertainty", "abstain"]
        assert r["columns"] == columns, (method, r)
        assert r["predicted"] == [classes[i] for i in r["argmax"]], method
        assert all(abs(s - 1) < 1e-5 for s in r["row_sums"]) and r["uncertainty_error"] < 1e-5, method
        assert r["missing"] and "missing inputs" in r["missing"] and repr(str(dropped)) in r["missing"], r
    return results


def print_metrics(table: str, kids: dict) -> None:
    names = [m for m in METRIC_NAMES if m not in GRID_METRICS and not m.endswith("_seconds")]
    print(f"\n[table] {table}: " + "  ".join(names))
    for method, run in kids.items():
        cells = "  ".join(f"{run.data.metrics[m]:.4f}" if m in run.data.metrics else "-" for m in names)
        print(f"[table]   {method:<14} {cells}")


# ---------------------------------------------------------------------------------------------------------
# 1. Three real tables through `sngp run`

# Each table's name and what it exercises (prepare() writes it).
TABLES = [
    ("wine", "CSV, id column, no OOD source"),
    ("cancer", "Parquet, string labels, ood_path"),
    ("digits", "two Parquet files by glob, ood_classes 5-9"),
    ("wine-2d", "CSV, 2 features: surfaces over the data's range"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tables")


def prepare(name: str, workdir) -> tuple[str, pd.DataFrame, dict[str, int], list[str]]:
    """Write table `name` and its config -> (config path, rows a client sends, rows per split, classes)."""
    from sngp_models.table import load_table

    data = workdir / name
    data.mkdir()
    if name == "wine-2d":
        frame = wine_frame()
        frame.to_csv(data / "wine.csv", index=False)
        table = {"path": str(data / "wine.csv"), "label": "cultivar", "features": ["alcohol", "flavanoids"]}
        features = frame[["flavanoids", "alcohol"]]
    elif name == "wine":
        frame = wine_frame()
        frame.to_csv(data / "wine.csv", index=False)
        table = {"path": str(data / "wine.csv"), "label": "cultivar", "id_column": "sample_id"}
        features = frame.drop(columns=["sample_id", "cultivar"])
    elif name == "cancer":
        frame = cancer_frame()
        frame.to_parquet(data / "cancer.parquet", index=False)
        features = frame.drop(columns="diagnosis")
        noise = np.random.default_rng(0).normal(0, 1, (60, features.shape[1]))
        (features.sample(60, random_state=0) * 8 + noise).to_parquet(data / "far.parquet", index=False)
        table = {
            "path": str(data / "cancer.parquet"),
            "label": "diagnosis",
            "ood_path": str(data / "far.parquet"),
        }
    else:
        frame = digits_frame()
        half = len(frame) // 2
        frame.iloc[:half].to_parquet(data / "digits-part1.parquet", index=False)
        frame.iloc[half:].to_parquet(data / "digits-part2.parquet", index=False)
        table = {"path": str(data / "digits-*.parquet"), "label": "digit", "ood_classes": [5, 6, 7, 8, 9]}
        features = frame.drop(columns="digit")
    split = load_table(**table)
    rows = {"train": len(split.x_train), "test": len(split.x_test), "ood": len(split.x_ood)}
    classes, ood = {
        "wine": (["class_0", "class_1", "class_2"], 0),
        "wine-2d": (["class_0", "class_1", "class_2"], 0),
        "cancer": (["benign", "malignant"], 60),
        "digits": (["0", "1", "2", "3", "4"], 896),  # every image of the digits 5-9
    }[name]
    assert list(split.class_names) == classes and rows["ood"] == ood, (split.class_names, rows)
    assert rows["train"] + rows["test"] + (ood if name == "digits" else 0) == len(frame)
    return write_config(workdir, f"table-{name}", table), features.head(7), rows, classes


@pytest.fixture(scope="module", params=[name for name, _ in TABLES])
def table_run(request, workdir):
    name = request.param
    config, sample, rows, classes = prepare(name, workdir)
    proc = run_sngp(["run", "--config", config], workdir)
    assert proc.returncode == 0, describe(proc)
    assert not proc.leaked, describe(proc)
    return name, proc, sample, rows, classes


def test_table_run_records_everything(table_run, workdir, mlflow_reader):
    name, proc, sample, rows, classes = table_run
    reader = mlflow_reader(workdir)
    kids = check_table_record(reader.uri, proc.parent_id, rows, classes, grid=name == "wine-2d")
    print_metrics(f"{name} ({dict(TABLES)[name]}; rows {rows})", kids)
    for method, run in kids.items():
        assert run.data.params["standardize"] == "True", method  # the scaling travels with the model
        assert run.data.metrics["test_accuracy"] > 0.6, (name, method, run.data.metrics["test_accuracy"])
    if rows["ood"] == 0:
        assert "OOD metrics skipped" in proc.stderr, describe(proc)
    else:
        ood = {m: r.data.metrics["ood_auroc"] for m, r in kids.items()}
        assert all(0 <= v <= 1 for v in ood.values()), ood
    assert reader.running() == []


def test_table_models_answer_by_column_name(table_run, workdir, mlflow_reader):
    name, proc, sample, rows, classes = table_run
    reader = mlflow_reader(workdir)
    kids = reader.children(proc.parent_id)
    check_pyfunc(reader.uri, kids, sample, classes, workdir)


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("/data/wine.csv", "wine"),
        ("/data/digits-*.parquet", "digits-*"),
        ("/data/labelled/*.csv", "labelled"),  # a pattern of wildcards only: its folder names the data
        ("/data/labelled/*.csv + /data/far.parquet", "labelled"),
    ],
)
def test_a_tables_datasets_are_named_after_its_files(source, name):
    from tasks.tracking import data_name  # lazy: imports MLflow, which collection need not load

    assert data_name({"dataset": "table", "source": source}) == name


def test_csv_and_parquet_give_the_same_data(tmp_path):
    """The same table as CSV and as Parquet -> the same splits, names and keys (the format is only
    how the rows are stored)."""
    from sngp_models.table import load_table

    frame = cancer_frame()
    frame.to_csv(tmp_path / "cancer.csv", index=False)
    frame.to_parquet(tmp_path / "cancer.parquet", index=False)
    a = load_table(str(tmp_path / "cancer.csv"), "diagnosis")
    b = load_table(str(tmp_path / "cancer.parquet"), "diagnosis")
    assert a.class_names == b.class_names == ("benign", "malignant")
    assert a.feature_names == b.feature_names and len(a.feature_names) == 30
    np.testing.assert_array_equal(a.keys_train, b.keys_train)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)


def test_retrain_flow_takes_a_config_path(tmp_path):
    """What `make deploy RETRAIN_CONFIG=...` schedules: retrain/nightly with `config_path`. The file is
    the base; a section passed besides it overrides the keys it sets, the defaults override nothing."""
    import inspect

    from flows.config import TableConfig, TrainingConfig, config_from_flow_parameters
    from flows.retrain import retrain

    wine_frame().to_csv(tmp_path / "wine.csv", index=False)
    table = {"path": str(tmp_path / "wine.csv"), "label": "cultivar", "id_column": "sample_id"}
    path = write_config(tmp_path, "nightly", table)
    parameters = {name: p.default for name, p in inspect.signature(retrain.fn).parameters.items()}
    config = config_from_flow_parameters({**parameters, "config_path": path})
    assert config.dataset == "table" and config.table.path == table["path"]
    assert config.training.epochs == SMALL["training"]["epochs"] and config.sngp.gp_kernel_scale == "auto"
    override = {**parameters, "config_path": path, "training": TrainingConfig(epochs=3), "seed": 4}
    config = config_from_flow_parameters(override)
    assert (config.training.epochs, config.training.batch_size, config.seed) == (3, 64, 4)
    assert config.table == TableConfig(**table) and config.methods == SMALL["methods"]


# ---------------------------------------------------------------------------------------------------------
# 2. Retraining on new data: append a file to the glob


def registry_version(uri: str, name: str, version: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_model_version(name, version).tags


def newest_data_file(workdir):
    files = sorted((workdir / ".sngp_cache" / "data").glob("table-*.npz"), key=lambda p: p.stat().st_mtime)
    return files[-1]


def test_retrain_on_an_appended_file(tmp_path, mlflow_reader):
    frame = wine_frame()
    data = tmp_path / "labelled"
    data.mkdir()
    frame.iloc[:110].to_csv(data / "part-1.csv", index=False)
    table = {"path": str(data / "part-*.csv"), "label": "cultivar", "id_column": "sample_id"}
    config = write_config(
        tmp_path,
        "retrain-table",
        table,
        methods=["deterministic", "sngp"],
        retrain={"registry_prefix": "wine"},
    )
    first = run_sngp(["retrain", "--config", config], tmp_path)
    assert first.returncode == 0, describe(first)
    first_file = newest_data_file(tmp_path)
    frame.iloc[110:].to_csv(data / "part-2.csv", index=False)  # new labelled rows arrive
    second = run_sngp(["retrain", "--config", config], tmp_path)
    assert second.returncode == 0, describe(second)
    second_file = newest_data_file(tmp_path)
    third = run_sngp(["retrain", "--config", config], tmp_path)  # nothing changed
    assert third.returncode == 0, describe(third)

    reader = mlflow_reader(tmp_path)
    v1, v2 = (registry_version(reader.uri, "wine-sngp", v) for v in ("1", "2"))
    print(
        f"\n[table] retrain: v1 trained on {v1['data.rows_train']} rows (hold-out {v1['holdout.rows']}), "
        f"v2 on {v2['data.rows_train']} (hold-out {v2['holdout.rows']}); v2: "
        f"{v2.get('promoted') or v2.get('rejected')}"
    )
    # The new version trained on more rows, from other data.
    assert int(v2["data.rows_train"]) > int(v1["data.rows_train"]), (v1, v2)
    assert v1["data.digest"] != v2["data.digest"]
    assert second.task_states()["train-sngp"] == "Completed()", second.task_states()

    # Its hold-out holds none of its training rows: from the data file it trained on, and by the rule.
    with np.load(second_file) as f:
        train_keys, holdout_keys = set(f["keys_train"].tolist()), set(f["keys_test"].tolist())
    assert len(train_keys) == int(v2["data.rows_train"]) and len(holdout_keys) == int(v2["holdout.rows"])
    assert not train_keys & holdout_keys
    assert v2["holdout.overlap_rows"] == "0"
    ids = frame["sample_id"].astype(str).to_numpy()
    assert holdout_keys == set(ids[test_side(ids, 0.2)])
    # A row never changes side when files are added: the first hold-out is inside the second.
    with np.load(first_file) as f:
        assert set(f["keys_test"].tolist()) <= holdout_keys
        assert set(f["keys_train"].tolist()) <= train_keys

    # An unchanged source is a cache hit: no data read again, nothing trained.
    states = third.task_states()
    data_tasks = {k: v for k, v in states.items() if k.startswith("generate-data")}
    assert data_tasks and set(data_tasks.values()) == {"Cached(type=COMPLETED)"}, states
    assert states["train-sngp"] == states["train-deterministic"] == "Cached(type=COMPLETED)", states
    v3 = registry_version(reader.uri, "wine-sngp", "3")
    assert v3["data.digest"] == v2["data.digest"] and v3["data.rows_train"] == v2["data.rows_train"]
    assert reader.running() == []
