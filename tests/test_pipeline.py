"""End to end: `sngp run` in Prefect local mode, recorded in a real MLflow SQLite store, read back via MLflow.

The first smoke run (module-scoped) is shared by the record checks; a second identical run checks the
cache (every train/evaluate/plot task Cached, yet a complete new MLflow record), a third changes one SNGP
setting and must retrain only SNGP. Bad configs must fail fast (before Prefect starts) with one line;
a run whose task fails for real must leave MLflow runs FAILED, never RUNNING.

`pytest -s` shows the measured cold/warm wall times.
"""

from __future__ import annotations

import math
import re

import pytest
import yaml
from support import records
from support.cli import REPO, SMOKE, describe, run_python, run_sngp
from support.records import STUDY_METHODS as METHODS

EPOCHS = int(yaml.safe_load(SMOKE.read_text())["training"]["epochs"])
STAGES = ("train", "evaluate", "plot")
FLOW_SECONDS = re.compile(r"\(Prefect flow run ([0-9.]+) s\)")


def flow_seconds(proc) -> float:
    """The flow run's duration that `sngp run` reports (Prefect's start and end times)."""
    found = FLOW_SECONDS.search(proc.stdout)
    assert found, f"no flow run duration in stdout\n{describe(proc)}"
    return float(found.group(1))


def check_complete_record(reader, parent_id: str) -> dict:
    """The complete record (tests/support) of a smoke run: parent params and tags, the config it ran,
    per-epoch curves for every epoch, and that each method's metrics are plausible."""
    children = records.check_complete_record(reader.uri, parent_id, METHODS, download_pngs=True)
    params, tags = reader.client.get_run(parent_id).data.params, reader.client.get_run(parent_id).data.tags
    assert params["training.epochs"] == str(EPOCHS)
    assert params["methods"] == ",".join(METHODS)
    assert params["mlflow.experiment"] == "sngp-smoke"
    assert re.fullmatch(r"[0-9a-f-]{36}", tags.get("prefect.flow_run_id", "")), tags
    if (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"]), tags["git_commit"]
    config = yaml.safe_load(reader.download(parent_id, "config.yaml"))
    assert config["training"]["epochs"] == EPOCHS and config["methods"] == list(METHODS)
    smoke = yaml.safe_load(SMOKE.read_text())["data"]
    rows = {
        "train": 2 * smoke["n_train_per_class"],
        "test": 2 * smoke["n_test_per_class"],
        "ood": smoke["n_ood"],
    }
    for run in [reader.client.get_run(parent_id), *children.values()]:  # two moons records its data too
        records.check_data_lineage(run, rows, ["0", "1"], source_type="code")
    for method, run in children.items():
        assert run.data.params["epochs"] == str(EPOCHS)
        assert 0.7 < run.data.metrics["test_accuracy"] <= 1.0, (method, run.data.metrics["test_accuracy"])
        assert 0.0 <= run.data.metrics["ood_auroc"] <= 1.0
        for curve in ("loss", "accuracy"):
            history = reader.history(run.info.run_id, curve)
            assert [m.step for m in history] == list(range(EPOCHS)), (method, curve, history)
            assert all(math.isfinite(m.value) for m in history)
    return children


# ---------------------------------------------------------------------------------------------------------
# The shared smoke runs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def reader(workdir, first_run, mlflow_reader):
    return mlflow_reader(workdir)


def _run_smoke(workdir, what: str, *args: str):
    """`sngp run --config conf/smoke.yaml ARGS` in `workdir`: it must succeed, and the temporary Prefect
    server must not outlive it."""
    proc = run_sngp(["run", "--config", str(SMOKE), *args], workdir)
    print(f"\n[pipeline] {what}: {proc.seconds:.1f} s, exit {proc.returncode}")
    assert proc.returncode == 0, describe(proc)
    assert not proc.leaked, describe(proc)
    return proc


def _rerun_on_the_same_code(workdir, reader, before, tries: list[tuple[str, list[str]]]):
    """(run, index) of the first of `tries` ((what, ARGS) for _run_smoke, in turn) that ran the code `before`
    ran (its parent's `code_version` tag). Others edit the repo meanwhile: if the library/task code changed,
    caches are rightly invalid, so the next try is compared with the run just made. Skips the test if the
    code kept changing."""

    def code_version(proc) -> str:
        return reader.client.get_run(proc.parent_id).data.tags["code_version"]

    reference = code_version(before)
    for index, (what, args) in enumerate(tries):
        proc = _run_smoke(workdir, what, *args)
        version = code_version(proc)
        if version == reference:
            return proc, index
        reference = version
    pytest.skip("sngp_models/tasks code kept changing during the test run; cache hits cannot be expected")


@pytest.fixture(scope="module")
def first_run(workdir):
    return _run_smoke(workdir, "first (cold) smoke run")


@pytest.fixture(scope="module")
def warm_run(workdir, first_run, reader):
    """A second identical run (once more if the code changed meanwhile)."""
    proc, index = _rerun_on_the_same_code(workdir, reader, first_run, [("identical rerun", [])] * 2)
    proc.attempts = index + 1
    print(f"[pipeline] cold run {first_run.seconds:.1f} s -> warm (cached) run {proc.seconds:.1f} s")
    return proc


@pytest.fixture(scope="module")
def sngp_changed_run(workdir, warm_run, reader):
    """One SNGP setting changed (another value if the code changed meanwhile: everything then rightly
    retrains under the new code_version, and the other methods are cached by the next try)."""
    bounds = ("0.5", "0.6")
    tries = [(f"rerun with sngp.spec_norm_bound={b}", ["--set", f"sngp.spec_norm_bound={b}"]) for b in bounds]
    proc, index = _rerun_on_the_same_code(workdir, reader, warm_run, tries)
    proc.bound = bounds[index]
    return proc


# ---------------------------------------------------------------------------------------------------------
# 1. A complete record of the first run


def test_first_run_prints_summary(first_run):
    out = first_run.stdout
    assert first_run.parent_id in out
    header = next((line for line in out.splitlines() if line.startswith("method")), "")
    assert "test_acc" in header and "ood_auroc" in header, out  # a metric table: one row per method
    for method in METHODS:
        row = re.search(rf"^{method}\s+\d+\.\d{{4}}", out, re.MULTILINE)
        assert row, f"no metric row for {method}\n{out}"
    assert "comparison.png" in out
    for method in METHODS:  # each method's plot location
        plot_lines = [
            ln
            for ln in out.splitlines()
            if ln.strip().startswith(method) and "class_probability.png" in ln and "uncertainty.png" in ln
        ]
        assert plot_lines, f"no plot paths for {method}\n{out}"
    assert "mlflow ui" in out
    assert "Traceback" not in first_run.stderr


def test_first_run_records_parent_and_children(first_run, reader):
    parents = reader.parents("sngp-smoke")
    assert [p.info.run_id for p in parents] == [first_run.parent_id]
    children = check_complete_record(reader, first_run.parent_id)
    for method, run in children.items():  # a fresh cache: everything computed
        assert run.data.tags["cached.train"] == "false", method
    assert children["sngp"].data.params["num_inducing"] == "128"
    assert children["mc_dropout"].data.params["num_mc_samples"] == "3"
    assert children["deep_ensemble"].data.params["ensemble_size"] == "3"
    # The study's point, on the smoke settings: SNGP is far less confident on the OOD cluster.
    ood = {m: r.data.metrics["ood_mean_max_prob"] for m, r in children.items()}
    assert ood["sngp"] < ood["deterministic"], ood
    assert reader.running() == []


PREDICT = r"""
import json, sys
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
x = pd.DataFrame({"x0": [0.0, 1.0, 2.5, -1.0, 0.5], "x1": [0.0, -0.5, -1.75, 1.0, 0.25]})
out = {}
for uri in sys.argv[2:]:
    model = mlflow.pyfunc.load_model(uri)
    pred = model.predict(x)
    out[uri] = {
        "columns": list(pred.columns),
        "values": pred.to_numpy().tolist(),
        "threshold": model.unwrap_python_model().abstention.threshold,
    }
print("RESULT " + json.dumps(out))
"""


def test_pyfunc_models_predict_in_fresh_process(first_run, reader, tmp_path):
    children = reader.children(first_run.parent_id)
    uris = {m: f"models:/{reader.logged_models(r.info.run_id)[0].model_id}" for m, r in children.items()}
    runs_uri = f"runs:/{children['sngp'].info.run_id}/model"  # the run-relative URI works too
    results, _ = run_python(PREDICT, reader.uri, *uris.values(), runs_uri, cwd=tmp_path, timeout=300)
    for method, uri in uris.items():
        result = results[uri]
        columns = result["columns"]
        assert columns == ["predicted", "prob_0", "prob_1", "uncertainty", "abstain"], (method, columns)
        assert len(result["values"]) == 5
        for predicted, p0, p1, unc, abstain in result["values"]:
            assert predicted == ("0" if p0 >= p1 else "1"), (method, predicted, p0, p1)
            assert 0 <= p0 <= 1 and 0 <= p1 <= 1
            assert abs(p0 + p1 - 1) < 1e-5, (method, p0, p1)
            assert abs(unc - (1 - p0**2 - p1**2) / 2) < 1e-4, (method, p0, p1, unc)
            assert abstain is (unc > result["threshold"]), (method, unc, result["threshold"], abstain)
    assert results[runs_uri] == results[uris["sngp"]]
    # Row 2 is the OOD cluster's centre: SNGP is uncertain there (column 3) and abstains (column 4), the
    # deterministic net is not.
    sngp_row = results[uris["sngp"]]["values"][2]
    assert sngp_row[3] > results[uris["deterministic"]]["values"][2][3]
    assert sngp_row[4] is True, (sngp_row, results[uris["sngp"]]["threshold"])


# ---------------------------------------------------------------------------------------------------------
# 2. Caching


def test_second_run_hits_cache_and_records_everything(first_run, warm_run, reader):
    states = warm_run.task_states()
    expected = {f"{stage}-{m}" for stage in ("evaluate", "plot") for m in METHODS}
    # MC Dropout reuses the deterministic net (task mc-dropout-from-deterministic), so no train-mc_dropout
    expected |= {f"train-{m}" for m in METHODS if m != "mc_dropout"}
    assert expected <= set(states), f"task runs seen: {sorted(states)}"
    stage_tasks = {name: s for name, s in states.items() if name.split("-")[0] in STAGES}
    not_cached = {name: s for name, s in stage_tasks.items() if s != "Cached(type=COMPLETED)"}
    assert not not_cached, f"not cached: {not_cached}"
    assert f"epoch 1/{EPOCHS}" not in warm_run.stderr + warm_run.stdout  # nothing trained

    assert warm_run.parent_id != first_run.parent_id
    assert len(reader.parents("sngp-smoke")) == 1 + warm_run.attempts
    children = check_complete_record(reader, warm_run.parent_id)
    for method, run in children.items():
        for stage in STAGES:
            assert run.data.tags[f"cached.{stage}"] == "true", (method, stage)
    assert reader.running() == []


def test_cached_rerun_is_faster_in_flow_and_process(first_run, warm_run):
    """Both runs' times, as Prefect records the flow runs (start to end) and as whole processes (which
    also hold a local-mode process's fixed start-up: imports, Prefect's temporary server, ~3-4 s on an
    idle 2-core machine). Printed for the record (`pytest -s`); the issue's 20% target is a speed
    target and lives in `make bench` (benchmarks/results/latest.json: warm_over_cold,
    warm_over_cold_flow_run), measured side by side on a quiet machine, not asserted here where the
    machine is shared and noisy."""
    cold, warm = flow_seconds(first_run), flow_seconds(warm_run)
    print(
        f"\n[pipeline] cold -> cached: Prefect flow run {cold:.1f} s -> {warm:.1f} s ({warm / cold:.0%}); "
        f"whole sngp process {first_run.seconds:.1f} s -> {warm_run.seconds:.1f} s "
        f"({warm_run.seconds / first_run.seconds:.0%})"
    )
    assert warm < cold, (cold, warm)
    assert warm_run.seconds < first_run.seconds


def test_changing_an_sngp_setting_retrains_only_sngp(sngp_changed_run, reader):
    children = reader.children(sngp_changed_run.parent_id)
    assert sorted(children) == sorted(METHODS)
    cached = {m: r.data.tags["cached.train"] for m, r in children.items()}
    assert cached == {"deterministic": "true", "sngp": "false", "mc_dropout": "true", "deep_ensemble": "true"}
    assert children["sngp"].data.params["spec_norm_bound"] == sngp_changed_run.bound
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert sngp_changed_run.task_states()["train-sngp"] != "Cached(type=COMPLETED)"
    assert reader.running() == []


# ---------------------------------------------------------------------------------------------------------
# 3. Bad configs fail fast, with one line, before Prefect or MLflow start


BAD_SETS = {
    "unknown-key": (["--set", "training.epoch=3"], ["training.epoch", "unknown key", "epochs"]),
    "wrong-type": (["--set", "training.epochs=abc"], ["training.epochs", "abc"]),
    "out-of-range": (["--set", "training.epochs=0"], ["training.epochs", "got 0"]),
    "dropout-range": (["--set", "model.dropout_rate=1.5"], ["model.dropout_rate", "1.5"]),
    "unknown-method": (["--set", "methods=[foo]"], ["methods", "foo", "deterministic, sngp"]),
    "malformed-set": (["--set", "foo"], ["--set 'foo'", "KEY=VALUE"]),
}
BAD_FILES = {
    "missing-file": (None, ["nope.yaml", "does not exist"]),
    "malformed-yaml": ("seed: [1\n  x: : y\n", ["bad.yaml", "not valid YAML", "line"]),
    "empty-file": ("", ["bad.yaml", "empty"]),
}


def _assert_fails_fast(proc, workdir, expected: list[str]) -> None:
    assert proc.returncode == 2, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sngp run: error: "), describe(proc)
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in proc.stderr
    assert proc.seconds < 15, f"took {proc.seconds:.1f} s"
    assert not (workdir / "mlflow.db").exists(), "an MLflow store was created for a bad config"
    assert not (workdir / "prefect").exists(), "Prefect started for a bad config"


@pytest.mark.parametrize("case", list(BAD_SETS))
def test_bad_override_fails_fast(case, tmp_path):
    args, expected = BAD_SETS[case]
    proc = run_sngp(["run", "--config", str(SMOKE), *args], tmp_path)
    _assert_fails_fast(proc, tmp_path, expected)


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_config_file_fails_fast(case, tmp_path):
    content, expected = BAD_FILES[case]
    path = tmp_path / ("nope.yaml" if content is None else "bad.yaml")
    if content is not None:
        path.write_text(content)
    proc = run_sngp(["run", "--config", str(path)], tmp_path)
    _assert_fails_fast(proc, tmp_path, expected)


# ---------------------------------------------------------------------------------------------------------
# 4. Help


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"]], ids=["sngp", "sngp-run"])
def test_help(args, tmp_path):
    proc = run_sngp(args, tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "--config" in proc.stdout and "--set" in proc.stdout, proc.stdout
    assert proc.seconds < 15


# ---------------------------------------------------------------------------------------------------------
# 5. A task that really fails: the run is FAILED in MLflow, nothing left RUNNING


def test_failing_task_marks_runs_failed(tmp_path, mlflow_reader):
    # The plot folder inside the cache is a regular file, so the plot task cannot write its PNGs
    # (training and evaluation succeed). Real failure, nothing mocked.
    cache = tmp_path / ".sngp_cache"
    cache.mkdir()
    (cache / "plots").write_text("not a folder")
    proc = run_sngp(["run", "--config", str(SMOKE), "--set", "methods=[deterministic]"], tmp_path)
    assert proc.returncode == 1, describe(proc)
    assert not proc.leaked, describe(proc)
    failure = [ln for ln in proc.stderr.splitlines() if ln.startswith("sngp run: pipeline failed:")]
    assert len(failure) == 1, describe(proc)
    assert "NotADirectoryError" in failure[0] and "plots" in failure[0], failure[0]
    assert proc.task_states()["plot-deterministic"].startswith("Failed")

    reader = mlflow_reader(tmp_path)
    parents = reader.parents("sngp-smoke")
    assert [p.info.status for p in parents] == ["FAILED"], [(p.info.run_id, p.info.status) for p in parents]
    children = reader.children(parents[0].info.run_id)
    assert list(children) == ["deterministic"]
    child = children["deterministic"]
    assert child.info.status == "FAILED"
    assert "NotADirectoryError" in child.data.tags.get("error", ""), child.data.tags
    assert reader.running() == []
