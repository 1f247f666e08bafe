"""Concurrency: four `sngp run`s at once against one MLflow tracking server, sharing one cache folder.

SQLite backend (the server `sngp serve` starts, conftest.stack) and PostgreSQL (a throwaway cluster,
support.pgcluster; skipped only when the PostgreSQL binaries are missing). Every run must leave a complete
record (metrics, models, images) and no "database is locked". The runs share cache keys: each training
runs once (the others wait on the task's lock and read the cached result: tasks.cache.ProcessLockManager
with SERIALIZABLE isolation, flows.pipeline.configured), and every cached model loads and predicts what
every run recorded.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from support.cli import SngpProcess, sngp_env
from support.net import http_bytes
from support.records import ALL_METHODS, check_complete_record, client, comparable_metrics, running

from .conftest import SMOKE_ALL, Run, wait_all

TRAINED = ("deterministic", "sngp", "deep_ensemble", "exact_gp")  # mc_dropout reuses the deterministic net
LOCKED_DB = re.compile(r"database is locked|OperationalError", re.IGNORECASE)


def test_four_concurrent_runs_sqlite_each_complete(concurrent_sqlite, stack):
    parents = {run.parent_id for run in concurrent_sqlite}
    assert len(parents) == 4
    metrics = []
    for run in concurrent_sqlite:
        kids = check_complete_record(stack.mlflow_url, run.parent_id, ALL_METHODS, download_pngs=True)
        metrics.append(comparable_metrics(kids))
    assert all(m == metrics[0] for m in metrics), "the four runs recorded different metrics"
    assert running(client(stack.mlflow_url)) == []
    for run in concurrent_sqlite:
        assert not LOCKED_DB.search(run.proc.stderr + run.proc.stdout), run.proc.describe()
    log = (Path(stack.log_dir) / "mlflow-server.log").read_text(errors="replace")
    assert not LOCKED_DB.search(log), log[-3000:]


def test_each_training_ran_once(concurrent_sqlite):
    for method in TRAINED:
        lines = [
            ln
            for run in concurrent_sqlite
            for ln in run.proc.stderr.splitlines()
            if f"Task run 'train-{method}'" in ln and f"{method} trained in" in ln
        ]
        assert len(lines) == 1, f"{method} trained {len(lines)} times:\n" + "\n".join(lines)
    cached = {
        m: sum(r.proc.task_states().get(f"train-{m}") == "Cached(type=COMPLETED)" for r in concurrent_sqlite)
        for m in TRAINED
    }
    assert cached == {m: 3 for m in TRAINED}, cached


def test_cached_models_load_and_agree_with_every_record(concurrent_sqlite):
    import sngp_models
    from tasks.data import load_data

    cache = concurrent_sqlite[0].cache
    model_dirs = sorted(p for p in (cache / "models").iterdir())
    assert len(model_dirs) == len(ALL_METHODS), [p.name for p in model_dirs]  # no temporary/old copies left
    data = load_data(str(concurrent_sqlite[0].data_file()))
    for folder in model_dirs:
        method = folder.name.split("-")[0]
        pred = sngp_models.load_model(folder).predict_with_uncertainty(data.x_test)
        with np.load(concurrent_sqlite[0].cache_file("predictions", method, ".npz")) as saved:
            np.testing.assert_allclose(pred.probs, saved["test_probs"], atol=1e-6, err_msg=method)
            np.testing.assert_allclose(pred.uncertainty, saved["test_uncertainty"], atol=1e-6, err_msg=method)


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL


@pytest.fixture(scope="module")
def postgres_mlflow(tmp_path_factory):
    """A throwaway PostgreSQL cluster and an MLflow server on it (the command `sngp serve --db` runs)."""
    from support.pgcluster import PgCluster, PostgresUnavailable, free_port

    from flows.ops.commands import DEFAULT_HOST, mlflow_server_command
    from flows.ops.databases import PostgresURLs
    from flows.ops.processes import executable

    cluster = PgCluster()
    try:
        cluster.start()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL binaries missing: {exc}")
    root = tmp_path_factory.mktemp("pg-mlflow")
    port = free_port()
    urls = PostgresURLs.parse(cluster.create_database("mlflow"), "--db")
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": urls.mlflow,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    argv = mlflow_server_command(DEFAULT_HOST, port, str(root / "artifacts"))
    log = open(root / "mlflow-server.log", "wb")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen(
        [executable(argv[0]), *argv[1:]],
        env=env,
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                http_bytes(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        "MLflow on PostgreSQL did not start:\n"
                        + (root / "mlflow-server.log").read_text(errors="replace")[-3000:]
                    )
                time.sleep(0.5)
        yield url, root / "mlflow-server.log"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
        cluster.stop()


def test_four_concurrent_runs_postgresql_each_complete(postgres_mlflow, concurrent_sqlite, stack, tmp_path):
    """Same config and cache as the SQLite batch (so the tasks are cached and the runs race on recording)."""
    url, server_log = postgres_mlflow
    cache = concurrent_sqlite[0].cache
    procs = []
    for i in range(4):
        workdir = tmp_path / f"run{i}"
        env = sngp_env(workdir, stack.prefect_api_url, SNGP_CACHE_DIR=str(cache), MLFLOW_TRACKING_URI=url)
        procs.append(SngpProcess(SMOKE_ALL, workdir, env))
    wait_all(procs, timeout=900)
    runs = [Run(p, p.cwd, url, cache) for p in procs]
    for run in runs:
        assert run.proc.returncode == 0, run.proc.describe()
        assert not LOCKED_DB.search(run.proc.stderr + run.proc.stdout), run.proc.describe()
    reference = comparable_metrics(concurrent_sqlite[0].kids())
    for run in runs:
        kids = check_complete_record(url, run.parent_id, ALL_METHODS)
        assert comparable_metrics(kids) == reference
    assert running(client(url)) == []
    assert not LOCKED_DB.search(server_log.read_text(errors="replace"))
