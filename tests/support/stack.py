"""Server stacks in tests: `sngp serve` as a subprocess (ServeProcess), the same servers started in-process
from a background thread (BackgroundServices), and the client side of a test against them (StackClient),
plus the process-tree helpers that check what a stack left behind. Ports and JSON over HTTP: support.net.

Nothing is mocked: real Prefect and MLflow servers on free loopback ports and temporary directories.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from .cli import SNGP, SngpProcess, clean_server_env, describe, sngp_env
from .net import two_ports
from .records import MlflowReader, check_complete_record

START_TIMEOUT = 180.0  # how long a test waits for `sngp serve` (without --timeout) to come up
RUN_TIMEOUT = 900.0  # a client command run to the end
EXPORTS = re.compile(r"^  export PREFECT_API_URL=(\S+) MLFLOW_TRACKING_URI=(\S+)$", re.MULTILINE)
# A substring of the command line of each server or worker `sngp serve` starts (its direct children).
SERVICE_COMMANDS = {
    "prefect": "prefect server start",
    "mlflow": "mlflow server",
    "worker": "prefect worker start",
}


# ---------------------------------------------------------------------------------------------------------
# Processes


def alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie, exited but not yet reaped, is not alive)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def cmdline(pid: int) -> str:
    """The command line of `pid`, arguments joined by spaces ('' if it is gone)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def children_of(pid: int) -> dict[int, str]:
    """{pid: command line} of every live descendant of `pid`."""
    return {p.pid: cmd for p, cmd in _descendants(pid)}


def _descendants(pid: int) -> list[tuple[psutil.Process, str]]:
    try:
        found = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    live = []
    for process in found:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                live.append((process, " ".join(process.cmdline())))
        except psutil.Error:
            continue
    return live


def _kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()  # psutil checks the pid still names the same process
        except psutil.Error:
            pass


def use_server_env(monkeypatch: pytest.MonkeyPatch, **extra: str) -> None:
    """Replace this process's environment with `clean_server_env(**extra)` (undone by `monkeypatch`): for
    servers and workers started in-process, which inherit it."""
    env = clean_server_env(**extra)
    for key in [key for key in os.environ if key not in env]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


# ---------------------------------------------------------------------------------------------------------
# Clients


class StackClient:
    """The client side of a test against a served stack: `client_dir` is the working directory and holds the
    PREFECT_HOME of the commands it runs; `cache_dir` (if any) their SNGP_CACHE_DIR."""

    def __init__(self, prefect_api: str, mlflow_url: str, client_dir: Path, cache_dir: Path | None = None):
        self.prefect_api = prefect_api
        self.mlflow_url = mlflow_url
        self.client_dir = client_dir
        self.cache_dir = cache_dir

    def client_env(
        self, *, mlflow: bool = True, cache_dir: Path | None = None, **extra: str
    ) -> dict[str, str]:
        """clean_server_env naming the Prefect server (and, with `mlflow`, the MLflow server)."""
        env = clean_server_env(
            PREFECT_API_URL=self.prefect_api, PREFECT_HOME=str(self.client_dir / "prefect-home"), **extra
        )
        if mlflow:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_url
        cache = cache_dir or self.cache_dir
        if cache:
            env["SNGP_CACHE_DIR"] = str(cache)
        return env

    def run(
        self,
        argv: list,
        env: dict[str, str] | None = None,
        *,
        cwd: Path | None = None,
        timeout: float = RUN_TIMEOUT,
    ) -> subprocess.CompletedProcess:
        """Run `argv` to the end, in `client_dir` unless `cwd` says otherwise; `.seconds`: its wall time."""
        self.client_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        proc = subprocess.run(
            [str(a) for a in argv],
            env=env if env is not None else self.client_env(),
            cwd=cwd or self.client_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        proc.seconds = time.monotonic() - started
        return proc

    def start_sngp(self, args: list[str], tag: str) -> SngpProcess:
        """`sngp ARGS` against both servers, started (not waited for) in a fresh working directory
        client_dir/TAG with its own PREFECT_HOME and task cache: runs with different tags share nothing,
        so each trains from scratch and their durations compare."""
        workdir = self.client_dir / tag
        env = sngp_env(workdir, self.prefect_api, MLFLOW_TRACKING_URI=self.mlflow_url)
        return SngpProcess(args, workdir, env)

    def completed(self, proc: SngpProcess, methods: list[str], timeout: float = RUN_TIMEOUT) -> str:
        """Wait for a `sngp run` started by start_sngp: exit 0, no traceback, and a complete record of
        `methods` on the MLflow server (records.check_complete_record) -> its parent run id."""
        try:
            code = proc.wait(timeout)
        finally:
            proc.cleanup()
        assert code == 0, describe(proc)
        assert "Traceback" not in proc.stderr, describe(proc)
        check_complete_record(self.mlflow_url, proc.parent_id, methods)
        return proc.parent_id

    def reader(self) -> MlflowReader:
        """The MLflow server read through its client; downloads go to client_dir/downloads."""
        downloads = self.client_dir / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        return MlflowReader(self.mlflow_url, downloads)


# ---------------------------------------------------------------------------------------------------------
# `sngp serve` as a subprocess


class ServeProcess(StackClient):
    """`sngp serve --data-dir DIR --prefect-port P --mlflow-port Q [--timeout T] ARGS` as a subprocess, its
    output (stdout and stderr) collected line by line; started again with `start()` after `stop()`, on the
    same directory and ports. Free ports unless `ports` are given; `env` defaults to clean_server_env();
    `cwd` is where serve (and so its workers) run. The client side (StackClient) uses `client_dir`
    (default: DIR's sibling `client`) and `cache_dir`.

    For fault injection: `children()` lists every process under serve, `service_pid(role)` names one server
    or worker; each runs in a session and process group of its own, so `os.killpg(pid, SIGKILL)` ends it with
    everything it started. `cleanup()` leaves nothing running.
    """

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        ports: tuple[int, int] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float | None = None,
        client_dir: Path | None = None,
        cache_dir: Path | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.args = args
        self.prefect_port, self.mlflow_port = ports or two_ports()
        self.env = env if env is not None else clean_server_env()
        self.cwd = cwd
        self.timeout = timeout
        super().__init__(
            f"http://127.0.0.1:{self.prefect_port}/api",
            f"http://127.0.0.1:{self.mlflow_port}",
            client_dir or self.data_dir.parent / "client",
            cache_dir,
        )
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.startup_seconds: float | None = None
        self.killed = False  # the last stop() had to SIGKILL it
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        self._launched = 0.0

    @property
    def argv(self) -> list[str]:
        argv = [str(SNGP), "serve", "--data-dir", str(self.data_dir)]
        argv += ["--prefect-port", str(self.prefect_port), "--mlflow-port", str(self.mlflow_port)]
        if self.timeout is not None:
            argv += ["--timeout", str(self.timeout)]
        return [*argv, *self.args]

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def run_to_exit(self, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run serve to its end, output captured: for options it must refuse before starting anything."""
        return subprocess.run(
            self.argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def launch(self) -> None:
        """Start `sngp serve`, without waiting for it (see wait_ready)."""
        assert not self.running, "sngp serve is already running"
        if self.cwd is not None:
            self.cwd.mkdir(parents=True, exist_ok=True)
        self.lines, self._ready, self.killed = [], threading.Event(), False
        self._launched = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(
            target=self._read, args=(self.proc, self.lines, self._ready), daemon=True
        )
        self._reader.start()

    @staticmethod
    def _read(proc: subprocess.Popen, lines: list[str], ready: threading.Event) -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Press Ctrl-C"):
                ready.set()
        ready.set()

    def wait_ready(self, timeout: float | None = None) -> tuple[str, str]:
        """(PREFECT_API_URL, MLFLOW_TRACKING_URI) from the export line serve prints once everything is up. If
        it does not come up within `timeout` (default: --timeout + 30 s, or START_TIMEOUT), it is stopped and
        the test fails."""
        if timeout is None:
            timeout = START_TIMEOUT if self.timeout is None else self.timeout + 30
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            pytest.fail(f"sngp serve did not come up within {timeout:.0f} s:\n{self.output}")
        printed = EXPORTS.search(self.output)
        assert printed, self.output
        self.startup_seconds = time.monotonic() - self._launched
        return printed.group(1), printed.group(2)

    def start(self, timeout: float | None = None) -> float:
        """launch() and wait_ready(); serve must print this stack's URLs. Returns the seconds it took."""
        self.launch()
        assert self.wait_ready(timeout) == (self.prefect_api, self.mlflow_url), self.output
        return self.startup_seconds

    def stop(self, within: float = 60.0) -> tuple[int | None, float]:
        """SIGTERM (serve stops the workers, then both servers) and wait up to `within` s for it to exit; if
        it is still running then, SIGKILL it and every process under it (`killed` says so). Returns (exit
        code, seconds). Idempotent: (the last exit code, 0.0) when serve is not running."""
        if not self.running:
            return (self.proc.returncode if self.proc else None), 0.0
        tree = [process for process, _ in _descendants(self.proc.pid)]
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.killed = True
            self.proc.kill()
            code = self.proc.wait()
            _kill(tree)
        seconds = time.monotonic() - started
        self._reader.join(timeout=5)
        return code, seconds

    def terminate(self, within: float = 15.0) -> tuple[int, float, dict[int, str]]:
        """stop() that must end serve within `within` s, else the test fails: (exit code, seconds, {pid:
        command line} of the processes that were under serve)."""
        children = self.children()
        code, seconds = self.stop(within)
        if self.killed:
            pytest.fail(f"sngp serve still running {within:.0f} s after SIGTERM:\n{self.output}")
        return code, seconds, children

    def cleanup(self) -> None:
        """stop(), then SIGKILL whatever was under serve and is still alive (for fixture teardown)."""
        if not self.running:
            return
        tree = [process for process, _ in _descendants(self.proc.pid)]
        self.stop(within=25)
        _kill(tree)

    def children(self) -> dict[int, str]:
        """{pid: command line} of every live process under serve (servers, workers and their children)."""
        return children_of(self.proc.pid) if self.running else {}

    def service_pid(self, role: str) -> int:
        """The pid of the one direct child of serve whose command line holds SERVICE_COMMANDS[role]
        ('prefect', 'mlflow', 'worker'), or `role` itself (e.g. a worker's name: 'sngp-serve-worker-2')."""
        wanted = SERVICE_COMMANDS.get(role, role)
        try:
            direct = psutil.Process(self.proc.pid).children() if self.running else []
        except psutil.Error:
            direct = []
        found = [p.pid for p in direct if alive(p.pid) and wanted in cmdline(p.pid)]
        assert len(found) == 1, f"{len(found)} processes under sngp serve run {wanted!r}: {self.children()}"
        return found[0]


@contextmanager
def serve_processes(data_dir: Path) -> Iterator[Callable[..., ServeProcess]]:
    """`launch(*args, **options)`: a launched ServeProcess(data_dir, *args, **options); each is cleaned up
    on exit. For a test's fixture: `with serve_processes(tmp_path / "stack") as launch: yield launch`."""
    launched: list[ServeProcess] = []

    def launch(*args: str, **options) -> ServeProcess:
        process = ServeProcess(data_dir, *args, **options)
        launched.append(process)
        process.launch()
        return process

    try:
        yield launch
    finally:
        for process in launched:
            process.cleanup()


# ---------------------------------------------------------------------------------------------------------
# The servers started in-process, in the background


class BackgroundServices:
    """flows.ops.stack.Services(data_dir, free ports, **settings) started from a thread that lives until
    close(), so start-up overlaps other work (Linux ties the children's parent-death signal to the thread
    that started them, hence not a short-lived one). `wait()` returns the running Services."""

    def __init__(self, data_dir: Path, **settings):
        from flows.ops.stack import Services

        prefect_port, mlflow_port = two_ports()
        self.services = Services(data_dir, prefect_port=prefect_port, mlflow_port=mlflow_port, **settings)
        self.error: BaseException | None = None
        self._ready, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="background-services", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.services.start()
        except BaseException as exc:  # noqa: BLE001 - reported by wait()
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        self._stop.wait()
        self.services.stop()

    def wait(self, timeout: float = 450):
        """The started Services; the test fails if they are not up within `timeout` s (or their error)."""
        if not self._ready.wait(timeout):
            pytest.fail(f"the Prefect/MLflow servers did not come up within {timeout:.0f} s")
        if self.error is not None:
            raise self.error
        return self.services

    def close(self) -> None:
        """Stop the services (from their thread) and wait for it."""
        self._stop.set()
        self._thread.join(timeout=60)
