"""Shared helpers for the end-to-end tests: run the real `sngp` CLI, read results back through MLflow.

Nothing is mocked: `sngp` runs as a subprocess in Prefect local mode (temporary server) with its own
PREFECT_HOME, MLflow SQLite store and cache folder under a pytest tmp dir.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sngp_models.evaluation import METRIC_NAMES

REPO = Path(__file__).resolve().parent.parent
SNGP = Path(sys.executable).parent / "sngp"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Every metric a two-moons run records for each method (DESIGN.md; the library's one list).
METRICS = METRIC_NAMES
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # quiet downloads under pytest -s


def sngp_env(workdir: Path, **extra: str) -> dict[str, str]:
    """Environment for one isolated `sngp` invocation rooted at `workdir`."""
    env = dict(os.environ)
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_PROFILE"):
        env.pop(name, None)  # local mode + the default sqlite:///mlflow.db in the cwd
    env.update(
        PREFECT_HOME=str(workdir / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        SNGP_CACHE_DIR=str(workdir / ".sngp_cache"),
        PREFECT_LOGGING_LEVEL="INFO",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    env.update(extra)
    return env


def clean_server_env(**extra: str) -> dict[str, str]:
    """The developer's environment without server URLs, caches or database settings; analytics off: for
    processes that talk to servers a test started (sngp serve, workers, clients)."""
    drop = {
        "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "SNGP_DB_URL", "SNGP_PREFECT_DB_URL", "PREFECT_HOME",
        "PREFECT_PROFILE", "SNGP_CACHE_DIR", "SNGP_RETRAIN_CRON", "SNGP_PROJECT_DIR",
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        COLUMNS="200",
        **extra,
    )
    return env


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of live processes whose environment has NAME=VALUE (Linux /proc; [] elsewhere)."""
    wanted = f"{name}={value}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in pids if pid != os.getpid()]


def run_sngp(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `sngp ARGS` in `cwd`. The result carries `.seconds` (wall time) and `.leaked`: pids of
    processes still alive with this run's PREFECT_HOME after it exited (e.g. an orphaned temporary
    Prefect server), which are then terminated so they do not outlive the test.

    Output goes to files, not pipes, so a leaked grandchild cannot keep the call waiting."""
    env = env if env is not None else sngp_env(cwd)
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([str(SNGP), *args], cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(child.args, child.returncode, out.read(), err.read())
    proc.seconds = seconds
    proc.leaked = []
    if "PREFECT_HOME" in env:
        deadline = time.monotonic() + 10  # a server being stopped may need a moment to exit
        home = env["PREFECT_HOME"]
        while (leaked := processes_with_env("PREFECT_HOME", home)) and time.monotonic() < deadline:
            time.sleep(0.5)
        proc.leaked = leaked
        for pid in leaked:  # started by this test's sngp: end them by pid
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
    return proc


def describe(proc: subprocess.CompletedProcess) -> str:
    """Exit code and output tails, for assertion messages."""
    return (
        f"exit {proc.returncode} after {getattr(proc, 'seconds', 0):.1f} s\n"
        f"leaked processes: {getattr(proc, 'leaked', [])}\n"
        f"--- stdout (tail) ---\n{proc.stdout[-3000:]}\n--- stderr (tail) ---\n{proc.stderr[-5000:]}"
    )


class MlflowReader:
    """Read a tracking store the way a user would: through MlflowClient, never the artefact folder."""

    def __init__(self, tracking_uri: str, download_dir: Path):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.download_dir = download_dir

    def experiment_ids(self) -> list[str]:
        return [e.experiment_id for e in self.client.search_experiments()]

    def runs(self, experiment: str | None = None) -> list:
        if experiment is None:
            ids = self.experiment_ids()
        else:
            found = self.client.get_experiment_by_name(experiment)
            ids = [found.experiment_id] if found else []
        return self.client.search_runs(ids, max_results=10_000) if ids else []

    def parents(self, experiment: str | None = None) -> list:
        return [r for r in self.runs(experiment) if "mlflow.parentRunId" not in r.data.tags]

    def children(self, parent_run_id: str) -> dict[str, object]:
        """Nested runs of one parent, by run name (= method)."""
        parent = self.client.get_run(parent_run_id)
        runs = self.client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
            max_results=1000,
        )
        return {r.info.run_name: r for r in runs}

    def running(self) -> list:
        return [r for r in self.runs() if r.info.status == "RUNNING"]

    def artifact_paths(self, run_id: str, folder: str | None = None) -> list[str]:
        return [a.path for a in self.client.list_artifacts(run_id, folder)]

    def download(self, run_id: str, path: str) -> bytes:
        dst = self.download_dir / run_id
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dst))).read_bytes()

    def history(self, run_id: str, metric: str) -> list:
        return sorted(self.client.get_metric_history(run_id, metric), key=lambda m: m.step)

    def logged_models(self, run_id: str) -> list:
        import mlflow

        run = self.client.get_run(run_id)
        mlflow.set_tracking_uri(self.uri)
        return mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run_id}'",
            output_format="list",
        )


@pytest.fixture(scope="module")
def mlflow_reader(tmp_path_factory):
    """`mlflow_reader(workdir)`: a reader for the default store `sngp` creates there (sqlite:///mlflow.db)."""
    downloads = tmp_path_factory.mktemp("mlflow-downloads")

    def make(workdir: Path) -> MlflowReader:
        db = workdir / "mlflow.db"
        assert db.is_file(), f"no MLflow store at {db}"
        return MlflowReader(f"sqlite:///{db}", downloads)

    return make
