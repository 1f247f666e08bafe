"""Sweeps end to end: `sngp sweep` on Prefect's thread pool, a local Dask cluster and an existing Dask
cluster (a `dask scheduler` and two `dask worker` processes started here), recorded in a real MLflow
SQLite store and read back through MlflowClient. Nothing is mocked.

Each runner computes the small sweep (conf/sweep_smoke.yaml, 8 points) from an empty cache folder of
its own, so "identical metrics per point" compares real recomputations in different processes. All
runs share one working folder (one MLflow store, one Prefect home: its database migrates once), and
the thread run's cache serves the cache check and the invalid-point sweep. `pytest -s` prints the wall
times of the three runners.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.cli import PNG_MAGIC, REPO, SngpProcess, describe, run_sngp, sngp_env
from support.pgcluster import free_port

from sngp_models.evaluation import METRIC_NAMES as METRICS

SWEEP = REPO / "conf" / "sweep_smoke.yaml"
SPEC = yaml.safe_load(SWEEP.read_text())
VALUES = SPEC["grid"]["sngp.spec_norm_bound"]
SEEDS = SPEC["seeds"]
N_POINTS = len(VALUES) * len(SEEDS)
EXPERIMENT = SPEC["base"]["overrides"]["mlflow.experiment"]
EPOCHS = int(yaml.safe_load((REPO / "conf" / "smoke.yaml").read_text())["training"]["epochs"])
TIMINGS = ("train_seconds", "inference_seconds")  # wall clock: the only metrics allowed to differ
POINT_STATE = re.compile(r"Task run 'sweep-(p\d{3})[^']*' - Finished in state (\w+)")
DASK = Path(sys.executable).parent / "dask"
WALL_TIMES: dict[str, float] = {}


def sweep(workdir: Path, *args: str, config: Path = SWEEP, cache: str = ".sngp_cache") -> SngpProcess:
    """`sngp sweep` in `workdir` (its mlflow.db and Prefect home) with the cache folder workdir/cache."""
    return run_sngp(
        ["sweep", "--config", str(config), *args],
        cwd=workdir,
        env=sngp_env(workdir, SNGP_CACHE_DIR=str(workdir / cache)),
    )


def points_of(reader, parent_id: str) -> dict[str, object]:
    """The parent's nested runs by point id (tag sweep.point)."""
    return {run.data.tags["sweep.point"]: run for run in reader.children(parent_id).values()}


def check_complete_record(reader, parent_id: str, cached: bool) -> dict[str, object]:
    """A FINISHED parent with the sweep's params, table and plots; a complete FINISHED run per point."""
    parent = reader.client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    params, tags = parent.data.params, parent.data.tags
    assert params["sweep.grid.sngp.spec_norm_bound"] == ",".join(f"{v:g}" for v in VALUES)
    assert params["sweep.seeds"] == ",".join(map(str, SEEDS)) and params["sweep.methods"] == "sngp"
    assert params["mlflow.experiment"] == EXPERIMENT and params["training.epochs"] == str(EPOCHS)
    assert tags["pipeline"] == "sweep" and tags["sweep.failed_points"] == "0", tags
    assert tags["sweep.points"] == str(N_POINTS)
    assert {"sweep.yaml", "sweep_results.csv", "config.yaml", "plots"} <= set(
        reader.artifact_paths(parent_id)
    )
    plots = set(reader.artifact_paths(parent_id, "plots"))
    expected = {f"plots/sweep_{m}.png" for m in SPEC["metrics"]} | {"plots/sweep_summary.png"}
    assert expected <= plots, sorted(plots)
    assert reader.download(parent_id, "plots/sweep_ood_auroc.png").startswith(PNG_MAGIC)
    table = reader.download(parent_id, "sweep_results.csv").decode().splitlines()
    assert len(table) == N_POINTS + 1 and table[0].startswith("point,method,sngp.spec_norm_bound,seed,status")
    assert all(",FINISHED," in line for line in table[1:]), table
    assert yaml.safe_load(reader.download(parent_id, "sweep.yaml"))["grid"] == SPEC["grid"]

    points = points_of(reader, parent_id)
    assert sorted(points) == [f"p{i:03d}" for i in range(N_POINTS)], sorted(points)
    seen = set()
    for point_id, run in points.items():
        p, t, m = run.data.params, run.data.tags, run.data.metrics
        assert run.info.status == "FINISHED", (point_id, run.info.status, t.get("error"))
        assert p["method"] == "sngp" and t["method"] == "sngp"
        seen.add((float(p["sweep.sngp.spec_norm_bound"]), int(p["seed"])))
        assert float(p["spec_norm_bound"]) == float(p["sweep.sngp.spec_norm_bound"])  # the model's setting
        assert p["epochs"] == str(EPOCHS) and p["num_inducing"] == "128"
        assert t["cached"] == str(cached).lower(), (point_id, t["cached"])
        missing = set(METRICS) - set(m)
        assert not missing, f"{point_id}: missing metrics {sorted(missing)}"
        assert all(math.isfinite(m[name]) for name in METRICS), m
        assert 0.8 < m["test_accuracy"] <= 1.0 and 0.0 <= m["ood_auroc"] <= 1.0, m
        steps = [h.step for h in reader.history(run.info.run_id, "loss")]
        assert steps == list(range(EPOCHS)), (point_id, steps)
        assert reader.artifact_paths(run.info.run_id) == [], "sweep points log no model and no plots"
    assert seen == {(float(v), s) for v in VALUES for s in SEEDS}
    return points


def assert_same_metrics(reference: dict, other: dict, what: str) -> None:
    assert sorted(reference) == sorted(other)
    for point_id, run in reference.items():
        for name in METRICS:
            if name in TIMINGS:
                continue
            a, b = run.data.metrics[name], other[point_id].data.metrics[name]
            assert abs(a - b) <= 1e-6, f"{what}: {point_id} {name}: {a} vs {b}"


def workers_used(points: dict) -> set[str]:
    return {run.data.tags["sweep.worker"] for run in points.values()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweeps")


@pytest.fixture(scope="module")
def thread_run(workdir, mlflow_reader):
    """The small sweep on the thread pool, from an empty cache."""
    proc = sweep(workdir, cache="cache-thread")
    assert proc.returncode == 0, describe(proc)
    WALL_TIMES["thread pool (2 threads)"] = proc.seconds
    reader = mlflow_reader(workdir)
    parent_id = proc.parent_id
    return workdir, proc, reader, parent_id, check_complete_record(reader, parent_id, cached=False)


def test_thread_runner_records_every_point(thread_run) -> None:
    workdir, proc, reader, parent_id, points = thread_run
    assert f"{N_POINTS} points, {N_POINTS} finished (0 from the cache), 0 failed" in proc.stdout, proc.stdout
    states = dict(POINT_STATE.findall(proc.stderr + proc.stdout))
    assert states == {f"p{i:03d}": "Completed" for i in range(N_POINTS)}, states
    assert len(workers_used(points)) == 1  # one process, its thread pool
    assert not reader.running()
    print(f"\nthread runner: {proc.seconds:.1f} s for {N_POINTS} points")


def test_rerun_is_served_from_the_cache(thread_run) -> None:
    workdir, first, reader, first_parent, first_points = thread_run
    proc = sweep(workdir, cache="cache-thread")
    assert proc.returncode == 0, describe(proc)
    states = dict(POINT_STATE.findall(proc.stderr + proc.stdout))
    assert states == {f"p{i:03d}": "Cached" for i in range(N_POINTS)}, states
    assert f"{N_POINTS} finished ({N_POINTS} from the cache)" in proc.stdout
    parent_id = proc.parent_id
    assert parent_id != first_parent
    points = check_complete_record(reader, parent_id, cached=True)  # a complete new record anyway
    assert_same_metrics(first_points, points, "cached rerun")
    print(f"\ncached rerun: {proc.seconds:.1f} s (cold: {first.seconds:.1f} s)")


def test_local_dask_cluster_gives_identical_metrics(thread_run) -> None:
    workdir, _, reader, _, reference = thread_run
    proc = sweep(workdir, "--runner", "dask", "--dask-workers", "2", cache="cache-dask-local")
    assert proc.returncode == 0, describe(proc)
    # The workers used the sweep's one temporary Prefect server, which ended with the command.
    assert not proc.leaked, describe(proc)
    WALL_TIMES["local Dask cluster (2 workers)"] = proc.seconds
    assert "local Dask cluster (2 worker processes)" in proc.stdout
    points = check_complete_record(reader, proc.parent_id, cached=False)
    assert_same_metrics(reference, points, "local Dask vs thread pool")
    used = workers_used(points)
    assert len(used) == 2, f"points ran on {used}, expected both worker processes"
    assert used.isdisjoint(workers_used(reference))
    print(f"\nlocal Dask cluster: {proc.seconds:.1f} s for {N_POINTS} points on {sorted(used)}")


def _wait_for_workers(address: str, n: int, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    from distributed import Client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a dask process exited early"
        try:
            with Client(address, timeout=10) as client:
                client.wait_for_workers(n, timeout=max(1, deadline - time.monotonic()))
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{n} Dask workers did not join {address} within {timeout} s")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):  # workers first, then the scheduler
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the process group of a process this test started
            p.wait(timeout=10)


def test_existing_dask_cluster_gives_identical_metrics(thread_run) -> None:
    """The way users get a cluster: `dask scheduler` + `dask worker` processes, then --dask-address."""
    workdir, _, reader, _, reference = thread_run
    cache = "cache-dask-existing"
    # The workers share the sweep's cache folder (here: the same machine, so the same path).
    env = sngp_env(workdir, SNGP_CACHE_DIR=str(workdir / cache), DASK_LOGGING__DISTRIBUTED="warning")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = workdir / "dask-logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [str(DASK), *args],
                    cwd=workdir,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
        for i in (1, 2):
            start(
                f"worker{i}",
                "worker",
                address,
                "--nthreads",
                "1",
                "--nworkers",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--name",
                f"w{i}",
            )
        _wait_for_workers(address, 2, procs)
        proc = sweep(workdir, "--dask-address", address, cache=cache)
        assert proc.returncode == 0, describe(proc) + "".join(
            f"\n--- {f.name} ---\n{f.read_text()[-2000:]}" for f in logs.iterdir()
        )
    finally:
        _stop(procs)
    WALL_TIMES["existing Dask cluster (2 workers)"] = proc.seconds
    assert f"Dask cluster at {address}" in proc.stdout
    points = check_complete_record(reader, proc.parent_id, cached=False)
    assert_same_metrics(reference, points, "existing Dask cluster vs thread pool")
    used = workers_used(points)
    assert len(used) == 2, f"points ran on {used}, expected both dask workers"
    print(f"\nexisting Dask cluster: {proc.seconds:.1f} s for {N_POINTS} points on {sorted(used)}")
    print(
        "wall times of the small sweep from an empty cache: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in WALL_TIMES.items())
    )


def test_an_invalid_point_is_failed_and_the_others_finish(thread_run) -> None:
    workdir, _, reader, _, _ = thread_run
    config = workdir / "sweep_invalid.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base": {
                    "base_config": str(REPO / "conf" / "smoke.yaml"),
                    "overrides": {"mlflow.experiment": "sngp-sweep-invalid"},
                },
                "method": "sngp",
                "grid": {"sngp.spec_norm_bound": [0.9, -1.0]},  # -1: the spectral norm bound must be > 0
                "seeds": [0],
            }
        )
    )
    proc = sweep(workdir, config=config, cache="cache-thread")
    assert proc.returncode == 1, describe(proc)
    assert "1 of 2 points failed" in proc.stdout, proc.stdout
    assert "spec_norm_bound" in proc.stdout.split("1 of 2 points failed")[1]
    parent = reader.client.get_run(proc.parent_id)
    assert parent.info.status == "FINISHED"  # the sweep itself worked
    assert parent.data.tags["sweep.failed_points"] == "1" and parent.data.tags["sweep.failed_ids"] == "p001"
    points = points_of(reader, parent.info.run_id)
    good, bad = points["p000"], points["p001"]
    assert good.info.status == "FINISHED" and good.data.tags["cached"] == "true"  # 0.9/seed 0: cached
    assert set(METRICS) <= set(good.data.metrics)
    assert bad.info.status == "FAILED"
    assert "sngp.spec_norm_bound" in bad.data.tags["error"], bad.data.tags["error"]
    assert bad.data.params["sweep.sngp.spec_norm_bound"] == "-1" and bad.data.params["seed"] == "0"
    assert not bad.data.metrics
    assert not reader.running()


# A valid one-point sweep spec; each bad-input case below breaks it in one way.
SMALL_GRID = {"method": "sngp", "grid": {"sngp.num_inducing": [64]}}


@pytest.mark.parametrize(
    "spec, args, message",
    [
        ({"method": "sngp", "grid": {"sngp.spec_norm_boun": [1.0]}}, [], "grid.sngp.spec_norm_boun"),
        (
            {"method": "sngp", "grid": {"deep_ensemble.ensemble_size": [3]}},
            [],
            "grid.deep_ensemble.ensemble_size: does not change what sngp trains",
        ),
        ({"method": "sngp", "grid": {"seed": [1, 2]}}, [], "use 'seeds:'"),
        (SMALL_GRID | {"random": {"n": 5}}, [], "random.n"),
        (SMALL_GRID | {"metric": ["nll"]}, [], "metric: unknown key"),
        ({"methods": ["sgnp"], "grid": SMALL_GRID["grid"]}, [], "methods.0"),
        (SMALL_GRID, ["--runner", "thread", "--dask-address", "tcp://127.0.0.1:1"], "--dask-address"),
        (SMALL_GRID, ["--dask-address", "tcp://127.0.0.1:1"], "no Dask scheduler reachable"),
        (
            SMALL_GRID,
            ["--runner", "workpool"],
            "--runner workpool needs a Prefect server and PREFECT_API_URL is not set: start the servers "
            "with 'sngp serve --workers 2'",
        ),
        (
            SMALL_GRID,
            ["--runner", "thread", "--deployment", "sweep-point/pool"],
            "--deployment needs --runner workpool",
        ),
        (SMALL_GRID, ["--deployment", "pool"], "--deployment must be FLOW/DEPLOYMENT, e.g. sweep-point/pool"),
    ],
    ids=[
        "unknown-key",
        "key-of-another-method",
        "seed-in-grid",
        "random-too-large",
        "typo-top-level",
        "unknown-method",
        "thread-with-address",
        "scheduler-unreachable",
        "workpool-without-server",
        "deployment-without-workpool",
        "deployment-not-flow-slash-name",
    ],
)
def test_bad_sweep_files_and_options_fail_fast(tmp_path, spec, args, message) -> None:
    config = tmp_path / "sweep.yaml"
    spec = {"base": {"base_config": str(REPO / "conf" / "smoke.yaml")}, **spec}
    config.write_text(yaml.safe_dump(spec))
    proc = sweep(tmp_path, *args, config=config)
    assert proc.returncode == 2, describe(proc)
    assert message in proc.stderr, describe(proc)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


def test_workpool_runner_with_no_server_answering_fails_fast(tmp_path) -> None:
    """PREFECT_API_URL set, nothing listening: one line naming the URL and the fix (tests/servers/
    test_sweep_workpool.py runs the work pool for real, and checks unknown deployments there)."""
    port = free_port()  # bound and released: nothing listens there
    env = sngp_env(tmp_path, PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    proc = run_sngp(["sweep", "--config", str(SWEEP), "--runner", "workpool"], cwd=tmp_path, env=env)
    assert proc.returncode == 2, describe(proc)
    assert f"no Prefect server answers at PREFECT_API_URL=http://127.0.0.1:{port}/api" in proc.stderr
    assert "'sngp serve --workers 2'" in proc.stderr and "'make deploy'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.seconds < 60 and not (tmp_path / "mlflow.db").exists()


def test_a_setting_multiplies_only_the_points_of_the_methods_it_changes() -> None:
    """conf/sweep_sngp.yaml: 4 x 2 x 2 SNGP settings and 3 ensemble sizes, 3 seeds each = 57 points."""
    from collections import Counter

    from flows.sweep_spec import SweepSpec, expand, load_sweep, point_config

    spec, base = load_sweep(REPO / "conf" / "sweep_sngp.yaml")
    points = expand(spec)
    assert Counter(p.method for p in points) == {"sngp": 4 * 2 * 2 * 3, "deep_ensemble": 3 * 3}
    assert all(set(p.settings) == {"deep_ensemble.ensemble_size"} for p in points if p.method != "sngp")
    assert base.training.epochs == 100 and base.mlflow.experiment == "sngp-sweep"  # the study's settings
    last = point_config(base, points[-1])
    assert last.deep_ensemble.ensemble_size == 10 and last.seed == 2 and last.methods == ["deep_ensemble"]

    sampled = expand(SweepSpec.model_validate({**spec.model_dump(), "random": {"n": 5, "seed": 0}}))
    assert len(sampled) == 5 * 3 and sampled == expand(  # seeded: the same sample every time
        SweepSpec.model_validate({**spec.model_dump(), "random": {"n": 5, "seed": 0}})
    )
    combos = {(p.method, tuple(sorted(p.settings.items()))) for p in sampled}
    assert len(combos) == 5
