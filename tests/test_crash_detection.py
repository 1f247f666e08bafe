"""The detection of unresponsive flow runs, without servers (tests/servers/test_unresponsive_runs.py
checks it end to end): the automation `sngp serve` keeps on its Prefect server is one Prefect's API
accepts, with a window derived from the workers' heartbeat interval; the workers get that interval;
and a sweep point whose flow run the automation crashed is reported as one that stopped responding.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

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
def test_a_crashed_point_is_a_failure_that_says_why(tmp_path, monkeypatch, message, expected):
    import prefect.deployments
    from prefect.states import Crashed

    from tasks.sweep import FlowRunFailed, dispatch_point

    monkeypatch.setenv("SNGP_CACHE_DIR", str(tmp_path))
    run_id = uuid.uuid4()
    calls = []

    def run_deployment(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(
            name=kwargs["flow_run_name"],
            id=run_id,
            labels={"prefect.worker.name": "sngp-serve-worker-2"},
            state=Crashed(message=message),
        )

    monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment, raising=False)
    with pytest.raises(FlowRunFailed) as error:
        dispatch_point.fn("p001 sngp", "sngp", {}, str(tmp_path / "d.npz"), "sweep-point/pool")
    assert str(error.value) == f"flow run 'p001 sngp' ({run_id}) on worker sngp-serve-worker-2 {expected}"
    assert calls[0]["timeout"] is None  # it waits for as long as the run takes: the automation ends it
