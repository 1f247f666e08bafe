"""The automation that marks flow runs whose worker and machine die Crashed, on real servers.

`sngp serve` gives its workers' flow runs a heartbeat (--heartbeat-seconds, 30 s: Prefect's minimum)
and keeps one automation on its Prefect server that sets a deployment's flow run Crashed once it has
sent no heartbeat for 3 intervals + 30 s (flows.ops.automation.crash_automation). Here the automation
exists exactly once after `sngp serve` is started twice on one data directory, and
follows --heartbeat-seconds (updated in place, duplicates removed, disabled with 0); a bad
--heartbeat-seconds is one line.

That it marks a run Crashed, and when, is shown in tests/servers/test_crash_retry.py: a deployment's
runs (one submitted as `sngp sweep --runner workpool` submits a point) send heartbeats every 30 s, their
workers and flow-run processes are SIGKILLed as when the machine dies, and the runs are Crashed not
before the window after their last heartbeat, within a bound after it, and then retried.

Nothing is mocked.
"""

from __future__ import annotations

import pytest
from support.net import http_json
from support.stack import ServeProcess, serve_processes

from flows.ops.automation import (
    CRASH_AUTOMATION_NAME,
    MIN_HEARTBEAT_SECONDS,
    crash_after_seconds,
    crash_automation,
    crash_message,
    sync_crash_automation,
)

HEARTBEAT = MIN_HEARTBEAT_SECONDS  # 30 s: the shortest Prefect accepts


def _automations(api: str) -> list[dict]:
    found = http_json(
        f"{api}/automations/filter", {"automations": {"name": {"any_": [CRASH_AUTOMATION_NAME]}}}
    )
    return [a for a in found if a["name"] == CRASH_AUTOMATION_NAME]


def _the_automation(api: str, heartbeat: int) -> dict:
    """The one automation of that name, with the settings for `heartbeat`."""
    found = _automations(api)
    assert len(found) == 1, found
    automation = found[0]
    trigger = automation["trigger"]
    assert automation["enabled"] is True
    assert trigger["posture"] == "Proactive" and trigger["threshold"] == 1
    assert trigger["within"] == crash_after_seconds(heartbeat) == 3 * heartbeat + 30
    assert trigger["after"] == ["prefect.flow-run.heartbeat"]
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
            "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"} <= set(trigger["expect"])  # fmt: skip
    assert trigger["for_each"] == ["prefect.resource.id"]
    assert trigger["match"] == {"prefect.resource.id": "prefect.flow-run.*"}
    assert trigger["match_related"] == {"prefect.resource.role": "deployment"}
    [action] = automation["actions"]
    assert action["type"] == "change-flow-run-state" and action["state"] == "CRASHED"
    assert action["message"] == crash_message(heartbeat)
    return automation


# --------------------------------------------------------------------------------------------------


@pytest.fixture
def serve(tmp_path):
    """Factory: serve(*args, ports=...) -> a launched ServeProcess on tmp_path/stack; stopped afterwards."""
    with serve_processes(tmp_path / "stack") as launch:
        yield launch


def test_the_automation_exists_once_and_follows_the_heartbeat(serve):
    first = serve("--no-worker")
    api = first.prefect_api
    first.wait_ready()
    assert f"automation {CRASH_AUTOMATION_NAME!r} created: flow runs of deployments silent for 120 s" in (
        first.output
    )
    assert "Crash check:  flow runs of deployments are marked Crashed after 120 s without a heartbeat" in (
        first.output
    )
    created = _the_automation(api, 30)
    assert first.terminate()[0] == 0, first.output

    # Started again on the same data dir: still one, the same one, now with the new interval.
    second = serve("--no-worker", "--heartbeat-seconds", "45", ports=(first.prefect_port, first.mlflow_port))
    second.wait_ready()
    assert f"automation {CRASH_AUTOMATION_NAME!r} updated: flow runs of deployments silent for 165 s" in (
        second.output
    )
    updated = _the_automation(api, 45)
    assert updated["id"] == created["id"]

    # What each start does, directly against the running server.
    sync = sync_crash_automation
    assert sync(api, 45) == "unchanged"
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        crash_automation(45).create()  # a copy made by hand
    assert len(_automations(api)) == 2
    assert sync(api, 45) == "updated"
    assert _the_automation(api, 45)["id"] == created["id"]  # the oldest is kept
    assert sync(api, 0) == "disabled"
    [disabled] = _automations(api)
    assert disabled["enabled"] is False and disabled["id"] == created["id"]
    assert sync(api, None) == "absent"  # nothing enabled left to disable
    assert sync(api, 45) == "updated"
    assert _the_automation(api, 45)["id"] == created["id"]
    assert second.terminate()[0] == 0, second.output


def test_bad_heartbeat_fails_fast(tmp_path):
    result = ServeProcess(tmp_path / "d", "--heartbeat-seconds", "10").run_to_exit()
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "sngp serve: error: --heartbeat-seconds must be at least 30 (Prefect's minimum), or 0 to turn "
        "the detection of unresponsive flow runs off (got 10)"
    )
    assert not (tmp_path / "d").exists()
