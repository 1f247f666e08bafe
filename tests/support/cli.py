"""Running the real `sngp` command in tests: isolated environments, processes watched line by line (so a
test can signal one in the middle of training), and failure descriptions for assertion messages.

Nothing is mocked: `sngp` runs as a subprocess with its own PREFECT_HOME, cache folder and (unless a
test says otherwise) MLflow SQLite store in its own working directory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SNGP = Path(sys.executable).parent / "sngp"
SMOKE = REPO / "conf" / "smoke.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PARENT_ID = re.compile(r"MLflow parent run: ([0-9a-f]{32})")
# What the pipeline logs once it has opened its parent run (before training): a run in flight.
PARENT_STARTED = r"MLflow parent run [0-9a-f]{32}"
TASK_STATE = re.compile(r"Task run '([\w.-]+)' - Finished in state (\S+)")


def sngp_env(workdir: Path, prefect_api: str | None = None, **extra: str) -> dict[str, str]:
    """Environment of one isolated `sngp` process rooted at `workdir`: nothing from the developer's
    MLflow/Prefect/sngp settings, its own PREFECT_HOME and cache folder; Prefect local mode unless
    `prefect_api` names a server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "SNGP_"))}
    env.update(
        PREFECT_HOME=str(workdir / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        DO_NOT_TRACK="1",
        SNGP_CACHE_DIR=str(workdir / ".sngp_cache"),
        TF_CPP_MIN_LOG_LEVEL="2",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
        PYTHONUNBUFFERED="1",
    )
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
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
        self.leaked: list[int] = []  # see run_sngp

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


def run_sngp(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 900
) -> SngpProcess:
    """Run `sngp ARGS` in `cwd` to the end. `.leaked` lists the processes still alive with this run's
    PREFECT_HOME after it exited (e.g. an orphaned temporary Prefect server); they are then ended, so
    they do not outlive the test."""
    env = env if env is not None else sngp_env(cwd)
    proc = SngpProcess(args, cwd, env)
    proc.wait(timeout)
    home = env.get("PREFECT_HOME")
    if home:
        deadline = time.monotonic() + 10  # a server being stopped may need a moment to exit
        while (leaked := processes_with_env("PREFECT_HOME", home)) and time.monotonic() < deadline:
            time.sleep(0.5)
        proc.leaked = leaked
        for pid in leaked:  # started by this test's sngp: end them by pid
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
    return proc


def describe(proc) -> str:
    """Exit code and output tails of a finished `sngp` (or any completed) process, for assertion messages."""
    return (
        f"exit {proc.returncode} after {getattr(proc, 'seconds', None) or 0:.1f} s\n"
        f"leaked processes: {getattr(proc, 'leaked', [])}\n"
        f"--- stdout (tail) ---\n{proc.stdout[-3000:]}\n--- stderr (tail) ---\n{proc.stderr[-5000:]}"
    )


def run_python(script: str, *args: str, cwd: Path, timeout: float = 600) -> tuple[dict, str]:
    """Run `python -c SCRIPT ARGS` in a fresh process with an isolated `sngp_env(cwd)` -> (the JSON the
    script printed on its line starting with a marker word such as "RESULT ", its whole output)."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=sngp_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    markers = ("RESULT ", "LOGGED ", "REPORT ")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(markers))
    return json.loads(line.split(" ", 1)[1]), proc.stdout + proc.stderr
