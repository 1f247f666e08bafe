"""A logged model is self-contained (DESIGN.md "The model contract"): downloaded from MLflow, it loads and
predicts, with the same numbers, in a fresh virtualenv that has only the model's own requirements.txt
installed (pinned versions) and not this project, started outside the repository with no PYTHONPATH.

Slow (`-m slow`): one smoke `sngp run` of SNGP, then `python -m venv` + `pip install -r requirements.txt`
(TensorFlow, tf-models-official, MLflow, ...: minutes without pip's cache, about one with it). Skipped,
saying why, only when pip cannot reach a package index.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support.cli import REPO, SMOKE, describe, run_sngp
from support.records import MlflowReader

pytestmark = pytest.mark.slow

PREDICT = r"""
import importlib.util, json, sys
import mlflow, numpy as np, pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
rng = np.random.default_rng(0)
x = pd.DataFrame({"x0": rng.uniform(-3.5, 3.5, 200), "x1": rng.uniform(-2.5, 2.5, 200)})
x.loc[0] = [2.5, -1.75]  # the OOD cluster's centre
out = model.predict(x)
strict = model.predict(x, params={"abstain_threshold": 0.0})
import sngp_models
print("RESULT " + json.dumps({
    "columns": list(out.columns),
    "predicted": out["predicted"].astype(str).tolist(),
    "probs": out[[c for c in out.columns if c.startswith("prob_")]].to_numpy().tolist(),
    "uncertainty": out["uncertainty"].tolist(),
    "abstain": out["abstain"].tolist(),
    "strict_abstain": strict["abstain"].tolist(),
    "threshold": model.unwrap_python_model().abstention.threshold,
    "sngp_models": sngp_models.__file__,
    "project_importable": [m for m in ("tasks", "flows") if importlib.util.find_spec(m) is not None],
    "project_imported": sorted({m.split(".")[0] for m in sys.modules} & {"tasks", "flows", "prefect"}),
    "python": sys.executable,
}), flush=True)
"""


def _clean_env(home: Path) -> dict[str, str]:
    """No project on the path, no developer MLflow/Prefect settings, no active virtualenv."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(HOME=os.environ.get("HOME", str(home)), TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    return env


def _predict(python: str, model_dir: Path, cwd: Path) -> dict:
    proc = subprocess.run(
        [python, "-c", PREDICT, str(model_dir)],
        cwd=cwd,
        env=_clean_env(cwd),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{python}: exit {proc.returncode}\n{proc.stderr[-5000:]}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory) -> Path:
    """The SNGP model of a smoke run, downloaded from MLflow to a folder outside the repository."""
    import mlflow

    workdir = tmp_path_factory.mktemp("self-contained")
    proc = run_sngp(["run", "--config", str(SMOKE), "--set", "methods=[sngp]"], workdir)
    assert proc.returncode == 0, describe(proc)
    reader = MlflowReader(f"sqlite:///{workdir / 'mlflow.db'}", workdir / "downloads")
    run = reader.children(proc.parent_id)["sngp"]
    model_id = reader.logged_models(run.info.run_id)[0].model_id
    mlflow.set_tracking_uri(reader.uri)
    return Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(workdir / "model")))


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory, downloaded) -> str:
    """A new virtualenv with only the model's requirements.txt installed -> its python."""
    root = tmp_path_factory.mktemp("fresh-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, cwd=root, env=_clean_env(root))
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    probe = subprocess.run(
        [*pip, "download", "--no-deps", "--dest", str(root / "probe"), "six"],
        cwd=root,
        env=_clean_env(root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach a package index here: {probe.stderr.strip().splitlines()[-1:]}")
    started = time.monotonic()
    install = subprocess.run(
        [*pip, "install", "-r", str(downloaded / "requirements.txt")],
        cwd=root,
        env=_clean_env(root),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-5000:]
    print(f"\n[self-contained] pip install -r requirements.txt: {time.monotonic() - started:.0f} s")
    return str(venv / "bin" / "python")


def test_requirements_are_pinned(downloaded):
    lines = [ln for ln in (downloaded / "requirements.txt").read_text().splitlines() if ln.strip()]
    names = {ln.split("==")[0] for ln in lines}
    needed = {"tensorflow", "tf-keras", "tf-models-official", "numpy", "pandas", "scikit-learn", "mlflow"}
    assert needed <= names, lines
    assert all("==" in ln for ln in lines), lines
    assert (downloaded / "code" / "sngp_models" / "models.py").is_file()
    assert list((downloaded / "artifacts").glob("*.abstention.json")), list(downloaded.rglob("*"))


def test_model_predicts_the_same_in_a_fresh_virtualenv(downloaded, fresh_python, tmp_path):
    here = _predict(sys.executable, downloaded, tmp_path)
    there = _predict(fresh_python, downloaded, tmp_path)
    assert Path(there["python"]).parent.parent != Path(sys.executable).parent.parent
    # the library came with the model, the project is neither importable nor imported there
    assert Path(there["sngp_models"]).is_relative_to(downloaded), there["sngp_models"]
    assert not Path(there["sngp_models"]).is_relative_to(REPO)
    assert there["project_importable"] == [] and there["project_imported"] == [], there
    assert there["columns"] == here["columns"] == ["predicted", "prob_0", "prob_1", "uncertainty", "abstain"]
    assert there["predicted"] == here["predicted"]
    np.testing.assert_allclose(there["probs"], here["probs"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(there["uncertainty"], here["uncertainty"], rtol=0, atol=1e-6)
    assert there["threshold"] == here["threshold"]
    assert there["abstain"] == here["abstain"] and there["strict_abstain"] == here["strict_abstain"]
    assert there["abstain"][0] is True  # the OOD cluster's centre: SNGP abstains
