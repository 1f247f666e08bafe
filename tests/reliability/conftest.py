"""Fixtures of the reliability battery. The expensive things happen once per session and are shared:

- `stack`: the servers `sngp serve` starts (flows.ops.stack.Services, no worker: Prefect + MLflow on
  127.0.0.1, SQLite), started in a background thread as soon as the session begins (support.stack);
- `smoke_run`: one `sngp run` of the smoke config with all five methods (fresh cache, local SQLite store);
- `concurrent_sqlite`: four identical smoke runs at once against the MLflow server, sharing one cache;
- `pyfunc_report`: a fresh process that loads every logged model, compares its predictions with what
  the pipeline saved, feeds bad inputs and predicts 10 million rows (peak RSS measured);
- `crash_runs` / `interrupted_runs`: `sngp run`s killed with SIGKILL, SIGINT and SIGTERM mid-training.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.cli import SMOKE, SngpProcess, run_sngp, sngp_env
from support.records import ALL_METHODS, all_runs, children, client, logged_models, sqlite_uri
from support.stack import BackgroundServices

SMOKE_ALL = ["run", "--config", str(SMOKE), "--set", f"methods=[{','.join(ALL_METHODS)}]"]
HERE = Path(__file__).resolve().parent
PASSWORD = "Pa55-w0rd-never-shown"  # used in one concurrent run's tracking URI; must never be printed/logged
BIG_ROWS = 10_000_000


# ---------------------------------------------------------------------------------------------------------
# The served stack


@pytest.fixture(scope="session", autouse=True)
def _stack_starter(tmp_path_factory):
    stack = BackgroundServices(tmp_path_factory.mktemp("stack"), worker=False, timeout=400)
    yield stack
    stack.close()


@pytest.fixture(scope="session")
def stack(_stack_starter):
    """The running Services: .prefect_api_url, .mlflow_url, .log_dir, .children (the server processes)."""
    return _stack_starter.wait()


# ---------------------------------------------------------------------------------------------------------
# Runs shared by several test modules


@dataclass
class Run:
    proc: SngpProcess
    workdir: Path
    uri: str
    cache: Path
    extra: dict = field(default_factory=dict)

    @property
    def parent_id(self) -> str:
        return self.proc.parent_id

    def kids(self) -> dict:
        return children(client(self.uri), self.parent_id)

    def cache_file(self, kind: str, method: str, suffix: str = "") -> Path:
        found = sorted((self.cache / kind).glob(f"{method}-*{suffix}"))
        assert len(found) == 1, f"expected one {kind} entry for {method} in {self.cache}, found {found}"
        return found[0]

    def data_file(self) -> Path:
        found = sorted((self.cache / "data").glob("*.npz"))
        assert len(found) == 1, found
        return found[0]


def wait_all(procs: list[SngpProcess], timeout: float) -> None:
    """Wait for every process to end (each within `timeout` s); none is left running, even on failure."""
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            proc.cleanup()


@pytest.fixture(scope="session")
def smoke_run(stack, tmp_path_factory) -> Run:
    """The smoke config with all five methods, a fresh cache and the default local SQLite store."""
    workdir = tmp_path_factory.mktemp("smoke")
    proc = run_sngp(SMOKE_ALL, workdir, sngp_env(workdir, stack.prefect_api_url))
    print(f"\n[reliability] smoke run (5 methods): {proc.seconds:.1f} s")
    assert proc.returncode == 0, proc.describe()
    return Run(proc, workdir, sqlite_uri(workdir), workdir / ".sngp_cache")


@pytest.fixture(scope="session")
def concurrent_sqlite(stack, tmp_path_factory) -> list[Run]:
    """Four identical smoke runs (all five methods) at once against the served MLflow (SQLite), sharing one
    fresh cache folder, each with its own PREFECT_HOME. Run 0 names the server by a URI with a password."""
    root = tmp_path_factory.mktemp("concurrent-sqlite")
    cache = root / "shared-cache"
    authed = stack.mlflow_url.replace("http://", f"http://alice:{PASSWORD}@")
    procs = []
    for i in range(4):
        workdir = root / f"run{i}"
        args = SMOKE_ALL + (["--tracking-uri", authed] if i == 0 else [])
        extra = {"SNGP_CACHE_DIR": str(cache)}
        if i != 0:
            extra["MLFLOW_TRACKING_URI"] = stack.mlflow_url
        procs.append(SngpProcess(args, workdir, sngp_env(workdir, stack.prefect_api_url, **extra)))
    started = time.monotonic()
    wait_all(procs, timeout=1200)
    print(
        f"\n[reliability] 4 concurrent smoke runs (MLflow server, SQLite): {time.monotonic() - started:.1f} s"
    )
    for proc in procs:
        assert proc.returncode == 0, proc.describe()
    return [Run(p, p.cwd, stack.mlflow_url, cache) for p in procs]


@pytest.fixture(scope="session")
def pyfunc_report(smoke_run) -> dict:
    """tests/reliability/probe_pyfunc.py in a fresh process, on the smoke run's logged models."""
    c = client(smoke_run.uri)
    kids = children(c, smoke_run.parent_id)
    models = {m: f"models:/{logged_models(smoke_run.uri, kids[m])[0].model_id}" for m in ALL_METHODS}
    spec = {
        "tracking_uri": smoke_run.uri,
        "models": models,
        "data_path": str(smoke_run.data_file()),
        "predictions": {m: str(smoke_run.cache_file("predictions", m, ".npz")) for m in ALL_METHODS},
        "bad_input_model": "deterministic",
        "big_rows": BIG_ROWS,
    }
    env = sngp_env(smoke_run.workdir, None)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(HERE / "probe_pyfunc.py"), json.dumps(spec)],
        cwd=smoke_run.workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(line.removeprefix("REPORT "))
    report["stderr"] = proc.stderr
    print(
        f"\n[reliability] fresh-process pyfunc probe: {time.monotonic() - started:.1f} s; "
        f"{BIG_ROWS:,} rows in {report['big']['seconds']:.1f} s, peak RSS growth "
        f"{(report['big']['peak'] - report['big']['rss_before']) / 1e6:.0f} MB"
    )
    return report


# ---------------------------------------------------------------------------------------------------------
# Killed runs: SIGKILL (then resumed), SIGINT, SIGTERM, all started together


# exact_gp (scikit-learn, ~1 s) finishes long before the deterministic net's 600 epochs; seed 1 also makes
# this the "different seed" run of the reproducibility checks.
CRASH_ARGS = [
    "run",
    "--config",
    str(SMOKE),
    "--set",
    "methods=[exact_gp,deterministic]",
    "--set",
    "training.epochs=600",
    "--set",
    "seed=1",
]
# Never finishes on its own: the signal always lands mid-training.
ENDLESS_ARGS = [
    "run",
    "--config",
    str(SMOKE),
    "--set",
    "methods=[deterministic]",
    "--set",
    "training.epochs=100000",
]
EPOCH_LINE = r"deterministic epoch \d+/"


@dataclass
class Interrupted:
    proc: SngpProcess
    workdir: Path
    signal_name: str
    stop_seconds: float | None = None  # from the signal to the process's exit
    before_kill: dict = field(default_factory=dict)


def _signal_when_training(run: Interrupted, sig: int, ready_pattern: list[str], timeout: float = 400) -> None:
    for pattern in ready_pattern:
        assert run.proc.wait_for(pattern, timeout), f"never saw {pattern!r}\n{run.proc.describe()}"
    assert run.proc.returncode is None, f"ended before the signal\n{run.proc.describe()}"
    sent = time.monotonic()
    if sig == signal.SIGKILL:
        run.before_kill = {
            "locks": sorted(p.name for p in (run.workdir / ".sngp_cache" / "prefect-locks").glob("*"))
        }
        run.proc.kill_group()
    else:
        run.proc.send(sig)
    try:
        run.proc.proc.wait(timeout=120)
    finally:
        run.proc.cleanup()
    run.stop_seconds = time.monotonic() - sent
    run.proc.wait()
    if sig == signal.SIGKILL:  # what a later start finds
        found = all_runs(client(sqlite_uri(run.workdir)))
        run.before_kill["runs"] = {r.info.run_id: (r.info.run_name, r.info.status) for r in found}


@pytest.fixture(scope="session")
def interrupted_runs(stack, tmp_path_factory) -> dict[str, Interrupted]:
    """Three runs started together; each gets its signal once it is training (SIGKILL: once exact_gp has
    finished and the deterministic net is mid-training)."""
    root = tmp_path_factory.mktemp("interrupted")
    plans = {
        "SIGKILL": (signal.SIGKILL, CRASH_ARGS, [r"exact_gp trained in", EPOCH_LINE]),
        "SIGINT": (signal.SIGINT, ENDLESS_ARGS, [EPOCH_LINE]),
        "SIGTERM": (signal.SIGTERM, ENDLESS_ARGS, [EPOCH_LINE]),
    }
    runs = {}
    for name, (_, args, _) in plans.items():
        workdir = root / name.lower()
        runs[name] = Interrupted(
            SngpProcess(args, workdir, sngp_env(workdir, stack.prefect_api_url)), workdir, name
        )
    errors = []

    def guarded(thread_target, *args):
        try:
            thread_target(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [
        threading.Thread(target=guarded, args=(_signal_when_training, runs[name], sig, patterns))
        for name, (sig, _, patterns) in plans.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for run in runs.values():
        run.proc.cleanup()
    if errors:
        raise errors[0]
    for run in runs.values():
        print(
            f"\n[reliability] {run.signal_name}: process gone {run.stop_seconds:.1f} s after the signal "
            f"(exit {run.proc.returncode})"
        )
    return runs


@pytest.fixture(scope="session")
def resumed_run(stack, interrupted_runs) -> Run:
    """The SIGKILLed run's command again, same working directory and cache."""
    killed = interrupted_runs["SIGKILL"]
    proc = run_sngp(CRASH_ARGS, killed.workdir, sngp_env(killed.workdir, stack.prefect_api_url))
    print(f"\n[reliability] resumed run after SIGKILL: {proc.seconds:.1f} s")
    assert proc.returncode == 0, proc.describe()
    return Run(proc, killed.workdir, sqlite_uri(killed.workdir), killed.workdir / ".sngp_cache")
