"""Crash and resume: killed runs are reported, finished work is reused, damaged models are never trusted.

- Library: a model directory that is incomplete or damaged (no manifest, truncated payload, edited
  model.json, missing payload) is refused by sngp_models.load_model with a ValueError; four processes
  saving to one path at once all succeed and leave one complete model.
- Locks: a task lock whose process was killed is released; a live holder's is not.
- Pipeline, SIGKILL mid-training (conftest.interrupted_runs): the runs left RUNNING are marked FAILED by
  the next start (tag `sngp.failure`), which reuses the training that finished before the kill (Cached,
  MLflow tag cached.train == "true") and retrains only what was missing.
- Pipeline, a cached result whose model directory is damaged: retrained, not loaded.
- SIGINT / SIGTERM stop `sngp run` within seconds (training threads stop at the next epoch) and the
  MLflow runs end KILLED.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.cli import REPO, run_sngp, sngp_env
from support.records import ALL_METHODS, all_runs, check_complete_record, client, running, sqlite_uri

from tasks.tracking import ORPHAN_TAG

from .conftest import CRASH_ARGS

STOP_WITHIN = 20.0  # seconds from SIGINT/SIGTERM to exit, on a loaded 2-core machine (measured: ~5 s)


def _payload(folder: Path) -> Path:
    return max((p for p in folder.iterdir() if p.suffix != ".json"), key=lambda p: p.stat().st_size)


DAMAGE = {
    "no-manifest": (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    "truncated-payload": (
        lambda d: os.truncate(_payload(d), _payload(d).stat().st_size // 2),
        "checksum mismatch",
    ),
    "edited-model-json": (
        lambda d: (d / "model.json").write_text((d / "model.json").read_text() + " "),
        "checksum mismatch",
    ),
    "missing-payload": (lambda d: _payload(d).unlink(), "unreadable saved model"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("method", ALL_METHODS)
def test_damaged_model_dir_is_refused(method, damage, smoke_run, tmp_path):
    import sngp_models

    folder = tmp_path / "model"
    shutil.copytree(smoke_run.cache_file("models", method), folder)
    sngp_models.load_model(folder)  # intact: loads
    apply, words = DAMAGE[damage]
    apply(folder)
    with pytest.raises(ValueError) as caught:
        sngp_models.load_model(folder)
    assert words in str(caught.value) and str(folder) in str(caught.value), str(caught.value)


WRITER = """
import sys
import numpy as np
from sngp_models.interface import write_model_dir
errors = 0
for i in range(int(sys.argv[2])):
    try:
        write_model_dir(sys.argv[1], {"method": "probe", "writer": sys.argv[3]},
                        lambda d: np.save(d / "w.npy", np.arange(20000)))
    except Exception as exc:
        errors += 1
        print("ERROR", type(exc).__name__, exc, flush=True)
print("ERRORS", errors)
"""


def test_concurrent_saves_to_one_path(tmp_path):
    from sngp_models.interface import read_model_dir

    target = tmp_path / "models" / "same-key"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), "25", str(i)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert all("ERRORS 0" in out for out in outputs), outputs
    assert read_model_dir(target)["method"] == "probe"
    assert sorted(p.name for p in target.parent.iterdir()) == ["same-key"], "temporary or old copies left"


def test_lock_of_killed_process_is_released(tmp_path):
    from tasks.cache import HOST, ProcessLockManager, process_start_time

    locks = ProcessLockManager(tmp_path / "locks")
    holder = subprocess.Popen(["sleep", "120"])
    try:
        (tmp_path / "locks").mkdir()
        info = {
            "holder": "other",
            "expiration": None,
            "host": HOST,
            "pid": holder.pid,
            "started": process_start_time(holder.pid),
        }
        (tmp_path / "locks" / "k.lock").write_text(json.dumps(info))
        assert locks.is_locked("k")
        assert not locks.acquire_lock("k", "me", acquire_timeout=0.5)  # a live holder keeps its lock
    finally:
        holder.kill()
        holder.wait()
    assert not locks.is_locked("k")  # its process is gone: so is the lock
    assert locks.acquire_lock("k", "me", acquire_timeout=5)
    assert locks.is_lock_holder("k", "me")
    locks.release_lock("k", "me")
    assert not (tmp_path / "locks" / "k.lock").exists()
    # Another host's lock is honoured until it expires.
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    (tmp_path / "locks" / "r.lock").write_text(
        json.dumps({"holder": "x", "expiration": future, "host": "elsewhere", "pid": 1})
    )
    assert locks.is_locked("r")
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    (tmp_path / "locks" / "r.lock").write_text(
        json.dumps({"holder": "x", "expiration": past, "host": "elsewhere", "pid": 1})
    )
    assert not locks.is_locked("r")


# ---------------------------------------------------------------------------------------------------------
# SIGKILL, then the same command again


def test_sigkill_leaves_runs_running(interrupted_runs):
    killed = interrupted_runs["SIGKILL"]
    assert killed.proc.returncode == -signal.SIGKILL
    statuses = killed.before_kill["runs"]
    assert any(name.startswith("pipeline-") and status == "RUNNING" for name, status in statuses.values()), (
        statuses
    )
    # It held the deterministic training's lock when it died: the next start must not wait for it forever.
    assert killed.before_kill["locks"], "no task lock was held at the kill"


def test_resume_marks_killed_runs_failed_and_reuses_finished_work(interrupted_runs, resumed_run):
    killed = interrupted_runs["SIGKILL"]
    c = client(resumed_run.uri)
    left_running = [
        run_id for run_id, (_, status) in killed.before_kill["runs"].items() if status == "RUNNING"
    ]
    for run_id in left_running:
        run = c.get_run(run_id)
        assert run.info.status == "FAILED", (run.info.run_name, run.info.status)
        assert "killed" in run.data.tags.get(ORPHAN_TAG, ""), run.data.tags
    assert f"marked {len(left_running)} MLflow run(s) FAILED" in resumed_run.proc.stderr, (
        resumed_run.proc.stderr[-3000:]
    )
    assert running(c) == []

    kids = check_complete_record(
        resumed_run.uri, resumed_run.parent_id, methods=("exact_gp", "deterministic")
    )
    assert kids["exact_gp"].data.tags["cached.train"] == "true"  # finished before the kill: reused
    assert kids["deterministic"].data.tags["cached.train"] == "false"  # interrupted: trained again
    states = resumed_run.proc.task_states()
    assert states["train-exact_gp"] == "Cached(type=COMPLETED)", states
    assert states["train-deterministic"] == "Completed()", states
    assert "deterministic epoch 600/600" in resumed_run.proc.stderr


def test_damaged_cached_model_is_retrained(stack, resumed_run):
    import sngp_models

    model_dir = resumed_run.cache_file("models", "exact_gp")
    payload = _payload(model_dir)
    os.truncate(payload, payload.stat().st_size // 2)  # as if the process died while writing it
    args = [a if not a.startswith("methods=") else "methods=[exact_gp]" for a in CRASH_ARGS]
    proc = run_sngp(args, resumed_run.workdir, sngp_env(resumed_run.workdir, stack.prefect_api_url))
    assert proc.returncode == 0, proc.describe()
    assert "checksum mismatch" in proc.stderr and "training again" in proc.stderr, proc.stderr[-3000:]
    kids = check_complete_record(resumed_run.uri, proc.parent_id, methods=("exact_gp",))
    assert kids["exact_gp"].data.tags["cached.train"] == "false"
    assert proc.task_states()["train-exact_gp"] == "Completed()"
    sngp_models.load_model(model_dir)  # whole again
    # Same data, same seed: the retrained model predicts what the first one did.
    first = client(resumed_run.uri).get_run(resumed_run.kids()["exact_gp"].info.run_id).data.metrics
    again = kids["exact_gp"].data.metrics
    assert (
        abs(first["test_accuracy"] - again["test_accuracy"]) < 1e-9
        and abs(first["nll"] - again["nll"]) < 1e-6
    )


# ---------------------------------------------------------------------------------------------------------
# SIGINT and SIGTERM


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_interrupt_stops_within_seconds_and_marks_runs_killed(name, interrupted_runs):
    run = interrupted_runs[name]
    assert run.stop_seconds < STOP_WITHIN, f"{name}: {run.stop_seconds:.1f} s to stop\n{run.proc.describe()}"
    assert run.proc.returncode == (130 if name == "SIGINT" else 128 + signal.SIGTERM), run.proc.describe()
    assert "interrupted at epoch" in run.proc.stderr, "training ran on after the signal"
    if name == "SIGINT":
        assert "sngp run: interrupted" in run.proc.stderr
    c = client(sqlite_uri(run.workdir))
    assert running(c) == []
    parents = [r for r in all_runs(c) if r.info.run_name.startswith("pipeline-")]
    assert [p.info.status for p in parents] == ["KILLED"], [(p.info.run_name, p.info.status) for p in parents]


def test_no_process_left_behind(interrupted_runs):
    deadline = time.monotonic() + 10
    pids = [r.proc.proc.pid for r in interrupted_runs.values()]
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.killpg(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        time.sleep(0.2)
    pytest.fail(f"process groups still alive: {alive}")
