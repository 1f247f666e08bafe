"""`sngp serve` supervises its services (issue 16, item 1), on real servers; nothing is mocked.

One stack for the module (`--heartbeat-seconds 30`), faults injected one after another while work is in
flight:
- a `sngp run` (default --server-grace 60) without a fault: the baseline duration;
- the MLflow server SIGKILLed (its whole process group) while a `sngp run` against the stack trains: serve
  restarts it, the run exits 0 with a complete record, serve is still up;
- the same for the Prefect server; the worker comes back online and the work pool and the crash
  automation are still there;
- the worker SIGKILLed while it runs a flow run of the smoke deployment: serve restarts it; that flow
  run ends Crashed with its MLflow runs KILLED (nothing left RUNNING), and the next run of the
  deployment completes on the restarted worker with a complete record.
And on a stack of its own, a crash loop: the MLflow server killed while another program holds its port, so
every restart exits at once; serve gives up within 2 minutes with a message naming it, stops everything
and exits 1.

Each test prints its figures (time to detect, time to recover, the run's duration against the baseline),
for the Faults table in README.md.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from support.cli import PARENT_STARTED, SMOKE, SNGP, SngpProcess, clean_server_env, describe
from support.net import http_json
from support.records import check_complete_record, children, client, prefect_completed
from support.stack import ServeProcess, alive

from flows.ops.automation import CRASH_AUTOMATION_NAME, crash_after_seconds
from flows.ops.commands import DEFAULT_WORK_POOL, WORKER_NAME

ROOT = Path(__file__).resolve().parents[2]
RECOVER_WITHIN = 240.0  # busy shared CPUs: a server restart takes 5-30 s here
SMOKE_ONE = ["run", "--config", str(SMOKE), "--set", "methods=[deterministic]"]
SMOKE_DEPLOYMENT = "uncertainty-pipeline/smoke"
PREFECT = SNGP.parent / "prefect"


def _wait_line(serve: ServeProcess, pattern: str, after: int, timeout: float) -> float:
    """Seconds until serve prints a line matching `pattern` after its first `after` lines."""
    started = time.monotonic()
    regex = re.compile(pattern)
    while time.monotonic() - started < timeout:
        if any(regex.search(line) for line in serve.lines[after:]):
            return time.monotonic() - started
        assert serve.running, f"sngp serve exited:\n{serve.output}"
        time.sleep(0.2)
    pytest.fail(f"no line matching {pattern!r} within {timeout:.0f} s:\n{serve.output}")


def _kill(serve: ServeProcess, role: str, name: str) -> tuple[float, float]:
    """SIGKILL the process group of serve's `role` service; (seconds to detect, seconds to recover)."""
    pid = serve.service_pid(role)
    after = len(serve.lines)
    os.killpg(pid, signal.SIGKILL)
    exited = rf"{re.escape(name)}.* exited with code -9; restarting in 1 s \(1/5"
    detect = _wait_line(serve, exited, after, 30)
    recover = _wait_line(serve, rf"{re.escape(name)}.* is back", after, RECOVER_WITHIN)
    assert not alive(pid)
    new_pid = serve.service_pid(role)
    assert new_pid != pid
    print(f"\n{name} SIGKILLed: detected in {detect:.1f} s, back in {recover:.1f} s")
    return detect, recover


def _kill_mid_run(serve: ServeProcess, role: str, name: str, baseline: float) -> SngpProcess:
    """SIGKILL `role` once a `sngp run` against the stack has opened its MLflow parent run (it is training
    then); serve restarts it, the run exits 0 with a complete record and serve is still up."""
    proc = serve.start_sngp(SMOKE_ONE, f"run-{role}")
    try:
        assert proc.wait_for(PARENT_STARTED, 600), describe(proc)
        into = time.monotonic() - proc.started
        assert proc.proc.poll() is None, f"the run ended before the fault\n{describe(proc)}"
        detect, recover = _kill(serve, role, name)
    except BaseException:
        proc.cleanup()
        raise
    serve.completed(proc, ["deterministic"])
    assert serve.running, serve.output
    print(
        f"{name} killed {into:.1f} s into a `sngp run`: detected {detect:.1f} s, back {recover:.1f} s "
        f"after the kill; the run exited 0 after {proc.seconds:.1f} s (no fault: {baseline:.1f} s), "
        "record complete"
    )
    return proc


def _worker_online_since(serve: ServeProcess, since: float, timeout: float = 120) -> None:
    """Our worker reports ONLINE with a heartbeat later than `since` (epoch seconds)."""
    from datetime import datetime

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            workers = http_json(f"{serve.prefect_api}/work_pools/{DEFAULT_WORK_POOL}/workers/filter", {})
        except OSError:
            workers = []
        for worker in workers or []:
            beat = worker.get("last_heartbeat_time")
            if worker["name"] == WORKER_NAME and worker["status"] == "ONLINE" and beat:
                if datetime.fromisoformat(beat.replace("Z", "+00:00")).timestamp() > since:
                    return
        time.sleep(2)
    pytest.fail(f"worker {WORKER_NAME!r} not online again within {timeout:.0f} s:\n{serve.output}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("supervised")
    # The worker's flow runs (they run in this checkout) keep their task cache in the test's folders.
    env = clean_server_env(SNGP_CACHE_DIR=str(root / "worker-cache"))
    serve = ServeProcess(
        root / "stack", "--heartbeat-seconds", "30", env=env, cwd=root / "cwd", client_dir=root / "client"
    )
    serve.start()
    try:
        yield serve
    finally:
        serve.cleanup()


@pytest.fixture(scope="module")
def baseline(stack) -> float:
    """Seconds of a `sngp run` against the stack without a fault (record complete)."""
    proc = stack.start_sngp(SMOKE_ONE, "run-baseline")
    stack.completed(proc, ["deterministic"])
    print(f"\nsngp run without a fault: {proc.seconds:.1f} s")
    return proc.seconds


def test_mlflow_server_killed_mid_run_is_restarted_and_the_run_completes(stack, baseline):
    _kill_mid_run(stack, "mlflow", "MLflow server", baseline)


def test_prefect_server_killed_mid_run_is_restarted_and_the_run_completes(stack, baseline):
    serve = stack
    killed_at = time.time()
    proc = _kill_mid_run(serve, "prefect", "Prefect server", baseline)
    # The work pool and the crash automation are re-ensured; the worker reconnects.
    _worker_online_since(serve, killed_at + 1)
    pools = http_json(f"{serve.prefect_api}/work_pools/filter", {})
    assert DEFAULT_WORK_POOL in [p["name"] for p in pools]
    automations = http_json(f"{serve.prefect_api}/automations/filter", {})
    assert [a["name"] for a in automations].count(CRASH_AUTOMATION_NAME) == 1
    # Prefect's record of the run survived the restart: the flow run and every task run COMPLETED.
    flow_run_id = client(serve.mlflow_url).get_run(proc.parent_id).data.tags["prefect.flow_run_id"]
    prefect_completed(serve.prefect_api, flow_run_id)


# ---------------------------------------------------------------------------------------------------------
# The worker, with a deployment run in flight


def _deploy_smoke(serve: ServeProcess) -> dict:
    """prefect.yaml's smoke deployment registered from this checkout (`prefect deploy --name smoke`, what
    `make deploy` does for every deployment)."""
    env = serve.client_env(mlflow=False, SNGP_PROJECT_DIR=str(ROOT))
    proc = serve.run([PREFECT, "--no-prompt", "deploy", "--name", "smoke"], env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, describe(proc)
    return http_json(f"{serve.prefect_api}/deployments/name/{SMOKE_DEPLOYMENT}")


def _run_deployment(serve: ServeProcess, deployment: dict) -> str:
    """A flow run of the deployment (deterministic only), as `prefect deployment run` creates it -> its id."""
    run = http_json(
        f"{serve.prefect_api}/deployments/{deployment['id']}/create_flow_run",
        {"parameters": {"methods": ["deterministic"]}},
    )
    return run["id"]


def _flow_state(serve: ServeProcess, flow_run_id: str) -> dict:
    return http_json(f"{serve.prefect_api}/flow_runs/{flow_run_id}")["state"]


FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _wait_state(serve: ServeProcess, flow_run_id: str, types: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (state := _flow_state(serve, flow_run_id))["type"] not in types:
        if time.monotonic() > deadline:
            log = (serve.data_dir / "logs" / "worker.log").read_text(errors="replace")[-4000:]
            pytest.fail(
                f"flow run {flow_run_id} still {state} after {timeout:.0f} s\n--- worker.log ---\n{log}"
            )
        time.sleep(1)
    return state


def _parents_of(serve: ServeProcess, flow_run_id: str) -> list:
    """The MLflow parent runs a flow run of the smoke deployment opened."""
    mlflow = client(serve.mlflow_url)
    experiment = mlflow.get_experiment_by_name("sngp-smoke")
    if experiment is None:
        return []
    return mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )


def test_worker_killed_with_a_deployment_run_in_flight(stack):
    """The worker SIGKILLed while its flow run trains: serve restarts the worker. The flow-run process
    outlives it (its own session) but its console is the dead worker's pipe: at its next log line it
    exits (rich's broken-pipe handling raises SystemExit) and the run ends Crashed, its MLflow runs
    KILLED; were it silent for good, the crash automation would mark it Crashed after 120 s. Nothing is
    left RUNNING, and the next run of the deployment completes on the restarted worker."""
    serve = stack
    deployment = _deploy_smoke(serve)
    flow_run_id = _run_deployment(serve, deployment)
    _wait_state(serve, flow_run_id, {"RUNNING"}, 300)
    deadline = time.monotonic() + 300
    while not _parents_of(serve, flow_run_id):  # in the pipeline: its parent run is open, training starts
        assert time.monotonic() < deadline, _flow_state(serve, flow_run_id)
        time.sleep(0.5)
    killed_at, started = time.time(), time.monotonic()
    detect, recover = _kill(serve, "worker", f"Prefect worker {WORKER_NAME!r}")
    _worker_online_since(serve, killed_at)
    crashed = _wait_state(serve, flow_run_id, FINAL, crash_after_seconds(30) + 90)
    ended = time.monotonic() - started
    assert crashed["type"] == "CRASHED", crashed
    mlflow = client(serve.mlflow_url)
    [parent] = _parents_of(serve, flow_run_id)
    left = [parent, *children(mlflow, parent.info.run_id).values()]
    assert parent.info.status == "KILLED", parent.info
    assert not [r.info.run_name for r in left if r.info.status == "RUNNING"], left

    again = _run_deployment(serve, deployment)
    rerun_started = time.monotonic()
    assert _wait_state(serve, again, FINAL, 600)["type"] == "COMPLETED"
    rerun = time.monotonic() - rerun_started
    [parent] = _parents_of(serve, again)
    check_complete_record(serve.mlflow_url, parent.info.run_id, ["deterministic"])
    assert serve.running, serve.output
    print(
        f"worker killed with a flow run in flight: detected {detect:.1f} s, online again {recover:.1f} s; "
        f"the flow run Crashed {ended:.1f} s after the kill ({crashed['message']}), MLflow runs KILLED; "
        f"the next deployment run COMPLETED in {rerun:.1f} s, record complete"
    )


def test_crash_loop_stops_serve_with_a_message(tmp_path):
    serve = ServeProcess(tmp_path / "stack", "--no-worker")
    serve.start()
    try:
        pid = serve.service_pid("mlflow")
        os.killpg(pid, signal.SIGKILL)
        # Another program takes the port: every restart of the MLflow server exits at once.
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:
            try:
                squatter.bind(("127.0.0.1", serve.mlflow_port))
                break
            except OSError:
                assert time.monotonic() < deadline, "the killed MLflow server's port stayed busy"
                time.sleep(0.1)
        squatter.listen()
        started = time.monotonic()
        try:
            code = serve.proc.wait(timeout=150)
        finally:
            squatter.close()
        seconds = time.monotonic() - started
        print(f"\ncrash loop: sngp serve gave up and stopped in {seconds:.1f} s (exit {code})")
        assert code == 1, serve.output
        assert seconds < 120, serve.output
        serve._reader.join(timeout=5)
        out = serve.output
        print("".join(line for line in serve.lines if "restarting" in line or "error" in line))
        assert "MLflow server exited with code" in out and "a crash loop, giving up" in out, out
        assert "restarting in 16 s (5/5 in 2 min)" in out, out
        assert "last lines of" in out and "mlflow-server.log" in out, out
        assert "Traceback" not in out.split("a crash loop")[0].splitlines()[-1]
        assert not serve.children()
    finally:
        serve.cleanup()
