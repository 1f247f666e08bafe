"""The detection of unresponsive flow runs, without the served stack (tests/servers/test_crash_retry.py
checks it end to end): the automation `sngp serve` keeps on its Prefect server is one Prefect's API
accepts, with a window derived from the workers' heartbeat interval; the workers get that interval;
and a sweep point whose flow run the automation crashed is reported as one that stopped responding
(on Prefect's temporary test server, the run set Crashed as the automation or a dying process does).
"""

from __future__ import annotations

import contextvars
import re
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from flows.ops import automation
from flows.ops.errors import ServiceError
from flows.ops.stack import Services


def _as_sent(ours) -> dict:
    """The JSON `Automation.create()` sends to the server (everything but the id it does not have yet)."""
    return ours.model_dump(mode="json", exclude={"id"})


def test_the_automation_is_prefects_zombie_check_with_a_window_from_the_heartbeat():
    from prefect.server.events.schemas.automations import AutomationCreate, Posture

    parsed = AutomationCreate.model_validate(_as_sent(automation.crash_automation(30)))
    trigger = parsed.trigger
    assert parsed.name == automation.CRASH_AUTOMATION_NAME and parsed.enabled
    assert trigger.posture == Posture.Proactive and trigger.threshold == 1
    assert trigger.within == timedelta(seconds=120)  # 3 heartbeats + 30 s
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.for_each == {"prefect.resource.id"}
    for event in ("heartbeat", "Completed", "Failed", "Cancelled", "Crashed", "Suspended", "AwaitingRetry"):
        assert trigger.expects(f"prefect.flow-run.{event}"), event
    assert not trigger.expects("prefect.flow-run.Running")
    [action] = parsed.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED" and not action.force
    assert action.message == automation.crash_message(30)
    assert "No heartbeat for 120 s: the flow run stopped responding" in action.message
    assert automation.crash_after_seconds(60) == 210
    sixty = _as_sent(automation.crash_automation(60))
    assert AutomationCreate.model_validate(sixty).trigger.within == timedelta(seconds=210)


def test_the_trigger_covers_flow_runs_of_deployments_only():
    """Flow runs of deployments run on the workers, with their interval; a `sngp run` in a terminal
    keeps Prefect's 180 s and must not be crashed between two of its heartbeats."""
    from prefect.server.events.schemas.automations import AutomationCreate
    from prefect.server.events.schemas.events import ReceivedEvent

    trigger = AutomationCreate.model_validate(_as_sent(automation.crash_automation(30))).trigger
    run = f"prefect.flow-run.{uuid.uuid4()}"
    deployment = {
        "prefect.resource.id": f"prefect.deployment.{uuid.uuid4()}",
        "prefect.resource.role": "deployment",
    }
    flow = {"prefect.resource.id": f"prefect.flow.{uuid.uuid4()}", "prefect.resource.role": "flow"}

    def event(name: str, *related: dict) -> ReceivedEvent:
        return ReceivedEvent(
            occurred=datetime.now(UTC),
            event=name,
            resource={"prefect.resource.id": run},
            related=list(related),
            id=uuid.uuid4(),
        )

    assert trigger.covers(event("prefect.flow-run.heartbeat", flow, deployment))
    assert trigger.covers(event("prefect.flow-run.Completed", flow, deployment))
    assert not trigger.covers(event("prefect.flow-run.heartbeat", flow))  # no deployment
    assert trigger.bucketing_key(event("prefect.flow-run.heartbeat", flow, deployment)) == (run,)


def test_the_workers_get_the_heartbeat_and_bad_values_fail_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "180")
    monkeypatch.setenv("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", "200")
    data = tmp_path / "d"

    default = Services(data)
    env = default.worker_env("w")
    assert (
        env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30" and "PREFECT_RUNNER_HEARTBEAT_FREQUENCY" not in env
    )
    assert (default.heartbeat_seconds, default.crash_after_seconds) == (30, 120)
    assert Services(data, heartbeat_seconds=45).worker_env("w")["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "45"
    off = Services(data, heartbeat_seconds=0)
    assert off.crash_after_seconds is None
    assert off.worker_env("w")["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "180"  # the user's, untouched

    for bad in (10, 29, -30):
        with pytest.raises(ServiceError, match=rf"--heartbeat-seconds must be at least 30 .*\(got {bad}\)"):
            Services(data, heartbeat_seconds=bad).start()
    assert not data.exists()  # nothing started, nothing written


@pytest.fixture(scope="module")
def prefect_api():
    """A real temporary Prefect server on a database of its own (Prefect's test harness)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _crash_when_created(name: str, message: str, worker: str) -> None:
    """Wait for the flow run `name`, then do what a worker's labels and the automation (or a dying
    process) do to it: label it with its worker, set it Crashed with `message`."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        runs: list = []
        while not runs:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
            time.sleep(0.2)
        client.update_flow_run_labels(runs[0].id, {"prefect.worker.name": worker})
        client.set_flow_run_state(runs[0].id, Crashed(message=message), force=True)


@pytest.mark.parametrize(
    "message, expected",
    [
        (
            automation.crash_message(30),
            "stopped responding (its worker or machine died) and was marked Crashed: "
            + automation.crash_message(30),
        ),
        (
            "Flow run infrastructure exited with non-zero status code -9.",
            "ended Crashed: Flow run infrastructure exited with non-zero status code -9.",
        ),
    ],
    ids=["no-heartbeat", "process-killed"],
)
def test_a_crashed_point_is_a_failure_that_says_why(prefect_api, tmp_path, monkeypatch, message, expected):
    """dispatch_point reports a Crashed flow run as a failure that says why it crashed."""
    from prefect import get_client

    from tasks.sweep import FlowRunFailed, dispatch_point

    monkeypatch.setenv("SNGP_CACHE_DIR", str(tmp_path))
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("sweep-point")
        client.create_deployment(flow_id=flow_id, name="pool", enforce_parameter_schema=False)
    label = f"p001 sngp {uuid.uuid4().hex[:8]}"
    crasher = threading.Thread(
        target=contextvars.copy_context().run,
        args=(_crash_when_created, label, message, "sngp-serve-worker-2"),
        daemon=True,
    )
    crasher.start()
    with pytest.raises(FlowRunFailed) as error:
        dispatch_point.fn(label, "sngp", {}, str(tmp_path / "d.npz"), "sweep-point/pool", poll_seconds=0.5)
    crasher.join(timeout=30)
    assert re.fullmatch(
        rf"flow run '{label}' \([0-9a-f-]{{36}}\) on worker sngp-serve-worker-2 " + re.escape(expected),
        str(error.value),
    ), str(error.value)
