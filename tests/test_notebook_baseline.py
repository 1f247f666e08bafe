"""Smoke test of benchmarks/notebook_baseline.py (the notebook yardstick, issue 9), run as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "notebook_baseline.py"

TIME_KEYS = (
    "import_seconds",
    "data_seconds",
    "deterministic_fit_seconds",
    "sngp_fit_seconds",
    "ensemble_fit_seconds",
    "deterministic_predict_seconds",
    "sngp_predict_seconds",
    "mc_dropout_predict_seconds",
    "ensemble_predict_seconds",
    "total_seconds",
)
METHODS = ("deterministic", "sngp", "mc_dropout", "ensemble")
PROB_KEYS = tuple(f"{m}_{s}" for m in METHODS for s in ("grid_mean_uncertainty", "ood_mean_max_prob"))


def test_notebook_baseline_quick_run(tmp_path: Path) -> None:
    json_path = tmp_path / "out" / "baseline.json"
    args = ["--epochs", "1", "--ensemble-size", "2", "--seed", "3", "--json", str(json_path)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads(proc.stdout)  # stdout holds exactly one JSON object
    assert json.loads(json_path.read_text()) == result
    assert result["seed"] == 3

    for key in TIME_KEYS:
        assert isinstance(result[key], float), key
        assert result[key] > 0, key
    stage_sum = sum(result[k] for k in TIME_KEYS if k != "total_seconds")
    assert result["total_seconds"] >= stage_sum

    for key in PROB_KEYS:
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    for m in METHODS:
        assert result[f"{m}_grid_mean_uncertainty"] <= 0.25  # p(1-p) <= 1/4
        assert result[f"{m}_ood_mean_max_prob"] >= 0.5  # binary max-probability
