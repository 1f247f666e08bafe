"""`sngp serve` supervises its services (issue 16, item 1), on real servers; nothing is mocked.

One stack for the module, faults injected one after another:
- the MLflow server SIGKILLed (its whole process group): serve restarts it, a `sngp run` then completes
  with a complete record, serve is still up;
- the same for the Prefect server; the worker comes back online and the work pool and the crash
  automation are still there;
- the worker SIGKILLed: restarted, online again.
And on a stack of its own, a crash loop: the MLflow server killed while another program holds its port, so
every restart exits at once; serve gives up within 2 minutes with a message naming it, stops everything
and exits 1.

Each test prints its figures (time to detect, time to recover), for the Faults table in README.md.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest
from support.cli import PARENT_ID, SMOKE, SNGP, sngp_env
from support.net import http_json
from support.records import check_complete_record
from support.stack import ServeProcess, alive

from flows.ops.automation import CRASH_AUTOMATION_NAME
from flows.ops.commands import DEFAULT_WORK_POOL, WORKER_NAME

RECOVER_WITHIN = 240.0  # busy shared CPUs: a server restart takes 5-30 s here


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


def _smoke_run(serve: ServeProcess, tmp_path, tag: str) -> None:
    """`sngp run` of the smoke config (deterministic only) against the stack: a complete record."""
    workdir = tmp_path / f"run-{tag}"
    workdir.mkdir()
    env = sngp_env(workdir, serve.prefect_api, MLFLOW_TRACKING_URI=serve.mlflow_url)
    proc = serve.run(
        [SNGP, "run", "--config", SMOKE, "--set", "methods=[deterministic]"], env, cwd=workdir, timeout=900
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parent = PARENT_ID.search(proc.stdout)
    assert parent, proc.stdout
    check_complete_record(serve.mlflow_url, parent.group(1), ["deterministic"])
    print(f"sngp run after the restart: {proc.seconds:.1f} s")


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
    serve = ServeProcess(root / "stack", "--heartbeat-seconds", "30", cwd=root / "cwd")
    serve.start()
    try:
        yield serve, root
    finally:
        serve.cleanup()


def test_mlflow_server_killed_is_restarted(stack):
    serve, root = stack
    _kill(serve, "mlflow", "MLflow server")
    _smoke_run(serve, root, "mlflow")
    assert serve.running


def test_prefect_server_killed_is_restarted(stack):
    serve, root = stack
    killed_at = time.time()
    _kill(serve, "prefect", "Prefect server")
    # The work pool and the crash automation are re-ensured; the worker reconnects.
    _worker_online_since(serve, killed_at + 1)
    pools = http_json(f"{serve.prefect_api}/work_pools/filter", {})
    assert DEFAULT_WORK_POOL in [p["name"] for p in pools]
    automations = http_json(f"{serve.prefect_api}/automations/filter", {})
    assert [a["name"] for a in automations].count(CRASH_AUTOMATION_NAME) == 1
    _smoke_run(serve, root, "prefect")
    assert serve.running


def test_worker_killed_is_restarted(stack):
    serve, _ = stack
    killed_at = time.time()
    _kill(serve, "worker", f"Prefect worker {WORKER_NAME!r}")
    _worker_online_since(serve, killed_at)
    assert serve.running


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
