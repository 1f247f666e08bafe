"""Issue 6's acceptance checks through the real pipeline (Prefect local mode, MLflow SQLite in a tmp dir).

Full-length runs (the study's settings), so marked slow; they still run in CI.
"""

from __future__ import annotations

import pytest
from support.cli import PNG_MAGIC, REPO, describe, run_sngp

pytestmark = pytest.mark.slow

NETWORK_METHODS = ("deterministic", "sngp", "mc_dropout", "deep_ensemble")


def _record(workdir, mlflow_reader, experiment):
    reader = mlflow_reader(workdir)
    [parent] = reader.parents(experiment)
    children = reader.children(parent.info.run_id)
    return reader, parent, children


@pytest.fixture(scope="module")
def two_moons(tmp_path_factory, mlflow_reader):
    workdir = tmp_path_factory.mktemp("two-moons-study")
    proc = run_sngp(
        ["run", "--set", "methods=[deterministic,sngp,mc_dropout,deep_ensemble,exact_gp]"], workdir
    )
    assert proc.returncode == 0, describe(proc)
    print(proc.stdout[proc.stdout.find("Pipeline finished") :][:1500])
    return _record(workdir, mlflow_reader, "sngp-uncertainty")


def test_sngp_detects_ood_better_than_the_deterministic_net(two_moons):
    _, _, children = two_moons
    metrics = {m: r.data.metrics for m, r in children.items()}
    assert metrics["sngp"]["ood_auroc"] >= 0.95
    assert metrics["sngp"]["ood_auroc"] > metrics["deterministic"]["ood_auroc"]


def test_sngp_is_the_most_distance_aware_network(two_moons):
    _, _, children = two_moons
    rho = {m: children[m].data.metrics["distance_uncertainty_spearman"] for m in NETWORK_METHODS}
    for other in ("deterministic", "mc_dropout", "deep_ensemble"):
        assert rho["sngp"] > rho[other], rho


def test_exact_gp_runs_and_logs_its_surfaces(two_moons):
    reader, parent, children = two_moons
    gp = children["exact_gp"]
    assert gp.info.status == "FINISHED"
    plots = reader.artifact_paths(gp.info.run_id, "plots")
    for name in (
        "class_probability.png",
        "uncertainty.png",
        "reliability.png",
        "uncertainty_histogram.png",
        "distance_curve.png",
    ):
        path = f"plots/{name}"
        assert path in plots, plots
        assert reader.download(gp.info.run_id, path).startswith(PNG_MAGIC)
    parent_files = reader.artifact_paths(parent.info.run_id, "plots")
    assert "plots/distance_curve.png" in parent_files
    table = reader.download(parent.info.run_id, "comparison.csv").decode()
    rows = {line.split(",")[0] for line in table.strip().splitlines()[1:]}
    assert rows == set(children)


@pytest.fixture(scope="module")
def digits(tmp_path_factory, mlflow_reader):
    workdir = tmp_path_factory.mktemp("digits-study")
    proc = run_sngp(["run", "--config", str(REPO / "conf" / "digits.yaml")], workdir)
    assert proc.returncode == 0, describe(proc)
    print(proc.stdout[proc.stdout.find("Pipeline finished") :][:1500])
    return _record(workdir, mlflow_reader, "sngp-digits")


def test_every_method_learns_the_known_digits(digits):
    _, _, children = digits
    assert set(children) == set(NETWORK_METHODS)
    for method, run in children.items():
        assert run.info.status == "FINISHED", method
        assert run.data.metrics["test_accuracy"] >= 0.9, (method, run.data.metrics["test_accuracy"])
        assert 0.0 <= run.data.metrics["ood_auroc"] <= 1.0


def test_digits_skips_surfaces_but_keeps_the_other_plots(digits):
    reader, parent, children = digits
    for run in children.values():
        plots = set(reader.artifact_paths(run.info.run_id, "plots"))
        assert {"plots/reliability.png", "plots/uncertainty_histogram.png"} <= plots
        assert "plots/class_probability.png" not in plots
        assert "grid_mean_uncertainty" not in run.data.metrics
    assert reader.download(parent.info.run_id, "comparison.csv").startswith(b"method,")
