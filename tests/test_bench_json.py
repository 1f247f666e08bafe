"""The committed benchmark result (benchmarks/results/latest.json, written by `make bench`) is complete and
self-consistent, comes from a full run, and is what the README's Performance table shows."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LATEST = ROOT / "benchmarks" / "results" / "latest.json"
METHODS = ("deterministic", "sngp", "mc_dropout", "deep_ensemble")
SECONDS = (
    "baseline_seconds",
    "cold_seconds",
    "warm_seconds",
    "baseline_ensemble_seconds",
    "ensemble_seconds",
    "cold_flow_run_seconds",
    "warm_flow_run_seconds",
)
RATIOS = {
    "cold_over_baseline": ("cold_seconds", "baseline_seconds"),
    "warm_over_cold": ("warm_seconds", "cold_seconds"),
    "ensemble_over_baseline": ("ensemble_seconds", "baseline_ensemble_seconds"),
    "warm_over_cold_flow_run": ("warm_flow_run_seconds", "cold_flow_run_seconds"),
}


def _run_bench():
    spec = importlib.util.spec_from_file_location("run_bench", ROOT / "benchmarks" / "run_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result() -> dict:
    assert LATEST.exists(), "benchmarks/results/latest.json is missing: run `make bench` and commit it"
    return json.loads(LATEST.read_text())


def test_full_run_with_every_key(result) -> None:
    assert result["quick"] is False and result["epochs"] == 100 and result["predict_points"] == 1_000_000
    for key in (
        *SECONDS,
        *RATIOS,
        "predict_1m_seconds",
        "predict_1m_peak_mb",
        "sngp_over_deterministic_1m",
        "sngp_over_mc_dropout_1m",
        "machine",
        "versions",
        "cold_stages",
        "warm_recomputed_tasks",
    ):
        assert key in result, key
    for key in SECONDS:
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu_model"]
    for pkg in ("python", "tensorflow", "prefect", "mlflow"):
        assert result["versions"][pkg], pkg
    assert result["warm_recomputed_tasks"] == [], "the warm run must hit the cache for every task"


def test_ratios_match_the_seconds(result) -> None:
    for ratio, (num, den) in RATIOS.items():
        assert math.isclose(result[ratio], result[num] / result[den], rel_tol=1e-9), ratio
    seconds, peak = result["predict_1m_seconds"], result["predict_1m_peak_mb"]
    assert set(seconds) == set(peak) == set(METHODS)
    assert all(v > 0 for v in seconds.values()) and all(v >= 0 for v in peak.values())
    assert math.isclose(
        result["sngp_over_deterministic_1m"], seconds["sngp"] / seconds["deterministic"], rel_tol=1e-9
    )
    assert math.isclose(
        result["sngp_over_mc_dropout_1m"], seconds["sngp"] / seconds["mc_dropout"], rel_tol=1e-9
    )


def test_cold_stages_are_plausible(result) -> None:
    stages = result["cold_stages"]
    tasks = stages["tasks"]
    for method in ("deterministic", "sngp", "deep_ensemble"):
        assert f"train-{method}" in tasks and tasks[f"train-{method}"]["seconds"] > 0
        assert stages["train_seconds_metric"][method] > 0
    assert result["ensemble_seconds"] == stages["train_seconds_metric"]["deep_ensemble"]
    phases = stages["phases"]
    assert 0 < sum(phases.values()) <= result["cold_seconds"] * 1.01


def test_readme_table_is_this_result(result) -> None:
    run_bench = _run_bench()
    readme = (ROOT / "README.md").read_text()
    assert run_bench.README_BEGIN in readme and run_bench.README_END in readme
    block = readme.split(run_bench.README_BEGIN, 1)[1].split(run_bench.README_END, 1)[0]
    assert block.strip() == run_bench.markdown_table(result).strip()
