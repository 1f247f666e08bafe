"""Flow runs whose worker and machine die are marked Crashed, on real servers.

`sngp serve` gives its workers' flow runs a heartbeat (--heartbeat-seconds, 30 s: Prefect's minimum)
and keeps one automation on its Prefect server that sets a deployment's flow run Crashed once it has
sent no heartbeat for 3 intervals + 30 s (flows.ops.automation.crash_automation). Here:

1. the automation exists exactly once after `sngp serve` is started twice on one data directory, and
   follows --heartbeat-seconds (updated in place, duplicates removed, disabled with 0);
2. a flow run of a deployment (tests/servers/sleeper_flow.py, which only sleeps), submitted the way
   `sngp sweep --runner workpool` submits its points (tasks.sweep.dispatch_point), runs on the served
   worker and sends heartbeats every 30 s; then the worker and the flow-run process are SIGKILLed
   (nothing is left to report anything) and the automation marks the run Crashed: not before the
   window after its last heartbeat has passed, and within a generous bound after it. The dispatch
   reports the point's failure as a run that stopped responding.

Nothing is mocked. `pytest -s` prints the measured times.
"""

from __future__ import annotations

import contextvars
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
from support.flow_runs import deploy_sleeper, heartbeats, iso, kill_worker_and_flow_runs, wait_for
from support.net import http_json, two_ports
from support.stack import ServeProcess, alive, serve_processes, use_server_env

from flows.ops.automation import (
    CRASH_AUTOMATION_NAME,
    MIN_HEARTBEAT_SECONDS,
    crash_after_seconds,
    crash_automation,
    crash_message,
    sync_crash_automation,
)
from flows.ops.stack import start_services

HEARTBEAT = MIN_HEARTBEAT_SECONDS  # 30 s: the shortest Prefect accepts
WITHIN = crash_after_seconds(HEARTBEAT)  # 120 s
SLEEPER = "sngp-test-sleeper/sleep"
LATE = 90.0  # how much later than its window the automation may fire on a loaded 2-core machine


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


# --------------------------------------------------------------------------------------------------


def _flow_run_named(api: str, name: str) -> dict | None:
    found = http_json(f"{api}/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})
    return found[0] if found else None


def test_a_run_whose_worker_dies_is_marked_crashed(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.sweep import FlowRunFailed, dispatch_point

    use_server_env(monkeypatch, SNGP_CACHE_DIR=str(tmp_path / "cache"))  # the worker inherits it
    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    prefect_port, mlflow_port = two_ports()
    started = time.monotonic()
    with start_services(
        tmp_path / "data", prefect_port=prefect_port, mlflow_port=mlflow_port, heartbeat_seconds=HEARTBEAT,
        timeout=300,
    ) as services:  # fmt: skip
        api = services.prefect_api_url
        up = time.monotonic() - started
        _the_automation(api, HEARTBEAT)
        deployment = deploy_sleeper(api, SLEEPER)
        worker = services.children["worker"].proc

        # Submit it as the sweep submits a point, and wait for the dispatch in the background.
        label = f"sleeper-{uuid.uuid4().hex[:8]}"
        outcome: dict[str, str] = {}

        def dispatch() -> None:
            try:
                dispatch_point.fn(label, "sngp", {}, "/nowhere.npz", SLEEPER, poll_seconds=2.0)
                outcome["error"] = "the dispatch returned normally"
            except FlowRunFailed as exc:
                outcome["error"] = str(exc)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = f"unexpected {type(exc).__name__}: {exc}"

        with temporary_settings({PREFECT_API_URL: api}):
            context = contextvars.copy_context()
        dispatcher = threading.Thread(target=context.run, args=(dispatch,), daemon=True)
        dispatcher.start()

        def worker_log() -> str:
            text = (services.log_dir / "worker.log").read_text(errors="replace")
            return "\n--- worker.log (tail) ---\n" + text[-4000:]

        run = wait_for("the flow run was not created", lambda: _flow_run_named(api, label), 60)
        assert run["deployment_id"] == deployment["id"]
        run_id = run["id"]
        running = wait_for(
            "the flow run did not start running",
            lambda: (r := http_json(f"{api}/flow_runs/{run_id}"))["state"]["type"] == "RUNNING" and r,
            240,
            describe=worker_log,
        )
        assert running["labels"]["prefect.worker.name"] == "sngp-serve-worker"
        running_at = time.monotonic()

        # Two heartbeats, HEARTBEAT s apart: the flow-run process got the workers' interval.
        beats = wait_for(
            "two heartbeats did not arrive",
            lambda: (b := heartbeats(api, run_id)) and len(b) >= 2 and b,
            HEARTBEAT + 90,
            every=2.0,
            describe=worker_log,
        )
        interval = (beats[1] - beats[0]).total_seconds()
        assert HEARTBEAT - 3 <= interval <= HEARTBEAT + 15, beats

        # The worker and its flow run die, as with a machine crash: nobody is left to report it.
        tree = kill_worker_and_flow_runs(worker.pid)
        killed_at, killed_wall = time.monotonic(), datetime.now(UTC)
        assert any("prefect.engine" in cmd or "_workspace_supervisor" in cmd for cmd in tree.values()), tree
        worker.wait(timeout=10)
        wait_for("the killed processes are still alive", lambda: not any(alive(pid) for pid in tree), 10)

        def state() -> dict:
            return http_json(f"{api}/flow_runs/{run_id}")["state"]

        last_beat = max(heartbeats(api, run_id))
        window_end = last_beat.timestamp() + WITHIN
        # Still Running until the window after its last heartbeat has passed...
        while time.time() < window_end - 5:
            current = state()
            assert current["type"] == "RUNNING", (
                f"marked {current['name']} before its window ended: {current}"
            )
            time.sleep(5)
        # ... then Crashed, by the automation.
        crashed = wait_for(
            "the flow run was not marked Crashed",
            lambda: (s := state())["type"] == "CRASHED" and s,
            max(window_end - time.time(), 0) + LATE,
            every=1.0,
            describe=lambda: f": still {state()}",
        )
        crashed_seen = time.monotonic()
        beats = heartbeats(api, run_id)
        assert not [b for b in beats if b > killed_wall], f"heartbeats after the kill: {beats}"
        last_beat = max(beats)
        assert crashed["name"] == "Crashed"
        assert crashed["message"] == crash_message(HEARTBEAT)
        crashed_at = iso(crashed["timestamp"])
        silent = (crashed_at - last_beat).total_seconds()
        assert WITHIN - 1 <= silent <= WITHIN + LATE, (last_beat, crashed_at)

        dispatcher.join(timeout=30)
        error = outcome.get("error", "the dispatch is still waiting")
        assert error.startswith(f"flow run '{label}' ({run_id}) on worker sngp-serve-worker "), error
        assert "stopped responding (its worker or machine died) and was marked Crashed: " in error, error
        assert error.endswith(crash_message(HEARTBEAT)), error

        print(
            f"\n[unresponsive] services up in {up:.1f} s; Running -> 2nd heartbeat "
            f"{killed_at - running_at:.1f} s (interval {interval:.1f} s); SIGKILL -> Crashed seen "
            f"{crashed_seen - killed_at:.1f} s (state at {(crashed_at - killed_wall).total_seconds():.1f} s "
            f"after the kill, {silent:.1f} s after the last heartbeat; window {WITHIN} s)\n"
            f"[unresponsive] dispatch: {error}"
        )
