"""Deployment runs on a served work pool, for fault-injection tests: the sleeper flow deployed from this
checkout, waiting on flow-run states and heartbeats, and killing a worker with its flow runs as a machine
crash would. Real Prefect server, read over its REST API (support.net)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from .net import http_json
from .stack import children_of

ROOT = Path(__file__).resolve().parents[2]
SLEEPER_ENTRYPOINTS = {
    "retrain": "tests/servers/sleeper_flow.py:retrain_stand_in",
}


def deploy_sleeper(api: str, name: str, pool: str = "sngp-pool") -> dict:
    """Deploy tests/servers/sleeper_flow.py as `name` ('retrain/<deployment>') on `pool`, run from this
    checkout as prefect.yaml's deployments are -> the deployment."""
    flow_name, deployment_name = name.split("/")
    flow = http_json(f"{api}/flows/", {"name": flow_name})
    http_json(
        f"{api}/deployments/",
        {
            "name": deployment_name,
            "flow_id": flow["id"],
            "entrypoint": SLEEPER_ENTRYPOINTS[flow_name],
            "work_pool_name": pool,
            "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
            "enforce_parameter_schema": False,
        },
    )
    return http_json(f"{api}/deployments/name/{name}")


def iso(moment: str) -> datetime:
    """A timestamp of Prefect's API as an aware datetime."""
    return datetime.fromisoformat(moment.replace("Z", "+00:00"))


def heartbeats(api: str, flow_run_id: str) -> list[datetime]:
    """When the flow run sent its heartbeat events, oldest first."""
    page = http_json(
        f"{api}/events/filter",
        {
            "filter": {
                "event": {"name": ["prefect.flow-run.heartbeat"]},
                "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
                "order": "ASC",
            },
            "limit": 50,
        },
    )
    return sorted(iso(event["occurred"]) for event in page["events"])


def wait_for(what: str, check: Callable, timeout: float, every: float = 1.0, describe=lambda: ""):
    """check()'s first truthy value; the test fails with '`what` within `timeout` s' + describe()."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:.0f} s{describe()}")
        time.sleep(every)


def kill_worker_and_flow_runs(worker_pid: int) -> dict[int, str]:
    """SIGKILL the worker's process group, then every process it had started (the flow-run
    supervisor and engine run in a session of their own) with their process groups: nothing is left
    to report anything, as when the machine dies. Returns {pid: command line} of what was killed."""
    tree = children_of(worker_pid)
    groups = set()
    for pid in tree:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())
    os.killpg(worker_pid, signal.SIGKILL)  # first the worker: it must not see its flow runs die
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _kill_each(tree)
    return tree


def kill_flow_runs(worker_pid: int) -> dict[int, str]:
    """SIGKILL every process the worker started (its flow runs), leaving the worker alive to see them
    die and report the runs Crashed at once. Returns {pid: command line} of what was killed."""
    tree = children_of(worker_pid)
    _kill_each(tree)
    return tree


def _kill_each(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
