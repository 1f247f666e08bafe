"""`sngp sweep --runner workpool` on real servers: the small sweep as one flow run per point on a
Prefect process work pool with two workers, recorded by the sweep in the MLflow server.

One stack for the module (flows.ops.stack.Services with workers=2, what `sngp serve --workers 2` starts,
on free loopback ports and a temporary directory), `make deploy` against it, then:

1. the small sweep (conf/sweep_smoke.yaml, 8 points) on the thread runner, from an empty cache: the
   reference metrics;
2. the same sweep on the work pool, from another empty cache, so every point is really recomputed in
   its own flow-run process: a complete MLflow record, the metrics of the thread runner to 1e-6, and
   the points spread over both workers (MLflow tags, the flow runs' `prefect.worker.name` labels on
   the Prefect server, the result files the point flows leave in the cache);
3. the rerun on the pool is served from the cache (each point flow reports its task as Cached), and
   the thread runner on the pool's cache finds every point cached too (one cache, any runner); that
   rerun talks to the Prefect server through a proxy that answers a point's dispatch "503, busy" past
   the client's own retries (Prefect's answer to SQLite's "database is locked") and loses the answer to
   another's: each costs a retry, not a failed or doubled point;
4. a deployment that does not exist or runs another flow is one line, exit code 2;
5. stopping the stack stops both workers.

Nothing is mocked. `pytest -s` prints the wall times.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support.cli import SNGP, describe
from support.dropping_proxy import dropping_proxy
from support.net import http_json, two_ports
from support.stack import StackClient, use_server_env
from test_sweep import N_POINTS, SWEEP, assert_same_metrics, check_complete_record, points_of

from flows.ops.stack import start_services
from tasks.sweep import DISPATCH_RETRIES, FlowRunFailed, dispatch_point

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = "sweep-point/pool"
WORKERS = ("sngp-serve-worker-1", "sngp-serve-worker-2")
WALL_TIMES: dict[str, float] = {}


class Stack(StackClient):
    """The served stack (`services`) and the client side of the test (its working folder and Prefect home
    in ROOT/client), with the cache folders of its sweeps in ROOT."""

    def __init__(self, services, root: Path):
        super().__init__(services.prefect_api_url, services.mlflow_url, root / "client")
        self.services = services
        self.root = root

    def cache(self, name: str) -> Path:
        return self.root / name

    def sweep(self, cache: str, *args: str):
        """`sngp sweep --config conf/sweep_smoke.yaml ARGS` with the cache folder ROOT/cache."""
        return self.run(
            [SNGP, "sweep", "--config", SWEEP, *args], self.client_env(cache_dir=self.cache(cache))
        )

    def flow_run(self, flow_run_id: str) -> dict:
        return http_json(f"{self.prefect_api}/flow_runs/{flow_run_id}")

    def logs(self) -> str:
        text = ""
        for log in sorted(self.services.log_dir.glob("worker*.log")):
            text += f"\n--- {log.name} ---\n" + log.read_text(errors="replace")[-3000:]
        return text


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """What `sngp serve --workers 2` starts, through its Python API (from the main thread, which
    outlives the children, as flows.ops.stack asks)."""
    root = tmp_path_factory.mktemp("sweep-workpool")
    prefect_port, mlflow_port = two_ports()
    with pytest.MonkeyPatch.context() as mp:  # the workers inherit this process's environment
        use_server_env(mp)
        started = time.monotonic()
        with start_services(
            root / "data", prefect_port=prefect_port, mlflow_port=mlflow_port, workers=2, timeout=300
        ) as services:
            print(f"\n[sweep-workpool] servers and 2 workers up in {time.monotonic() - started:.1f} s")
            yield Stack(services, root)


@pytest.fixture(scope="module")
def deployed(stack):
    cron = f"17 {(datetime.now(UTC).hour + 12) % 24} * * *"  # the nightly retrain never fires meanwhile
    proc = stack.run(["make", "-C", ROOT, "deploy"], stack.client_env(SNGP_RETRAIN_CRON=cron), timeout=600)
    assert proc.returncode == 0, describe(proc)
    assert f"Deployment '{DEPLOYMENT}' successfully" in proc.stdout, describe(proc)
    print(f"[sweep-workpool] make deploy: {proc.seconds:.1f} s")
    return http_json(f"{stack.prefect_api}/deployments/name/{DEPLOYMENT}")


@pytest.fixture(scope="module")
def thread_run(stack):
    """The reference: the thread runner from an empty cache, recorded in the same MLflow server."""
    proc = stack.sweep("cache-thread")
    assert proc.returncode == 0, describe(proc)
    WALL_TIMES["thread pool (2 threads)"] = proc.seconds
    reader = stack.reader()
    return proc, check_complete_record(reader, _parent_id(proc), cached=False)


@pytest.fixture(scope="module")
def pool_run(stack, deployed, thread_run):
    """The same sweep on the work pool, from an empty cache of its own."""
    proc = stack.sweep("cache-pool", "--runner", "workpool")
    assert proc.returncode == 0, describe(proc) + stack.logs()
    WALL_TIMES["work pool (2 workers)"] = proc.seconds
    return proc


def _parent_id(proc) -> str:
    for line in proc.stdout.splitlines():
        if line.startswith("MLflow parent run: "):
            return line.split()[3]
    raise AssertionError(f"no parent run id in the output\n{describe(proc)}")


def _check_flow_runs(stack: Stack, deployment: dict, points: dict, cache: Path) -> dict[str, list[str]]:
    """Every point's flow run: COMPLETED, of the sweep-point deployment, run by the worker its MLflow
    run names, linked to the sweep flow run, its result file in the sweep's cache. -> {worker: [ids]}"""
    by_worker: dict[str, list[str]] = {}
    processes = set()
    for point_id, run in sorted(points.items()):
        tags = run.data.tags
        flow_run = stack.flow_run(tags["sweep.flow_run_id"])
        assert flow_run["state"]["type"] == "COMPLETED", (point_id, flow_run["state"])
        assert flow_run["deployment_id"] == deployment["id"] and flow_run["work_pool_name"] == "sngp-pool"
        assert flow_run["name"].startswith(f"{point_id} sngp spec_norm_bound="), flow_run["name"]
        assert flow_run["parameters"]["label"] == flow_run["name"]
        assert flow_run["parent_task_run_id"], "a point's flow run is shown under the sweep's flow run"
        worker = flow_run["labels"]["prefect.worker.name"]
        assert worker == tags["sweep.prefect_worker"], (point_id, worker, tags)
        by_worker.setdefault(worker, []).append(point_id)
        result = json.loads((cache / "sweeps" / "points" / f"{flow_run['id']}.json").read_text())
        assert result["prefect_worker"] == worker
        assert f"{result['host']}:{result['pid']}" == tags["sweep.worker"]
        assert result["metrics"]["test_accuracy"] == run.data.metrics["test_accuracy"]
        processes.add(tags["sweep.worker"])
    assert len(processes) == len(points), "each point runs in a flow-run process of its own"
    return by_worker


# --------------------------------------------------------------------------------------------------


def test_workpool_sweep_spreads_over_two_workers_with_the_thread_runners_metrics(
    stack, deployed, thread_run, pool_run
):
    proc = pool_run
    assert f"work pool 'sngp-pool' via deployment {DEPLOYMENT} (2 workers online)" in proc.stdout
    assert f"{N_POINTS} points, {N_POINTS} finished (0 from the cache), 0 failed" in proc.stdout, proc.stdout
    reader = stack.reader()
    parent_id = _parent_id(proc)
    points = check_complete_record(reader, parent_id, cached=False)  # params, metrics, curves, plots
    assert_same_metrics(thread_run[1], points, "work pool vs thread pool")
    assert reader.client.get_run(parent_id).data.tags["prefect.flow_run_id"]  # the sweep's own flow run

    by_worker = _check_flow_runs(stack, deployed, points, stack.cache("cache-pool"))
    assert set(by_worker) == set(WORKERS), f"points ran on {by_worker}, expected both workers"
    for worker, ids in by_worker.items():
        assert f"  {worker}: {', '.join(ids)}" in proc.stdout
    # The points were computed into the sweep's cache folder (the workers got SNGP_CACHE_DIR).
    assert len(list((stack.cache("cache-pool") / "models").iterdir())) == N_POINTS
    assert not reader.running()
    print(
        f"\n[sweep-workpool] work pool (2 workers): {proc.seconds:.1f} s, thread pool: "
        f"{WALL_TIMES['thread pool (2 threads)']:.1f} s; "
        + "; ".join(f"{w} ran {', '.join(ids)}" for w, ids in sorted(by_worker.items()))
    )


def _creates_flow_run_of(point_id: str):
    """Proxy rule: the request creating point `point_id`'s flow run from the deployment."""
    return lambda method, path, body: (
        method == "POST" and path.endswith("/create_flow_run") and f'"{point_id} sngp '.encode() in body
    )


def test_rerun_on_the_pool_is_served_from_the_cache_through_a_busy_server(stack, deployed, pool_run):
    """The cached rerun, its Prefect requests through a proxy: p003's dispatch is answered 503 past the
    client's retries (--server-grace 2: each request is tried twice, three 503s outlast the first try of
    the dispatch) and p005's flow run is created but the answer lost (the client sends it again)."""
    first = points_of(stack.reader(), _parent_id(pool_run))

    def count(**flow_runs) -> int:
        return http_json(f"{stack.prefect_api}/flow_runs/count", {"flow_runs": flow_runs})

    by_deployment = {"deployment_id": {"any_": [deployed["id"]]}}
    before = count(**by_deployment)
    before_p005 = count(**by_deployment, name={"like_": "p005 sngp"})
    busy = {"p003 refused": (_creates_flow_run_of("p003"), 3)}
    lost = {"p005 lost": _creates_flow_run_of("p005")}
    with dropping_proxy(stack.prefect_api.removesuffix("/api"), lost, busy) as proxy:
        env = {**stack.client_env(cache_dir=stack.cache("cache-pool")), "PREFECT_API_URL": f"{proxy.url}/api"}
        proc = stack.run(
            [SNGP, "sweep", "--config", SWEEP, "--runner", "workpool", "--server-grace", "2"], env
        )
    assert proc.returncode == 0, describe(proc) + stack.logs()
    assert f"{N_POINTS} points, {N_POINTS} finished ({N_POINTS} from the cache), 0 failed" in proc.stdout, (
        describe(proc)
    )
    assert proxy.refused == ["p003 refused"] * 3, proxy.refused
    assert proxy.dropped == ["p005 lost"], proxy.dropped
    assert f"Retry 1/{DISPATCH_RETRIES} will start" in proc.stderr, describe(proc)  # the dispatch's own retry
    # One flow run per point: neither the retried dispatch nor the resent request made a second one.
    assert count(**by_deployment) - before == N_POINTS
    assert count(**by_deployment, name={"like_": "p005 sngp"}) - before_p005 == 1
    reader = stack.reader()
    points = check_complete_record(reader, _parent_id(proc), cached=True)  # a complete new record anyway
    assert_same_metrics(first, points, "cached rerun on the pool")
    by_worker = _check_flow_runs(stack, deployed, points, stack.cache("cache-pool"))
    assert set(by_worker) <= set(WORKERS)
    WALL_TIMES["work pool, cached rerun"] = proc.seconds

    # One cache for every runner: the thread runner finds the pool's points cached.
    threads = stack.sweep("cache-pool")
    assert threads.returncode == 0, describe(threads)
    assert f"{N_POINTS} finished ({N_POINTS} from the cache)" in threads.stdout, threads.stdout
    assert_same_metrics(first, check_complete_record(reader, _parent_id(threads), cached=True), "threads")
    print(
        f"\n[sweep-workpool] cached rerun on the pool: {proc.seconds:.1f} s; thread runner on the pool's "
        f"cache: {threads.seconds:.1f} s"
    )


@pytest.mark.parametrize(
    "deployment, message",
    [
        ("sweep-point/nope", "deployment 'sweep-point/nope' does not exist on the Prefect server at"),
        ("uncertainty-pipeline/smoke", "runs flow 'uncertainty-pipeline', not 'sweep-point'"),
    ],
    ids=["unknown-deployment", "another-flow"],
)
def test_a_deployment_that_cannot_run_points_is_one_line(stack, deployed, deployment, message):
    before = http_json(f"{stack.prefect_api}/flow_runs/count", {})
    proc = stack.sweep("cache-bad", "--deployment", deployment)
    assert proc.returncode == 2, describe(proc)
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, describe(proc)
    assert http_json(f"{stack.prefect_api}/flow_runs/count", {}) == before  # nothing started


def test_a_failed_point_flow_run_is_reported_with_its_worker_and_reason(stack, deployed, monkeypatch):
    """The dispatch task (what each mapped point of a workpool sweep runs) against a point flow run
    that fails on its worker: the error names the flow run, the worker and the cause. Two causes,
    run at once: a data file the worker cannot see, and a worker running other code than the sweep."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    from prefect.settings import PREFECT_API_URL, temporary_settings

    cache = stack.cache("cache-pool")
    monkeypatch.setenv("SNGP_CACHE_DIR", str(cache))  # the sweep's cache folder, as sngp sweep sets it
    data = str(next((cache / "data").glob("*.npz")))
    cases = {
        "bad-data": (str(cache / "data" / "missing.npz"), None),
        "bad-code": (data, "0" * 16),
    }

    def dispatch(label: str, data_path: str, code_version: str | None) -> str:
        kwargs = {"code_version": code_version} if code_version else {}
        try:
            dispatch_point.fn(label, "sngp", {"epochs": 1}, data_path, DEPLOYMENT, poll_seconds=1.0, **kwargs)
        except FlowRunFailed as exc:
            return str(exc)
        raise AssertionError(f"{label}: the flow run did not fail")

    with temporary_settings({PREFECT_API_URL: stack.services.prefect_api_url}):
        with ThreadPoolExecutor(2) as pool:
            futures = {
                label: pool.submit(contextvars.copy_context().run, dispatch, label, *args)
                for label, args in cases.items()
            }
            errors = {label: future.result(timeout=300) for label, future in futures.items()}
    print("\n[sweep-workpool] " + "\n[sweep-workpool] ".join(errors.values()))
    for label, error in errors.items():
        assert error.startswith(f"flow run '{label}' ("), error
        assert re.search(r" on worker sngp-serve-worker-[12] ended Failed: ", error), error
    assert f"cannot see the sweep's data file {cases['bad-data'][0]}" in errors["bad-data"]
    assert (
        "runs other code (code version" in errors["bad-code"] and "than the sweep (0000" in errors["bad-code"]
    )


def test_stopping_the_stack_stops_both_workers(stack, pool_run):
    services = stack.services
    assert set(services.worker_statuses()) == set(WORKERS)
    assert all(w["status"] == "ONLINE" for w in services.worker_statuses().values())
    for name in ("worker-1.log", "worker-2.log"):
        assert (services.log_dir / name).stat().st_size > 0, name
    children = [c.proc for c in services.children.values() if c.proc.poll() is None]
    workers = [c.proc for key, c in services.children.items() if key.startswith("worker-")]
    assert len(workers) == 2 and all(p.poll() is None for p in workers)
    seconds = services.stop()
    assert all(p.poll() is not None for p in children)
    assert seconds < 30
    print(
        f"\n[sweep-workpool] stopped in {seconds:.1f} s; wall times of the small sweep: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in WALL_TIMES.items())
    )
