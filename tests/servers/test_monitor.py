"""Monitoring end to end on real servers: `sngp serve`'s stack (flows.ops.stack, no worker) + `make deploy`,
a champion from `sngp retrain`, then `sngp monitor` on an inbox:

- 10 in-distribution batches: scored, one MLflow step each, no drift, no event;
- one batch with 30 % OOD rows: drift, the Prefect event `sngp.drift.detected` about
  `sngp.model.sngp-uncertainty-sngp.1`, and a `retrain/nightly` flow run created by the automation
  `sngp: retrain on drift` within 60 s, seen through Prefect's API;
- the inbox's edge cases: bad files rejected with a reason while the others go on, a missing inbox
  (exit 2), and exactly once across a monitor killed mid-run and across every state a crash can leave.

Nothing is mocked: the Prefect server, the MLflow tracking server and every `sngp` and `make` are real
processes; what they did is read back over Prefect's REST API and MLflow's client.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from support.cli import SMOKE, SNGP, clean_server_env, describe
from support.net import http_json, two_ports

from sngp_models.data import make_ood, make_two_moons

ROOT = Path(__file__).resolve().parents[2]
PREFECT = SNGP.parent / "prefect"
MODEL = "models:/sngp-uncertainty-sngp@champion"
RESOURCE = "sngp.model.sngp-uncertainty-sngp.1"
METRICS = ("batch_rows", "abstain_rate", "mean_uncertainty", "drift_statistic", "drift_p_value", "drift")
AUTOMATION = "sngp: retrain on drift"


# --------------------------------------------------------------------------------------------------
# The stack, the deployments and a champion


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Prefect server + MLflow server (as `sngp serve` starts them) without a worker: the retrain run
    the automation creates stays Scheduled, seen through the API, and trains nothing."""
    from flows.ops.stack import start_services

    root = tmp_path_factory.mktemp("monitor-stack")
    prefect_port, mlflow_port = two_ports()
    with start_services(
        root / "data", prefect_port=prefect_port, mlflow_port=mlflow_port, worker=False
    ) as services:
        yield {"services": services, "root": root, **services.env}


def client_env(stack, **extra: str) -> dict[str, str]:
    return clean_server_env(
        PREFECT_API_URL=stack["PREFECT_API_URL"],
        MLFLOW_TRACKING_URI=stack["MLFLOW_TRACKING_URI"],
        PREFECT_HOME=str(stack["root"] / "client-prefect"),
        SNGP_CACHE_DIR=str(stack["root"] / "cache"),
        **extra,
    )


def run(stack, argv: list, timeout: float = 900, **extra: str) -> subprocess.CompletedProcess:
    cwd = stack["root"] / "client"
    cwd.mkdir(exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=client_env(stack, **extra), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    proc.seconds = time.monotonic() - started
    return proc


def api(stack, path: str, body: dict | None = None):
    return http_json(f"{stack['PREFECT_API_URL']}/{path}", body)


def make_deploy(stack) -> subprocess.CompletedProcess:
    far = f"17 {(datetime.now(UTC).hour + 12) % 24} * * *"  # the nightly schedule never fires meanwhile
    proc = run(
        stack, ["make", "-C", ROOT, "deploy"], timeout=600,
        SNGP_RETRAIN_CRON=far, MONITOR_INBOX=str(stack["root"] / "deployed-inbox"),
    )  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    return proc


@pytest.fixture(scope="module")
def deployed(stack):
    first = make_deploy(stack)
    second = make_deploy(stack)  # idempotent: the same deployments, the automation unchanged
    print(f"\n[monitor] make deploy: {first.seconds:.1f} s, again: {second.seconds:.1f} s")
    return first, second


@pytest.fixture(scope="module")
def champion(stack, deployed):
    """`sngp retrain` (smoke, SNGP only) against the stack: sngp-uncertainty-sngp v1 @champion."""
    proc = run(
        stack, [SNGP, "retrain", "--config", SMOKE, "--set", "methods=[sngp]", "--set", "retrain.data_seed=1"]
    )
    assert proc.returncode == 0 and "sngp-uncertainty-sngp v1: PROMOTED" in proc.stdout, describe(proc)
    print(f"[monitor] sngp retrain: {proc.seconds:.1f} s")
    return MODEL


# --------------------------------------------------------------------------------------------------
# Batches


def in_distribution(seed: int, rows: int = 200) -> pd.DataFrame:
    x, _ = make_two_moons(rows // 2, 0.1, seed=seed)
    return pd.DataFrame(x.astype(np.float64), columns=["x0", "x1"]).assign(request_id=np.arange(rows))


def with_ood(seed: int, fraction: float = 0.3, rows: int = 200) -> pd.DataFrame:
    n_ood = int(round(rows * fraction))
    x, _ = make_two_moons((rows - n_ood) // 2, 0.1, seed=seed)
    mixed = np.r_[x, make_ood(n_ood, seed=seed)].astype(np.float64)
    mixed = mixed[np.random.default_rng(seed).permutation(len(mixed))]
    return pd.DataFrame(mixed, columns=["x0", "x1"]).assign(request_id=np.arange(rows))


def monitor(stack, inbox: Path, model: str = MODEL, *extra: str) -> subprocess.CompletedProcess:
    return run(stack, [SNGP, "monitor", "--model", model, "--inbox", inbox, *extra])


def monitor_run_id(stack, key: str = "sngp-uncertainty-sngp/1") -> str:
    client = MlflowClient(stack["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("sngp-monitor")
    runs = client.search_runs([experiment.experiment_id], f"tags.`sngp.monitor.model` = '{key}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]  # one run per model, reused
    return runs[0].info.run_id


def recorded_steps(stack) -> list[int]:
    """The batch numbers recorded so far for the champion ([] before its first monitor run)."""
    experiment = MlflowClient(stack["MLFLOW_TRACKING_URI"]).get_experiment_by_name("sngp-monitor")
    return steps(stack, monitor_run_id(stack)) if experiment is not None else []


def steps(stack, run_id: str, metric: str = "batch_rows") -> list[int]:
    history = MlflowClient(stack["MLFLOW_TRACKING_URI"]).get_metric_history(run_id, metric)
    return sorted(m.step for m in history)


def drift_events(stack) -> list[dict]:
    page = api(stack, "events/filter", {"filter": {"event": {"name": ["sngp.drift.detected"]}}, "limit": 50})
    return page["events"]


def automation_runs(stack) -> list[dict]:
    """Flow runs of retrain/nightly not put there by its cron schedule."""
    deployment = api(stack, "deployments/name/retrain/nightly")
    runs = api(stack, "flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})
    return [r for r in runs if not r["auto_scheduled"]]


# --------------------------------------------------------------------------------------------------
# Deployment and automation


def test_make_deploy_registers_the_monitor_deployment_and_one_automation(stack, deployed):
    first, second = deployed
    assert f"automation '{AUTOMATION}': created" in first.stdout, describe(first)
    assert f"automation '{AUTOMATION}': unchanged" in second.stdout, describe(second)
    deployment = api(stack, "deployments/name/monitor/every-15-minutes")
    assert deployment["parameters"] == {"model": MODEL, "inbox": str(stack["root"] / "deployed-inbox")}
    (schedule,) = deployment["schedules"]
    assert schedule["schedule"]["interval"] == 900 and schedule["active"]
    assert (stack["root"] / "deployed-inbox").is_dir()  # make deploy created the inbox
    automations = [a for a in api(stack, "automations/filter", {}) if a["name"] == AUTOMATION]
    assert len(automations) == 1, automations
    (automation,) = automations
    nightly = api(stack, "deployments/name/retrain/nightly")
    assert automation["enabled"] and automation["trigger"]["expect"] == ["sngp.drift.detected"]
    assert automation["trigger"]["threshold"] == 1 and automation["trigger"]["within"] == 6 * 3600
    (action,) = automation["actions"]
    assert (action["type"], action["source"], action["deployment_id"]) == (
        "run-deployment",
        "selected",
        nightly["id"],
    )
    assert not action.get("parameters")  # the deployment's own (its config_path if make deploy set one)


# --------------------------------------------------------------------------------------------------
# Drift and the alarm


def test_in_distribution_batches_are_scored_once_without_an_event(stack, champion):
    inbox = stack["root"] / "inbox"
    inbox.mkdir()
    for i in range(10):
        in_distribution(1000 + i).to_csv(inbox / f"batch-{i:02d}.csv", index=False)
        os.utime(inbox / f"batch-{i:02d}.csv", (1e9 + i, 1e9 + i))  # arrival order = name order
    proc = monitor(stack, inbox)
    assert proc.returncode == 0, describe(proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("batch ")]
    assert len(lines) == 10 and all("-> no drift" in line for line in lines), proc.stdout
    assert [int(line.split()[1]) for line in lines] == list(range(1, 11))
    assert [line.split()[2] for line in lines] == [f"batch-{i:02d}.csv:" for i in range(10)]
    print("\n[monitor] " + "\n[monitor] ".join(lines[:3]) + f"\n[monitor] ... ({proc.seconds:.1f} s)")
    assert sorted(p.name for p in inbox.iterdir()) == [".sngp-monitor", "scored"]  # all taken
    scored = pd.read_csv(inbox / "scored" / "batch-03.csv")
    assert list(scored.columns) == [
        "x0",
        "x1",
        "request_id",
        "predicted",
        "prob_0",
        "prob_1",
        "uncertainty",
        "abstain",
    ]
    pd.testing.assert_frame_equal(scored[["x0", "x1", "request_id"]], in_distribution(1003))
    run_id = monitor_run_id(stack)
    for metric in METRICS:
        assert steps(stack, run_id, metric) == list(range(1, 11)), metric
    drift = MlflowClient(stack["MLFLOW_TRACKING_URI"]).get_metric_history(run_id, "drift")
    assert {m.value for m in drift} == {0.0}
    time.sleep(6)  # an event would have been persisted by now
    assert drift_events(stack) == []
    assert automation_runs(stack) == []


def test_a_batch_with_30_percent_ood_rows_raises_the_event_and_starts_a_retrain(stack, champion):
    inbox = stack["root"] / "inbox"  # the same inbox: batch numbers go on
    with_ood(7).to_parquet(inbox / "shifted.parquet")
    proc = monitor(stack, inbox)
    assert proc.returncode == 0, describe(proc)  # drift is a finding, not an error
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("batch ")]
    assert (
        line.startswith("batch 11 shifted.parquet: 200 rows") and "DRIFT (event sngp.drift.detected)" in line
    )
    print(f"\n[monitor] {line}")
    run_id = monitor_run_id(stack)
    assert steps(stack, run_id) == list(range(1, 12))
    (drift,) = [
        m
        for m in MlflowClient(stack["MLFLOW_TRACKING_URI"]).get_metric_history(run_id, "drift")
        if m.step == 11
    ]
    assert drift.value == 1.0

    deadline = time.monotonic() + 30
    while not (events := drift_events(stack)) and time.monotonic() < deadline:
        time.sleep(1)
    assert len(events) == 1, events
    event = events[0]
    assert event["resource"]["prefect.resource.id"] == RESOURCE
    payload = event["payload"]
    assert payload["batch"] == 11 and payload["file"] == "shifted.parquet" and payload["drift"] == 1
    assert payload["batch_rows"] == 200 and payload["abstain_rate"] >= 0.3 and payload["drift_p_value"] < 0.01
    assert payload["model_uri"] == "models:/sngp-uncertainty-sngp/1"

    occurred = datetime.fromisoformat(event["occurred"])
    deadline = time.monotonic() + 60
    while not (runs := automation_runs(stack)) and time.monotonic() < deadline:
        time.sleep(1)
    assert len(runs) == 1, f"no retrain/nightly run from the automation within 60 s of {occurred}"
    created = datetime.fromisoformat(runs[0]["created"])
    print(
        f"[monitor] retrain/nightly flow run {runs[0]['name']} created "
        f"{(created - occurred).total_seconds():.1f} s after the event"
    )
    assert created - occurred < timedelta(seconds=60)
    assert runs[0]["state_type"] == "SCHEDULED"

    # Cooldown: a second drifting batch raises its event, the automation starts nothing more.
    with_ood(8).to_csv(inbox / "shifted-again.csv", index=False)
    again = monitor(stack, inbox)
    assert again.returncode == 0 and "batch 12 shifted-again.csv" in again.stdout, describe(again)
    deadline = time.monotonic() + 30
    while len(drift_events(stack)) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(drift_events(stack)) == 2
    time.sleep(10)
    assert len(automation_runs(stack)) == 1


def test_the_deployment_runs_the_monitor_on_a_worker(stack, champion):
    """monitor/every-15-minutes as make deploy registered it, run with another inbox by a process worker
    (`prefect worker start --run-once`): the batch scored, recorded by the worker's flow run."""
    for retrain in automation_runs(stack):  # the drift-triggered retrain: not for this worker
        api(stack, f"flow_runs/{retrain['id']}/set_state", {"state": {"type": "CANCELLED"}, "force": True})
    inbox = stack["root"] / "deployed-run-inbox"
    inbox.mkdir()
    in_distribution(5000).to_parquet(inbox / "from-the-worker.parquet")
    before = recorded_steps(stack)
    created = run(
        stack, [PREFECT, "deployment", "run", "monitor/every-15-minutes", "--param", f"inbox={inbox}"]
    )
    assert created.returncode == 0, describe(created)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", created.stdout).group(1)
    worker = run(
        stack, [PREFECT, "worker", "start", "--pool", "sngp-pool", "--run-once", "--name", "test-worker"]
    )
    assert worker.returncode == 0, describe(worker)
    flow_run = api(stack, f"flow_runs/{flow_run_id}")
    assert flow_run["state_type"] == "COMPLETED", (
        flow_run["state"],
        worker.stdout[-3000:],
        worker.stderr[-3000:],
    )
    assert [p.name for p in (inbox / "scored").iterdir()] == ["from-the-worker.parquet"]
    assert steps(stack, monitor_run_id(stack)) == [*before, (before[-1] if before else 0) + 1]
    print(f"\n[monitor] the deployment's flow run on a worker: {worker.seconds:.1f} s")


# --------------------------------------------------------------------------------------------------
# The inbox's edge cases


def test_bad_files_are_rejected_with_a_reason_and_the_others_go_on(stack, champion):
    inbox = stack["root"] / "bad-inbox"
    inbox.mkdir()
    (inbox / "garbage.parquet").write_bytes(b"this is not parquet")
    pd.DataFrame({"x0": [0.1], "y": [0.2]}).to_csv(inbox / "wrong-columns.csv", index=False)
    pd.DataFrame({"x0": ["a"], "x1": [0.2]}).to_csv(inbox / "string.csv", index=False)
    pd.DataFrame({"x0": [0.1, np.nan], "x1": [0.2, 0.3]}).to_csv(inbox / "nan.csv", index=False)
    (inbox / "empty.csv").write_text("x0,x1\n")
    in_distribution(2000, rows=50).to_csv(inbox / "good.csv", index=False)
    (inbox / "notes.txt").write_text("not a batch: left alone")
    proc = monitor(stack, inbox, MODEL, "--alpha", "0.01")
    assert proc.returncode == 0, describe(proc)
    reasons = {
        "garbage.parquet": "unreadable parquet file",
        "wrong-columns.csv": "missing feature column(s) ['x1']",
        "string.csv": "column(s) ['x0'] are not numeric",
        "nan.csv": "1 row(s) with NaN or infinite features, first at row 1",
        "empty.csv": "no rows",
    }
    for name, reason in reasons.items():
        (line,) = [line for line in proc.stdout.splitlines() if line.startswith(f"rejected {name}:")]
        assert reason in line and line.endswith(f"-> rejected/{name}"), line
        assert (inbox / "rejected" / name).is_file()
        assert reason in (inbox / "rejected" / f"{name}.reason.txt").read_text()
    # The batch number continues the model's count across the module's earlier monitor runs.
    assert "scored, 5 rejected" in proc.stdout, proc.stdout
    assert re.search(r"^batch \d+ good\.csv: 50 rows", proc.stdout, re.MULTILINE), proc.stdout
    assert sorted(p.name for p in inbox.iterdir()) == [".sngp-monitor", "notes.txt", "rejected", "scored"]
    assert [p.name for p in (inbox / "scored").iterdir()] == ["good.csv"]


def test_an_empty_inbox_records_nothing(stack, champion):
    inbox = stack["root"] / "empty-inbox"
    inbox.mkdir()
    (inbox / "README.txt").write_text("not a batch")
    before = steps(stack, monitor_run_id(stack))
    proc = monitor(stack, inbox)
    assert proc.returncode == 0 and f"sngp monitor: no new batch in {inbox}" in proc.stdout, describe(proc)
    assert steps(stack, monitor_run_id(stack)) == before


def test_a_missing_inbox_or_a_bad_alpha_is_one_line_and_exit_2(stack, champion):
    missing = stack["root"] / "no-such-inbox"
    proc = monitor(stack, missing)
    assert proc.returncode == 2, describe(proc)
    assert (
        proc.stderr
        == f"sngp monitor: error: inbox {missing} does not exist; create it (mkdir -p) or fix --inbox\n"
    )
    proc = monitor(stack, stack["root"], MODEL, "--alpha", "1.5")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--alpha" in proc.stderr, describe(proc)
    proc = monitor(stack, stack["root"], "models:/sngp-uncertainty-sngp@no-such-alias")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, describe(proc)
    assert "no-such-alias" in proc.stderr


def test_a_monitor_killed_mid_run_neither_skips_nor_double_counts(stack, champion):
    inbox = stack["root"] / "crash-inbox"
    inbox.mkdir()
    names = [f"part-{i}.csv" for i in range(6)]
    for i, name in enumerate(names):  # the later ones large (a second or more each): killed among them
        in_distribution(3000 + i, rows=200 if i == 0 else 100_000).to_csv(inbox / name, index=False)
        os.utime(inbox / name, (2e9 + i, 2e9 + i))
    before = recorded_steps(stack)
    cwd = stack["root"] / "client"
    proc = subprocess.Popen(
        [str(SNGP), "monitor", "--model", MODEL, "--inbox", str(inbox)], cwd=cwd, env=client_env(stack),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    seen = []
    for line in proc.stdout:  # Prefect's log line of the first finished batch, while the rest wait
        seen.append(line)
        if re.search(r"batch \d+ part-0\.csv", line):
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in inbox.glob("part-*.csv"))
    print(f"\n[monitor] killed after the first batch: {len(left)} of 6 files left in the inbox")
    assert "part-0.csv" not in left and left, "".join(seen)
    again = monitor(stack, inbox)
    assert again.returncode == 0, describe(again)
    after = steps(stack, monitor_run_id(stack))
    new = after[len(before) :]
    start = before[-1] if before else 0
    assert after[: len(before)] == before and new == list(range(start + 1, start + 7)), after
    claims = [json.loads((inbox / ".sngp-monitor" / "batches" / f"{n}.json").read_text()) for n in names]
    assert sorted(c["batch"] for c in claims) == new and {c["state"] for c in claims} == {"done"}
    assert sorted(p.name for p in (inbox / "scored").iterdir()) == names
    assert not list(inbox.glob("part-*.csv"))


def test_every_state_a_crash_leaves_is_finished_exactly_once(stack, champion):
    """The states a monitor killed between two steps leaves behind, made by hand from a finished batch:
    its file back in the inbox with the claim (a) done, (b) claimed after the metrics were recorded;
    and (c) another file under a scored name."""
    inbox = stack["root"] / "state-inbox"
    inbox.mkdir()
    batch = in_distribution(4000)
    batch.to_csv(inbox / "b.csv", index=False)
    first = monitor(stack, inbox)
    assert first.returncode == 0, describe(first)
    number = int(re.search(r"^batch (\d+) b\.csv", first.stdout, re.M).group(1))
    run_id = monitor_run_id(stack)
    claim_file = inbox / ".sngp-monitor" / "batches" / "b.csv.json"
    scored = (inbox / "scored" / "b.csv").read_bytes()

    # (a) died after marking the claim done, before removing the file: removed, not counted again.
    batch.to_csv(inbox / "b.csv", index=False)
    proc = monitor(stack, inbox)
    assert proc.returncode == 0 and f"batch {number} b.csv: already scored" in proc.stdout, describe(proc)
    assert not (inbox / "b.csv").exists()

    # (b) died after recording the metrics, before marking done: the same number, recorded once.
    batch.to_csv(inbox / "b.csv", index=False)
    claim = json.loads(claim_file.read_text())
    claim_file.write_text(json.dumps({**claim, "state": "claimed"}))
    (inbox / "scored" / "b.csv").unlink()
    proc = monitor(stack, inbox)
    assert proc.returncode == 0 and f"batch {number} b.csv: 200 rows" in proc.stdout, describe(proc)
    assert (inbox / "scored" / "b.csv").read_bytes() == scored
    assert json.loads(claim_file.read_text())["state"] == "done"
    assert steps(stack, run_id).count(number) == 1
    assert steps(stack, run_id, "abstain_rate").count(number) == 1

    # (c) a new file under a name already scored: rejected, nothing recorded.
    last = steps(stack, run_id)
    in_distribution(4001).to_csv(inbox / "b.csv", index=False)
    proc = monitor(stack, inbox)
    assert proc.returncode == 0, describe(proc)
    assert (
        f"rejected b.csv: a different file of this name was scored as batch {number}; rename it"
        in proc.stdout
    )
    assert steps(stack, run_id) == last
    shutil.rmtree(inbox)
