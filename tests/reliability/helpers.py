"""Machinery shared by the reliability battery: `sngp` subprocesses watched line by line (so a test can
signal one in the middle of training), isolated environments, and reading records back through MLflow.

Every `sngp run` of the battery talks to one served Prefect server (conftest.stack): ~3 s of Prefect per
process instead of ~10 s for a temporary server, and no orphaned temporary server when a test SIGKILLs
a run. Each run still has its own PREFECT_HOME, cache folder and (unless a test says otherwise) MLflow
SQLite store in its own working directory.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import METRICS

REPO = Path(__file__).resolve().parents[2]
SNGP = Path(sys.executable).parent / "sngp"
SMOKE = REPO / "conf" / "smoke.yaml"
ALL_METHODS = ("deterministic", "sngp", "mc_dropout", "deep_ensemble", "exact_gp")
SMOKE_ALL = ["run", "--config", str(SMOKE), "--set", f"methods=[{','.join(ALL_METHODS)}]"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PARENT_ID = re.compile(r"MLflow parent run: ([0-9a-f]{32})")
TASK_STATE = re.compile(r"Task run '([\w.-]+)' - Finished in state (\S+)")


def sngp_env(workdir: Path, prefect_api: str | None, **extra: str) -> dict[str, str]:
    """Environment of one isolated `sngp` process rooted at `workdir` (its own PREFECT_HOME and cache)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "SNGP_"))
    }  # nothing from the developer's shell
    env.update(
        PREFECT_HOME=str(workdir / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        DO_NOT_TRACK="1",
        SNGP_CACHE_DIR=str(workdir / "cache"),
        TF_CPP_MIN_LOG_LEVEL="2",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
        PYTHONUNBUFFERED="1",
    )
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    env.update(extra)
    return env


class SngpProcess:
    """`sngp ARGS` started in `cwd`, stdout and stderr collected line by line as they come."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]):
        cwd.mkdir(parents=True, exist_ok=True)
        self.args, self.cwd = args, cwd
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(SNGP), *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own group: we may kill it all
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(s, b), daemon=True)
            for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()
        self.seconds: float | None = None

    @staticmethod
    def _read(stream, buffer: list[str]) -> None:
        for line in stream:
            buffer.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match | None:
        """The first match of `pattern` in the output (stderr, where Prefect logs, then stdout), waiting
        for it; None if the process ends or `timeout` passes first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = regex.search(self.stderr) or regex.search(self.stdout)
            if found:
                return found
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the readers drain
                return regex.search(self.stderr) or regex.search(self.stdout)
            time.sleep(0.1)
        return None

    def send(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill_group(self) -> None:
        """SIGKILL the process and everything it started (its own process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = 900) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            self.proc.wait()
            raise AssertionError(
                f"sngp {' '.join(self.args)} still running after {timeout:.0f} s\n" + self.describe()
            ) from None
        for reader in self._readers:
            reader.join(timeout=10)
        if self.seconds is None:
            self.seconds = time.monotonic() - self.started
        return self.proc.returncode

    def describe(self) -> str:
        return (
            f"exit {self.proc.returncode} after {time.monotonic() - self.started:.1f} s: sngp "
            f"{' '.join(self.args)}\n--- stdout (tail) ---\n{self.stdout[-3000:]}\n"
            f"--- stderr (tail) ---\n{self.stderr[-6000:]}"
        )

    @property
    def parent_id(self) -> str:
        found = PARENT_ID.search(self.stdout)
        assert found, f"no parent run id in stdout\n{self.describe()}"
        return found.group(1)

    def task_states(self) -> dict[str, str]:
        return dict(TASK_STATE.findall(self.stderr + self.stdout))

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.kill_group()
            self.proc.wait()


def run_sngp(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> SngpProcess:
    proc = SngpProcess(args, cwd, env)
    proc.wait(timeout)
    return proc


# ---------------------------------------------------------------------------------------------------------
# Reading records back through MLflow


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def sqlite_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def children(mlflow_client, parent_id: str) -> dict:
    parent = mlflow_client.get_run(parent_id)
    runs = mlflow_client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100
    )
    return {r.info.run_name: r for r in runs}


def all_runs(mlflow_client) -> list:
    ids = [e.experiment_id for e in mlflow_client.search_experiments()]
    return mlflow_client.search_runs(ids, max_results=5000) if ids else []


def running(mlflow_client) -> list[str]:
    return [
        f"{r.info.run_name} ({r.info.run_id})" for r in all_runs(mlflow_client) if r.info.status == "RUNNING"
    ]


def logged_models(uri: str, run) -> list:
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        output_format="list",
    )


def check_complete_record(uri: str, parent_id: str, methods=ALL_METHODS, download_pngs: bool = False) -> dict:
    """A FINISHED parent with config.yaml and comparison.png, and per method a FINISHED child with every
    metric (finite), both surface PNGs and one logged pyfunc model. Returns the children by method."""
    c = client(uri)
    parent = c.get_run(parent_id)
    assert parent.info.status == "FINISHED", (parent_id, parent.info.status)
    parent_files = {a.path for a in c.list_artifacts(parent_id)} | {
        a.path for a in c.list_artifacts(parent_id, "plots")
    }
    assert {"config.yaml", "plots/comparison.png"} <= parent_files, parent_files
    kids = children(c, parent_id)
    assert sorted(kids) == sorted(methods), f"child runs of {parent_id}: {sorted(kids)}"
    for method, run in kids.items():
        assert run.info.status == "FINISHED", (method, run.info.status)
        missing = set(METRICS) - set(run.data.metrics)
        assert not missing, f"{method}: missing metrics {sorted(missing)}"
        assert all(math.isfinite(v) for v in run.data.metrics.values()), (method, run.data.metrics)
        plots = {a.path: a.file_size for a in c.list_artifacts(run.info.run_id, "plots")}
        for png in ("plots/class_probability.png", "plots/uncertainty.png"):
            assert plots.get(png, 0) > 1000, (method, png, plots)
        if download_pngs:
            local = c.download_artifacts(run.info.run_id, "plots/uncertainty.png")
            assert Path(local).read_bytes().startswith(PNG_MAGIC), (method, local)
        models = logged_models(uri, run)
        assert len(models) == 1, (method, models)
        for tag in ("cached.train", "cached.evaluate", "cached.plot"):
            assert run.data.tags.get(tag) in ("true", "false"), (method, tag, run.data.tags)
    return kids


def comparable_metrics(kids: dict) -> dict[str, dict[str, float]]:
    """Metrics per method without the timings (`*_seconds` are wall-clock, never reproducible)."""
    return {
        m: {k: v for k, v in r.data.metrics.items() if not k.endswith("_seconds")} for m, r in kids.items()
    }
