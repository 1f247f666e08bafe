"""Faults a client rides out or reports in one line (issue 16): a tracking or Prefect server away for a
while (`--server-grace`), away for good, or gone between carrying out a request and answering it, and a
full disk under the cache folder or the artefact store.

Real servers (tests/support/standalone_servers.py), real `sngp run` processes, real tmpfs mounts, a real
proxy that loses answers (tests/support/dropping_proxy.py); each test prints what it measured
(`pytest -s`): time to detect, time to recover, what the record holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zipfile
from pathlib import Path

import pytest
from support.cli import SMOKE, SngpProcess, describe, run_sngp, sngp_env
from support.dropping_proxy import dropping_proxy
from support.records import check_complete_record, client, prefect_completed, sqlite_uri
from support.standalone_servers import MlflowServer, PrefectServer, StandaloneServer, fill, running, tmpfs

from flows import cli
from flows.cli.faults import (
    MAX_SERVER_GRACE,
    mlflow_backoff_window,
    prefect_backoff_window,
    server_retry_settings,
)
from tasks.tracking import ORPHAN_TAG

METHOD = "deterministic"
SMOKE_ONE = ["run", "--config", str(SMOKE), "--set", f"methods=[{METHOD}]"]
PARENT_STARTED = r"MLflow parent run [0-9a-f]{32}"
# The server is killed once training is done: the run's next requests (recording the method) meet it gone,
# and every task finishes (and is cached) whatever happens to the record.
TRAINED = rf"Task run 'train-{METHOD}' - Finished in state"
PNG_END = b"IEND\xaeB`\x82"  # a PNG's last chunk
NOISE = ("Traceback", "Error logging to API", 'File "', "During handling of the above exception")


def one_error_line(proc) -> str:
    """The one `sngp run:` line of a failed run; no traceback or repeated API-logging errors around it."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sngp run:")]
    assert len(errors) == 1, f"expected one 'sngp run:' line\n{describe(proc)}"
    for noise in NOISE:
        assert noise not in proc.stderr, f"{noise!r} on stderr\n{describe(proc)}"
    assert proc.stderr.count("urllib3.connectionpool - Retrying") <= 1, describe(proc)
    return errors[0]


def check_reused(uri: str, first: SngpProcess, rerun: SngpProcess, stages: tuple[str, ...]) -> dict[str, str]:
    """The rerun took `stages` of the method from the cache -> its task states. Unless the code changed
    between the two runs: every task's cache key includes CODE_VERSION (a hash of the library and task
    code), and other people edit this checkout while tests run; then it only says so."""
    states = rerun.task_states()
    parent = re.search(PARENT_STARTED, first.stderr).group(0).split()[-1]
    versions = {client(uri).get_run(p).data.tags["code_version"] for p in (parent, rerun.parent_id)}
    if len(versions) > 1:
        print(f"\n(the code changed between the two runs, {sorted(versions)}: nothing to reuse)")
        return states
    for stage in stages:
        assert states[f"{stage}-{METHOD}"] == "Cached(type=COMPLETED)", states
    return states


def sngp(args: list[str], workdir: Path, **env: str) -> SngpProcess:
    return SngpProcess(args, workdir, sngp_env(workdir, **env))


# ---------------------------------------------------------------------------------------------------------
# --server-grace -> MLflow's and Prefect's own retry settings


def test_grace_becomes_the_clients_retry_settings():
    """Every grace gets an MLflow backoff window that covers it and overshoots by at most
    min(15, grace / 2) s (1 s: 2 s), within MLflow's limits; Prefect's window (2**(M+1) - 2 s of sleeps
    plus 1.5 s per refused attempt, fixed base) is the smallest that covers it."""
    for grace in range(1, MAX_SERVER_GRACE + 1):
        env = server_retry_settings(grace)
        retries, factor = (
            int(env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]),
            int(env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]),
        )
        assert 2 <= retries <= 10 and 1 <= factor <= 120, (grace, env)
        window = mlflow_backoff_window(retries, factor)
        assert grace <= window <= grace + max(1, min(15, grace / 2)), (grace, window)
        prefect = int(env["PREFECT_CLIENT_MAX_RETRIES"])
        assert prefect_backoff_window(prefect) >= grace, (grace, prefect)
        assert prefect == 1 or prefect_backoff_window(prefect - 1) < grace, (grace, prefect)
        assert env["PREFECT_CLIENT_RETRY_JITTER_FACTOR"] == "0"
        assert 15 <= int(env["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 60
    # the two graces the tests below use: 0+2+4+8+16 = 30 s and 0+2+...+32 = 62 s
    assert server_retry_settings(20)["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert server_retry_settings(60)["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "6"
    assert server_retry_settings(20)["PREFECT_CLIENT_MAX_RETRIES"] == "3"  # 2+4+8 + 4 x 1.5 = 20 s
    assert server_retry_settings(60)["PREFECT_CLIENT_MAX_RETRIES"] == "5"  # 62 + 6 x 1.5 = 71 s


@pytest.mark.parametrize("grace", ["0", "901", "-5", "abc"])
def test_bad_server_grace_is_one_line(grace, tmp_path, monkeypatch, capsys):
    from flows.cli import run as run_command

    for name in [n for n in os.environ if n.startswith(("MLFLOW_", "PREFECT_", "SNGP_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_command, "run_flow", lambda *_: pytest.fail("a bad --server-grace passed"))
    try:
        code = cli.main(["run", "--server-grace", grace])
    except SystemExit as exc:  # argparse: not an integer
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--server-grace" in err.splitlines()[-1] and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------
# The MLflow tracking server


def kill_and_restart(server: StandaloneServer, proc: SngpProcess) -> dict[str, float]:
    """Once `proc` has trained, SIGKILL `server` and start it again 2 s later; `proc` must then finish
    with exit 0 -> the seconds the server was `away`, its `restart` and from its return to the run's
    end (`after`)."""
    try:
        assert proc.wait_for(TRAINED, 300), describe(proc)
        server.kill()
        killed = time.monotonic()
        time.sleep(2)
        restart = server.start()
        back = time.monotonic()
        assert proc.wait(600) == 0, describe(proc)
    finally:
        proc.cleanup()
    return {"away": back - killed, "restart": restart, "after": time.monotonic() - back}


GONE_GRACE = 10  # --server-grace of the gone-for-good runs: short, as they wait it out in full


def kill_for_good(server: StandaloneServer, proc: SngpProcess, grace: int = GONE_GRACE) -> dict[str, float]:
    """Once `proc` has trained, SIGKILL `server` for good; `proc` must print its `sngp run:` line within
    grace + 60 s and exit 1 -> the seconds from the kill to that `line` and to its `exit`."""
    try:
        assert proc.wait_for(TRAINED, 300), describe(proc)
        server.kill()
        killed = time.monotonic()
        assert proc.wait_for(r"sngp run: ", grace + 60), describe(proc)
        line = time.monotonic() - killed
        code = proc.wait(300)
    finally:
        proc.cleanup()
    took = {"line": line, "exit": time.monotonic() - killed}
    assert code == 1, describe(proc)
    return took


def check_one_of_each(uri: str) -> None:
    """The smoke experiment holds one parent run and one run of METHOD (MLflow's searches leave deleted
    runs out), all FINISHED, and one logged model."""
    mlflow = client(uri)
    experiment_id = mlflow.get_experiment_by_name("sngp-smoke").experiment_id
    runs = mlflow.search_runs([experiment_id])
    assert sorted(r.info.run_name.split("-")[0] for r in runs) == [METHOD, "pipeline"], runs
    assert all(r.info.status == "FINISHED" for r in runs), runs
    assert len(logged_models_of(uri)) == 1, logged_models_of(uri)


def test_mlflow_server_killed_and_back_within_the_grace(tmp_path):
    """SIGKILL the tracking server once the method has trained (its record is being written), start it
    again: the run completes with one complete record (one parent, one child, one logged model: nothing
    lost or duplicated)."""
    server = MlflowServer(tmp_path / "mlflow")
    with running(server):
        proc = sngp([*SMOKE_ONE, "--tracking-uri", server.url, "--server-grace", "60"], tmp_path / "run")
        took = kill_and_restart(server, proc)
        check_complete_record(server.url, proc.parent_id, [METHOD])
        check_one_of_each(server.url)
    print(
        f"\nMLflow server away {took['away']:.1f} s (restart {took['restart']:.1f} s); the run finished "
        f"{took['after']:.1f} s after it was back, {proc.seconds:.1f} s in all; record complete"
    )


MLFLOW_API = "/api/2.0/mlflow/"
# Requests of a run's record that add something, each answered by nobody once it was carried out
ANSWER_LOST = {
    "create the parent run": lambda method, path, body: (
        path.startswith(f"{MLFLOW_API}runs/create") and b"mlflow.parentRunId" not in body
    ),
    "create the method's run": lambda method, path, body: (
        path.startswith(f"{MLFLOW_API}runs/create") and b"mlflow.parentRunId" in body
    ),
    "create the logged model": lambda method, path, body: (
        method == "POST" and path.split("?")[0] == f"{MLFLOW_API}logged-models"
    ),
    "link the model to its run": lambda method, path, body: path.startswith(f"{MLFLOW_API}runs/outputs"),
    "log the data sets": lambda method, path, body: path.startswith(f"{MLFLOW_API}runs/log-inputs"),
    "log metrics": lambda method, path, body: (
        path.startswith(f"{MLFLOW_API}runs/log-batch") and bool(json.loads(body or b"{}").get("metrics"))
    ),
}


# Requests whose answer is cut off after its headers (an upload's answer has no body to cut off)
ANSWER_CUT = {
    "read a run": lambda method, path, body: path.startswith(f"{MLFLOW_API}runs/get"),
    "search runs": lambda method, path, body: path.startswith(f"{MLFLOW_API}runs/search"),
    "create the method's run": ANSWER_LOST["create the method's run"],
    "create the logged model": ANSWER_LOST["create the logged model"],
    "log params": lambda method, path, body: (
        path.startswith(f"{MLFLOW_API}runs/log-batch") and bool(json.loads(body or b"{}").get("params"))
    ),
}


@pytest.mark.parametrize(
    ("fault", "lost", "cut"), [("never answered", ANSWER_LOST, {}), ("answer cut off", {}, ANSWER_CUT)]
)
def test_requests_carried_out_but_not_answered_create_nothing_twice(fault, lost, cut, tmp_path):
    """A server killed between carrying out a request and answering it, made deterministic: a proxy
    forwards each request of ANSWER_LOST to the real server, then closes the connection unanswered, and
    MLflow's client sends it again. Or it closes the connection after the answer's headers (ANSWER_CUT:
    a server killed while it answers), and tasks/mlflow_resend.py sends the request again. The run
    completes with one parent, one method run, one logged model, each metric logged once per step, and
    a complete record."""
    server = MlflowServer(tmp_path / "mlflow")
    with running(server), dropping_proxy(server.url, lost, cut=cut) as proxy:
        proc = run_sngp([*SMOKE_ONE, "--tracking-uri", proxy.url, "--server-grace", "60"], tmp_path / "run")
        assert proc.returncode == 0, describe(proc)
        assert sorted(proxy.dropped) == sorted({**lost, **cut}), proxy.dropped
        kids = check_complete_record(server.url, proc.parent_id, [METHOD])
        check_one_of_each(server.url)
        run_id = kids[METHOD].info.run_id
        for key in kids[METHOD].data.metrics:
            steps = [m.step for m in client(server.url).get_metric_history(run_id, key)]
            assert len(steps) == len(set(steps)), (key, steps)
    assert proc.stderr.count("was cut off") == len(cut), describe(proc)
    print(f"\n{fault}: {len(proxy.dropped)} requests, each sent again; one record ({proc.seconds:.1f} s)")


def test_a_registration_carried_out_but_never_answered_makes_one_version(tmp_path):
    """tasks.registry.register_once through the same proxy: the requests creating the registered model
    and its version are carried out and never answered, then retried by MLflow's client: one version."""
    import mlflow

    from tasks.registry import register_once

    server = MlflowServer(tmp_path / "mlflow")
    rules = {
        name: (lambda method, path, body, name=name: path.startswith(f"{MLFLOW_API}{name}/create"))
        for name in ("registered-models", "model-versions")
    }
    previous = mlflow.get_tracking_uri()
    with running(server), dropping_proxy(server.url, rules) as proxy:
        mlflow.set_tracking_uri(proxy.url)
        try:
            with mlflow.start_run() as run:
                model = mlflow.initialize_logged_model(name="model", source_run_id=run.info.run_id)
            version = register_once(model.model_uri, "sngp-test", run.info.run_id)
        finally:
            mlflow.set_tracking_uri(previous)
        assert proxy.dropped == list(rules), proxy.dropped
        versions = client(server.url).search_model_versions("name = 'sngp-test'")
        assert [(v.version, v.run_id) for v in versions] == [(version, run.info.run_id)], versions
        assert version == "1"


def test_mlflow_server_gone_for_good_is_one_line_then_the_rerun_completes(tmp_path):
    """Killed for good: `sngp run --server-grace 10` exits 1 within grace + 30 s with one line naming the
    server; with the server back, the rerun reuses every task and marks the orphaned parent FAILED."""
    server = MlflowServer(tmp_path / "mlflow")
    workdir = tmp_path / "run"
    with running(server):
        proc = sngp([*SMOKE_ONE, "--tracking-uri", server.url, "--server-grace", str(GONE_GRACE)], workdir)
        took = kill_for_good(server, proc)
        orphan = re.search(PARENT_STARTED, proc.stderr).group(0).split()[-1]
        assert took["exit"] <= GONE_GRACE + 30, f"exit {took['exit']:.1f} s after the kill\n{describe(proc)}"
        line = one_error_line(proc)
        assert line == (
            f"sngp run: error: the MLflow server at {server.url} stopped answering ({GONE_GRACE} s); "
            "finished tasks are cached: rerun when it is back"
        ), line

        server.start()
        assert client(server.url).get_run(orphan).info.status == "RUNNING"  # what the dead run left
        rerun = run_sngp([*SMOKE_ONE, "--tracking-uri", server.url], workdir)
        assert rerun.returncode == 0, describe(rerun)
        check_reused(server.url, proc, rerun, ("train", "evaluate", "plot"))
        check_complete_record(server.url, rerun.parent_id, [METHOD])
        left = client(server.url).get_run(orphan)
        assert left.info.status == "FAILED" and ORPHAN_TAG in left.data.tags, left
        assert not running_runs(server.url), running_runs(server.url)
    print(
        f"\nMLflow server gone: detected and exited {took['exit']:.1f} s after the kill (grace "
        f"{GONE_GRACE} s); rerun from the cache {rerun.seconds:.1f} s"
    )


# ---------------------------------------------------------------------------------------------------------
# The Prefect server (PREFECT_API_URL set)


def test_prefect_server_killed_and_back_within_the_grace(tmp_path):
    """The Prefect server SIGKILLed as the run starts its MLflow record, started again: the run completes;
    Prefect keeps the flow run and its task runs COMPLETED."""
    server = PrefectServer(tmp_path / "prefect")
    workdir = tmp_path / "run"
    with running(server):
        proc = sngp([*SMOKE_ONE, "--server-grace", "60"], workdir, prefect_api=server.api_url)
        took = kill_and_restart(server, proc)
        check_complete_record(sqlite_uri(workdir), proc.parent_id, [METHOD])
        flow_run_id = client(sqlite_uri(workdir)).get_run(proc.parent_id).data.tags["prefect.flow_run_id"]
        states = prefect_completed(server.api_url, flow_run_id, timeout=30)
    print(
        f"\nPrefect server away {took['away']:.1f} s (restart {took['restart']:.1f} s); the run finished "
        f"{took['after']:.1f} s after it was back; Prefect's record: {states}"
    )


def test_prefect_server_gone_for_good_is_one_line(tmp_path):
    """Killed for good: one line naming the Prefect server within grace + 30 s, exit 1, the MLflow runs
    FAILED (MLflow is still there)."""
    server = PrefectServer(tmp_path / "prefect")
    workdir = tmp_path / "run"
    with running(server):
        proc = sngp([*SMOKE_ONE, "--server-grace", str(GONE_GRACE)], workdir, prefect_api=server.api_url)
        took = kill_for_good(server, proc)
    assert took["line"] <= GONE_GRACE + 30, (
        f"error line {took['line']:.1f} s after the kill\n{describe(proc)}"
    )
    line = one_error_line(proc)
    assert line.startswith(
        f"sngp run: error: the Prefect server at {server.api_url} stopped answering ({GONE_GRACE} s)"
    )
    assert not running_runs(sqlite_uri(workdir)), running_runs(sqlite_uri(workdir))
    print(
        f"\nPrefect server gone: the line {took['line']:.1f} s after the kill (grace {GONE_GRACE} s), exit "
        f"after {took['exit']:.1f} s (Prefect's events worker gives up on each queued event for ~8 s first)"
    )


# ---------------------------------------------------------------------------------------------------------
# A full disk


def partial_files(root: Path) -> list[str]:
    """Files under `root` that a finished writer would not leave: temp files, and whatever does not read
    back whole (npz archives, PNGs, Prefect's result records, saved models against their manifest)."""
    bad = []
    for path in (p for p in root.rglob("*") if p.is_file() and p.name != "ballast"):
        name = path.name
        if name.startswith("."):  # the atomic writers' (ours and MLflow's) hidden temp files
            bad.append(f"{path}: temp file")
        elif name.endswith(".npz"):
            try:
                zipfile.ZipFile(path).testzip()
            except (zipfile.BadZipFile, OSError) as exc:
                bad.append(f"{path}: {exc}")
        elif name.endswith(".png") and not path.read_bytes().endswith(PNG_END):
            bad.append(f"{path}: truncated PNG")
        elif path.parent.name == "prefect-results":
            try:
                json.loads(path.read_bytes())
            except ValueError as exc:
                bad.append(f"{path}: {exc}")
    for manifest in root.rglob("manifest.json"):  # a saved model: every file whole
        for file, digest in json.loads(manifest.read_text()).items():
            found = manifest.parent / file
            if not found.is_file() or hashlib.sha256(found.read_bytes()).hexdigest() != digest:
                bad.append(f"{found}: missing or not what the manifest says")
    return bad


def partial_models(uri: str, store: Path) -> list[str]:
    """What a model cut short left in the local artefact store `store`: files of a logged model that is
    not READY (its files are the ones it had copied when the disk filled), and empty files."""
    ready = {m.model_id for m in logged_models_of(uri) if str(m.status).endswith("READY")}
    bad = [f"{p}: empty" for p in store.rglob("*") if p.is_file() and not p.stat().st_size]
    for model in store.glob("*/models/m-*"):
        files = [p for p in model.rglob("*") if p.is_file()]
        if files and model.name not in ready:
            bad.append(f"{model}: {len(files)} files of a model that is not READY")
    return bad


def logged_models_of(uri: str) -> list:
    import mlflow

    mlflow.set_tracking_uri(uri)
    ids = [e.experiment_id for e in client(uri).search_experiments()]
    return mlflow.search_logged_models(experiment_ids=ids, output_format="list")


def running_runs(uri: str) -> list[str]:
    mlflow = client(uri)
    ids = [e.experiment_id for e in mlflow.search_experiments()]
    runs = mlflow.search_runs(ids, filter_string="attributes.status = 'RUNNING'") if ids else []
    return [f"{r.info.run_name} {r.info.run_id}" for r in runs]


def test_full_cache_disk_is_one_line_and_leaves_no_partial_files(tmp_path):
    """The cache folder on a 20 MB tmpfs with ~300 KB left: one line naming a path in it and 'no space
    left', exit 1; nothing half-written; with the space back the next run completes, reusing what finished."""
    workdir = tmp_path / "run"
    cache = workdir / "cache"
    with tmpfs(cache, "20m"):
        ballast = fill(cache, 300_000)
        started = time.monotonic()
        proc = run_sngp(SMOKE_ONE, workdir, sngp_env(workdir, SNGP_CACHE_DIR=str(cache)))
        failed_after = time.monotonic() - started
        assert proc.returncode == 1, describe(proc)
        line = one_error_line(proc)
        assert line.startswith(f"sngp run: error: no space left on device for {cache}/"), line
        assert "MB free there" in line and "--cache-dir" in line, line
        assert not partial_files(cache), partial_files(cache)
        assert not running_runs(sqlite_uri(workdir)), running_runs(sqlite_uri(workdir))
        ballast.unlink()
        rerun = run_sngp(SMOKE_ONE, workdir, sngp_env(workdir, SNGP_CACHE_DIR=str(cache)))
        assert rerun.returncode == 0, describe(rerun)
        check_complete_record(sqlite_uri(workdir), rerun.parent_id, [METHOD])
        states = check_reused(sqlite_uri(workdir), proc, rerun, ("train", "evaluate"))
        assert not partial_files(cache)
    print(
        f"\nfull cache disk: run failed after {failed_after:.1f} s with: {line}\n"
        f"rerun with space {rerun.seconds:.1f} s, tasks {states}"
    )


def test_full_artifact_store_is_one_line_and_leaves_no_partial_files(tmp_path):
    """The local MLflow artefact store (./mlartifacts beside ./mlflow.db) on a tmpfs with ~100 KB left:
    one line naming a path in it, exit 1, every run FAILED, no temp file or cut-off PNG; the model cut
    short (MLflow's log_model copies file by file) is marked FAILED and its files are gone; with the
    space back the next run completes from the cache."""
    workdir = tmp_path / "run"
    store = workdir / "mlartifacts"
    with tmpfs(store, "20m"):
        ballast = fill(store, 100_000)
        proc = run_sngp(SMOKE_ONE, workdir)
        assert proc.returncode == 1, describe(proc)
        line = one_error_line(proc)
        assert line.startswith(f"sngp run: error: no space left on device for {store}/"), line
        assert "MLflow artefact store" in line, line
        assert not running_runs(sqlite_uri(workdir)), running_runs(sqlite_uri(workdir))
        assert not partial_files(store), partial_files(store)
        statuses = {m.model_id: str(m.status) for m in logged_models_of(sqlite_uri(workdir))}
        assert statuses and all(s.endswith("FAILED") for s in statuses.values()), statuses
        assert not partial_models(sqlite_uri(workdir), store), partial_models(sqlite_uri(workdir), store)
        ballast.unlink()
        rerun = run_sngp(SMOKE_ONE, workdir)
        assert rerun.returncode == 0, describe(rerun)
        check_complete_record(sqlite_uri(workdir), rerun.parent_id, [METHOD])
        check_reused(sqlite_uri(workdir), proc, rerun, ("train", "evaluate", "plot"))
        assert not partial_models(sqlite_uri(workdir), store), partial_models(sqlite_uri(workdir), store)
    print(f"\nfull artefact store: {line}\nrerun with space {rerun.seconds:.1f} s, all tasks cached")
