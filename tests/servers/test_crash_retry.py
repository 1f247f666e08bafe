"""A crashed retrain/nightly run is retried once, automatically; a crash of the retry is left Crashed.

On a real `sngp serve` stack (--heartbeat-seconds 30, two workers of one flow run each): the sleeper
flow (tests/servers/sleeper_flow.py) deployed under the retrain flow's name as retrain/nightly and
retrain/nightly-retry (prefect.yaml's names: the automation looks them up by name), and `sngp
deploy-automations`, as `make deploy` runs it. Two nightly runs are started (one short; one long,
submitted as `sngp sweep --runner workpool` submits a point), one per worker; they send heartbeats
every 30 s, and both workers are SIGKILLed with their flow-run processes, as when the machine dies;
`sngp serve` restarts them. Then:

1. `sngp serve`'s crash automation marks both runs Crashed once their heartbeats stop: not before the
   window after a run's last heartbeat has passed, and within a generous bound after it, with a
   message saying why (the state's message in the Prefect UI); the sweep's dispatch reports its run as
   one that stopped responding;
2. the automation `sngp: retry a crashed nightly retrain` starts one run of retrain/nightly-retry per
   crashed run, with exactly its parameters;
3. the long one's retry crashes too, its flow-run process SIGKILLed under a live worker (which reports
   it Crashed at once, so the test does not wait out a second heartbeat window), while the short one's
   completes: the second crash ends Crashed with the worker's readable message, and no third run of
   either deployment appears.

Nothing is mocked. `pytest -s` prints the measured times.
"""

from __future__ import annotations

import contextvars
import threading
import time
import uuid
from datetime import UTC, datetime

from support.cli import SNGP
from support.flow_runs import (
    deploy_sleeper,
    heartbeats,
    iso,
    kill_flow_runs,
    kill_worker_and_flow_runs,
    wait_for,
)
from support.net import http_json
from support.stack import serve_processes

from flows.ops.automation import MIN_HEARTBEAT_SECONDS, crash_after_seconds, crash_message
from flows.ops.drift_automation import RETRAIN_DEPLOYMENT
from flows.ops.retry_automation import RETRY_AUTOMATION_NAME, RETRY_DEPLOYMENT, retry_automation
from tasks.sweep import FlowRunFailed, dispatch_point

HEARTBEAT = MIN_HEARTBEAT_SECONDS  # 30 s: the shortest Prefect accepts
WITHIN = crash_after_seconds(HEARTBEAT)  # 120 s without a heartbeat -> Crashed
LATE = 90.0  # how much later than its window the automation may fire on a loaded 2-core machine
DETECT = WITHIN + 120  # kill -> Crashed: the crash window plus a loaded machine
START = 240  # a flow run created -> Running on the (restarted) worker
SHORT = 50  # seconds the short run and its retry (which must complete: two heartbeats) sleep
# The nightly runs' nested parameters, which a retry must carry over as they are.
MODEL_SETTINGS = {"epochs": 3, "methods": ["sngp", "deterministic"]}
QUIET = 20  # after the last crash: long enough for the automation to have answered it (it takes seconds)


def test_the_server_accepts_the_retry_automation():
    """Prefect's server refuses RunDeployment automations that could loop; ours is reactive to Crashed
    runs of one deployment only."""
    from prefect.server.events.schemas.automations import AutomationCreate

    ours = retry_automation(uuid.uuid4(), uuid.uuid4())
    AutomationCreate.model_validate(ours.model_dump(mode="json", exclude={"id"}))


def test_a_crashed_nightly_run_is_retried_once_and_a_crashed_retry_is_left_crashed(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("SNGP_CACHE_DIR", str(tmp_path / "cache"))  # the dispatch passes it to the worker
    with serve_processes(tmp_path / "stack") as launch:
        stack = launch("--heartbeat-seconds", str(HEARTBEAT), "--workers", "2")
        started = time.monotonic()
        stack.wait_ready()
        up = time.monotonic() - started
        api = stack.prefect_api
        nightly = deploy_sleeper(api, RETRAIN_DEPLOYMENT)
        retry = deploy_sleeper(api, RETRY_DEPLOYMENT)
        done = stack.run([SNGP, "deploy-automations"], stack.client_env(mlflow=False), timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert (
            f"automation {RETRY_AUTOMATION_NAME!r}: created (a crashed {RETRAIN_DEPLOYMENT} run -> "
            f"{RETRY_DEPLOYMENT}, once)"
        ) in done.stdout, done.stdout

        def run(run_id: str) -> dict:
            return http_json(f"{api}/flow_runs/{run_id}")

        def runs_of(deployment: dict) -> list[dict]:
            return http_json(
                f"{api}/flow_runs/filter",
                {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}, "sort": "START_TIME_ASC"},
            )

        def named(name: str) -> dict | None:
            found = http_json(f"{api}/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})
            return found[0] if found else None

        def logs() -> str:
            text = f"\n--- sngp serve ---\n{stack.output[-3000:]}"
            for log in sorted((stack.data_dir / "logs").glob("worker-*.log")):
                text += f"\n--- {log.name} (tail) ---\n{log.read_text(errors='replace')[-2000:]}"
            return text

        def running_with_heartbeat(run_ids: list[str]) -> None:
            wait_for(
                "the flow runs did not all run and send a heartbeat",
                lambda: all(run(i)["state"]["type"] == "RUNNING" and heartbeats(api, i) for i in run_ids),
                START,
                every=2.0,
                describe=logs,
            )

        def kill_worker_of(run_id: str, worker_too: bool = True) -> None:
            """SIGKILL the worker running `run_id` with its flow run, as when its machine dies; without
            `worker_too`, only the flow run: the live worker reports it Crashed at once."""
            worker = run(run_id)["labels"]["prefect.worker.name"]
            kill = kill_worker_and_flow_runs if worker_too else kill_flow_runs
            tree = kill(stack.service_pid(f"--name {worker} "))
            assert any("prefect.engine" in cmd or "_workspace_supervisor" in cmd for cmd in tree.values()), (
                tree
            )

        def crashed(run_ids: list[str], since: float) -> dict[str, tuple[dict, float]]:
            """Wait until every run is Crashed -> {id: (its state, seconds from `since` to seen)}."""
            seen: dict[str, tuple[dict, float]] = {}

            def check() -> bool:
                for i in run_ids:
                    if i not in seen and (state := run(i)["state"])["type"] == "CRASHED":
                        seen[i] = (state, time.monotonic() - since)
                return len(seen) == len(run_ids)

            wait_for(
                "the flow runs were not all marked Crashed",
                check,
                DETECT,
                describe=lambda: f": {[run(i)['state'] for i in run_ids]}{logs()}",
            )
            return seen

        # Two nightly runs, one on each worker: a short one, and a long one submitted the way `sngp sweep
        # --runner workpool` submits its points (tasks.sweep.dispatch_point, waited on in the background).
        def start_nightly(seconds: float) -> dict:
            parameters = {
                "label": f"nightly-{uuid.uuid4().hex[:8]}",
                "model_settings": MODEL_SETTINGS,
                "seconds": seconds,
            }
            return http_json(f"{api}/deployments/{nightly['id']}/create_flow_run", {"parameters": parameters})

        short = start_nightly(SHORT)
        label, outcome = f"nightly-{uuid.uuid4().hex[:8]}", {}

        def dispatch() -> None:
            try:
                dispatch_point.fn(
                    label, "sngp", MODEL_SETTINGS, "/nowhere.npz", RETRAIN_DEPLOYMENT, poll_seconds=2.0
                )
                outcome["error"] = "the dispatch returned normally"
            except FlowRunFailed as exc:
                outcome["error"] = str(exc)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = f"unexpected {type(exc).__name__}: {exc}"

        with temporary_settings({PREFECT_API_URL: api}):
            context = contextvars.copy_context()
        dispatcher = threading.Thread(target=context.run, args=(dispatch,), daemon=True)
        dispatcher.start()
        long = wait_for("the dispatched flow run was not created", lambda: named(label), 60, describe=logs)
        running_with_heartbeat([short["id"], long["id"]])

        # The machine dies: both workers and their flow runs, nothing left to report it.
        kill_worker_of(short["id"])
        kill_worker_of(long["id"])
        killed, killed_wall = time.monotonic(), datetime.now(UTC)
        last_beat = {i: max(heartbeats(api, i)) for i in (short["id"], long["id"])}
        # Still Running until the window after a run's last heartbeat has passed...
        while time.time() < min(beat.timestamp() for beat in last_beat.values()) + WITHIN - 5:
            states = [run(i)["state"] for i in last_beat]
            assert {s["type"] for s in states} == {"RUNNING"}, f"marked before its window ended: {states}"
            time.sleep(5)
        # ... then Crashed by sngp serve's automation, with its message.
        first = crashed([short["id"], long["id"]], killed)
        for run_id, (state, _) in first.items():
            assert state["name"] == "Crashed" and state["message"] == crash_message(HEARTBEAT), state
            assert not [b for b in heartbeats(api, run_id) if b > killed_wall], "a heartbeat after the kill"
            silent = (iso(state["timestamp"]) - last_beat[run_id]).total_seconds()
            assert WITHIN - 1 <= silent <= WITHIN + LATE, (last_beat[run_id], state)
        # The dispatch reports its point as a run that stopped responding.
        dispatcher.join(timeout=30)
        error = outcome.get("error", "the dispatch is still waiting")
        assert error.startswith(f"flow run '{label}' ({long['id']}) on worker sngp-serve-worker-"), error
        assert "stopped responding (its worker or machine died) and was marked Crashed: " in error, error
        assert error.endswith(crash_message(HEARTBEAT)), error

        # One retry per crashed run, with its parameters, on retrain/nightly-retry.
        retries = wait_for(
            "the automation did not start one retry per crashed run",
            lambda: len(found := runs_of(retry)) >= 2 and found,
            120,
            describe=logs,
        )
        assert len(retries) == 2, retries
        by_label = {r["parameters"]["label"]: r for r in retries}
        retry_of = {i: by_label[run(i)["parameters"]["label"]] for i in (short["id"], long["id"])}
        for original_id, retry_run in retry_of.items():
            assert retry_run["parameters"] == run(original_id)["parameters"]
            assert retry_run["deployment_id"] == retry["id"]
        short_retry, long_retry = retry_of[short["id"]]["id"], retry_of[long["id"]]["id"]
        running_with_heartbeat([short_retry, long_retry])
        retries_running = time.monotonic()

        # The long one's retry crashes too (its flow-run process dies) while the short one's completes.
        kill_worker_of(long_retry, worker_too=False)
        killed_again = time.monotonic()
        completed = wait_for(
            "the retry of the short run did not end",
            lambda: (
                (s := run(short_retry)["state"])["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
                and s
            ),
            SHORT + DETECT,
            every=2.0,
            describe=logs,
        )
        assert completed["type"] == "COMPLETED", completed
        retry_completed = time.monotonic()
        # Its heartbeats came HEARTBEAT s apart: the flow-run processes got the workers' interval.
        beats = heartbeats(api, short_retry)
        assert len(beats) >= 2, beats
        interval = (beats[1] - beats[0]).total_seconds()
        assert HEARTBEAT - 3 <= interval <= HEARTBEAT + 15, beats
        second = crashed([long_retry], killed_again)

        # The second crash is left Crashed, with its reason, and nothing runs again.
        time.sleep(QUIET)
        final = run(long_retry)["state"]
        assert final["type"] == "CRASHED" and "-9" in final["message"], final
        assert {r["id"] for r in runs_of(retry)} == {short_retry, long_retry}
        assert {r["id"] for r in runs_of(nightly)} == {short["id"], long["id"]}
        assert {run(i)["state"]["type"] for i in (short["id"], long["id"])} == {"CRASHED"}
        assert stack.running
        assert stack.output.count("exited with code -9; restarting") == 2, stack.output

        detect = sorted(seconds for _, seconds in first.values())
        # From each crash (the Crashed state's time on the server) to its retry run being created.
        react = sorted(
            (iso(retry_of[i]["created"]) - iso(state["timestamp"])).total_seconds()
            for i, (state, _) in first.items()
        )
        print(
            f"\n[crash-retry] serve up in {up:.1f} s; SIGKILL -> nightly runs Crashed {detect[0]:.1f} / "
            f"{detect[1]:.1f} s; Crashed -> retry created {react[0]:.1f} / {react[1]:.1f} s; both retries "
            f"running {retries_running - killed - detect[1]:.1f} s after the last crash was seen; short "
            f"retry completed {retry_completed - killed - detect[1]:.1f} s after it; second SIGKILL -> "
            f"retry Crashed {second[long_retry][1]:.1f} s, then no new run in {QUIET} s; heartbeat interval "
            f"{interval:.1f} s\n"
            f"[crash-retry] message: {final['message']}"
        )
