"""The stack of `sngp serve`: the Prefect server, the MLflow tracking server and process workers, on one
data directory. Started as child processes, in this order, each waited for until healthy:

    prefect server start --host H --port P      PREFECT_HOME=DIR/prefect, SQLite DIR/prefect/prefect.db
                                                 (or a PostgreSQL database)
    mlflow server --host H --port Q --artifacts-destination DIR/mlflow/artifacts --workers 1
                                                 backend store sqlite:///DIR/mlflow/mlflow.db (or PostgreSQL)
    prefect work-pool create POOL --type process --overwrite    (meanwhile: the crash automation)
    prefect worker start --pool POOL --name sngp-serve-worker --limit 1
                                                 with PREFECT_API_URL, MLFLOW_TRACKING_URI, SNGP_WORKER_NAME
                                                 (N workers: sngp-serve-worker-1 .. -N, one each)

Logs go to DIR/logs/*.log; restarting on the same DIR keeps every run, deployment and work pool.
stop() stops the workers first (they tend to ignore the first signal, so TERM, TERM, KILL), then both
servers, each with every process it started. A small Python API for tests and scripts:

    with start_services("/tmp/stack", prefect_port=4311, mlflow_port=5311) as services:
        subprocess.run([...], env={**os.environ, **services.env})   # PREFECT_API_URL, MLFLOW_TRACKING_URI
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import IO, Self

from flows.ops import commands, processes
from flows.ops.automation import CRASH_AUTOMATION_NAME, sync_crash_automation
from flows.ops.errors import ServiceError
from flows.ops.network import answers
from flows.ops.processes import Child
from flows.ops.stack_settings import StackSettings
from flows.ops.supervision import RESTART_BACKOFF_CAP, RESTART_LIMIT, RESTART_WINDOW, CrashLoop, Supervisor
from flows.ops.workers import read_workers, worker_online

# Workers: TERM, wait, TERM again (a process worker often ignores the first one), wait, then KILL.
WORKER_STOP_SCHEDULE = ((signal.SIGTERM, 3.0), (signal.SIGTERM, 3.0))
SERVER_STOP_SCHEDULE = ((signal.SIGTERM, 10.0),)
_SERVERS = ("prefect", "mlflow")
# The restart policy's names come from flows.ops.supervision; `sngp serve` reads them here.
__all__ = [
    "RESTART_BACKOFF_CAP",
    "RESTART_LIMIT",
    "RESTART_WINDOW",
    "CrashLoop",
    "Services",
    "start_services",
]


class Services(StackSettings):
    """Prefect server + MLflow server (+ work pool and `workers` process workers) on one data directory.

    `start()` returns once everything answers (or raises ServiceError naming what failed, having
    stopped the rest); `stop()` shuts down in order. Use as a context manager or `start_services()`.
    URLs are available before starting: `prefect_url`, `prefect_api_url`, `mlflow_url`, `env`.
    Keyword arguments: StackSettings's (host, ports, databases, work pool, workers, heartbeat_seconds,
    timeout), and `log` (called with each progress line), `die_with_parent` (children are killed by the
    kernel if this process dies).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        log: Callable[[str], None] | None = None,
        die_with_parent: bool = True,
        **settings,
    ):
        super().__init__(data_dir, **settings)
        self.crash_automation_status: str | None = None  # what start() did: sync_crash_automation()
        self.startup_seconds: float | None = None
        self._log = log or (lambda message: None)
        self._die_with_parent = die_with_parent
        self._children: dict[str, Child] = {}
        self._lock_file: IO[str] | None = None
        self._stopped = True
        self._t0 = 0.0
        self._up: set[str] = set()  # start-up steps done
        self._workers_since: datetime | None = None  # when the workers were started
        self._supervisor = Supervisor(self._log)  # restarts the long-running children (supervise())
        # Whether the work pool and automations are to be re-ensured once a restarted Prefect server answers.
        self._resync = False

    @property
    def children(self) -> dict[str, Child]:
        """The running child processes by role: 'prefect', 'mlflow', 'pool', 'worker' (or 'worker-1', ...)."""
        return dict(self._children)

    def worker_statuses(self) -> dict[str, dict]:
        """The Prefect server's records of our workers (name, status, last_heartbeat_time, ...), by name."""
        ours = set(self.worker_names)
        return {
            w.name: w.model_dump(mode="json")
            for w in read_workers(self.prefect_api_url, self.work_pool)
            if w.name in ours
        }

    def worker_status(self) -> dict | None:
        """The server's record of our (first) worker, or None."""
        names = self.worker_names
        return self.worker_statuses().get(names[0]) if names else None

    def _claim_data_dir(self) -> None:
        """Create the folders and hold DIR/.serve.lock while we run: one `sngp serve` per data dir."""
        try:
            for path in (self.prefect_home, self.mlflow_dir / "artifacts", self.log_dir):
                path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceError(f"cannot create {exc.filename}: {exc.strerror}") from None
        lock = open(self.data_dir / ".serve.lock", "w")  # noqa: SIM115 - held while we run
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ServiceError(
                f"another `sngp serve` is already running on --data-dir {self.data_dir}"
            ) from None
        self._lock_file = lock

    # Lifecycle ---------------------------------------------------------------------------------
    def start(self, stop_event: threading.Event | None = None) -> Self:
        """Start everything and wait until healthy. KeyboardInterrupt if `stop_event` is set meanwhile."""
        if not self._stopped:
            raise RuntimeError("services already started")
        self._stopped = False
        try:
            self._start(stop_event)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, stop_event: threading.Event | None) -> None:
        self.check_options()
        mlflow_store, prefect_db, secrets = self.databases()
        self._claim_data_dir()
        self._t0 = time.monotonic()
        self._up.clear()
        self._workers_since = None
        self._supervisor.reset()
        self._resync = False
        self._log(f"starting Prefect and MLflow servers in {self.data_dir} (logs in {self.log_dir})")
        self._start_servers(mlflow_store, prefect_db, secrets)
        steps: dict[str, Callable[[], bool]] = {
            "prefect": partial(self._server_up, "prefect"),
            "mlflow": partial(self._server_up, "mlflow"),
            "pool": self._pool_ready,
        }
        steps.update({key: partial(self._worker_online, key, name) for key, name, _ in self._worker_slots()})
        self._run_steps(steps, stop_event)
        self.startup_seconds = self._elapsed()

    def _start_servers(self, mlflow_store: str, prefect_db: str, secrets: tuple[str, ...]) -> None:
        base = commands.base_env(self.prefect_home)
        death = signal.SIGTERM if self._die_with_parent else None
        spawners = {
            "prefect": partial(
                processes.spawn,
                "Prefect server",
                commands.prefect_server_command(self.host, self.prefect_port),
                env=commands.prefect_server_env(
                    base, prefect_db, self.host, self.prefect_port, self.prefect_api_url
                ),
                cwd=self.prefect_home,
                log=self.log_dir / "prefect-server.log",
                death_signal=death,
                secrets=secrets,
            ),
            "mlflow": partial(
                processes.spawn,
                "MLflow server",
                commands.mlflow_server_command(
                    self.host, self.mlflow_port, str(self.mlflow_dir / "artifacts")
                ),
                env=commands.mlflow_server_env(base, mlflow_store),
                cwd=self.mlflow_dir,
                log=self.log_dir / "mlflow-server.log",
                death_signal=death,
                secrets=secrets,
            ),
        }
        for key, spawner in spawners.items():
            self._children[key] = self._supervisor.start(key, spawner)

    def _run_steps(self, steps: dict[str, Callable[[], bool]], stop_event: threading.Event | None) -> None:
        """Call each pending step until it returns True; the first one still pending at the deadline
        is named in the timeout error."""
        pending = dict(steps)
        deadline = self._t0 + self.timeout
        while pending:
            self._check_running(stop_event)
            for key in [key for key, step in pending.items() if step()]:
                del pending[key]
            if pending and time.monotonic() > deadline:
                raise self._timeout_error(next(iter(pending)))
            if pending:
                time.sleep(0.2)

    def _check_running(self, stop_event: threading.Event | None) -> None:
        if stop_event is not None and stop_event.is_set():
            raise KeyboardInterrupt
        for child in self.failed():
            raise ServiceError(
                f"{child.name} exited during start-up (exit code {child.exit_code}); {child.tail()}"
            )

    def _health_url(self, key: str) -> str:
        return f"{self.prefect_api_url}/health" if key == "prefect" else f"{self.mlflow_url}/health"

    def _server_up(self, key: str) -> bool:
        if not answers(self._health_url(key)):
            return False
        self._up.add(key)
        self._log(f"{self._children[key].name} is up at {self._health_url(key)} ({self._elapsed():.1f} s)")
        return True

    def _pool_ready(self) -> bool:
        """Once Prefect answers: create the work pool (a CLI call) and, meanwhile, sync the crash
        automation; once the pool exists, start the workers."""
        if "prefect" not in self._up:
            return False
        pool = self._children.get("pool")
        if pool is None:
            self._start_pool_and_automation()
            return False
        if pool.alive:
            return False
        if pool.exit_code != 0:
            raise ServiceError(
                f"creating work pool {self.work_pool!r} failed (exit code {pool.exit_code}); {pool.tail()}"
            )
        self._log(f"work pool {self.work_pool!r} (process) is ready ({self._elapsed():.1f} s)")
        self._start_workers()
        return True

    def _start_pool_and_automation(self) -> None:
        self._children["pool"] = processes.spawn(
            f"work pool creation ({self.work_pool})",
            commands.work_pool_command(self.work_pool),
            env=self._client_env(),
            cwd=self.data_dir,
            log=self.log_dir / "work-pool.log",
            death_signal=signal.SIGTERM if self._die_with_parent else None,
        )
        try:
            self.crash_automation_status = sync_crash_automation(self.prefect_api_url, self.heartbeat_seconds)
        except ServiceError as exc:
            raise ServiceError(
                f"could not set up the automation {CRASH_AUTOMATION_NAME!r} on the Prefect server: {exc}"
            ) from None
        self._log(self._automation_line())

    def _automation_line(self) -> str:
        seconds = self._elapsed()
        if not self.heartbeat_seconds:
            what = "disabled" if self.crash_automation_status == "disabled" else "not set up"
            return f"automation {CRASH_AUTOMATION_NAME!r} {what} (--heartbeat-seconds 0) ({seconds:.1f} s)"
        return (
            f"automation {CRASH_AUTOMATION_NAME!r} {self.crash_automation_status}: flow runs of deployments "
            f"silent for {self.crash_after_seconds} s are marked Crashed ({seconds:.1f} s)"
        )

    def _start_workers(self) -> None:
        # A heartbeat from before this start (a worker of a previous run) does not count as online.
        self._workers_since = datetime.now(UTC) - timedelta(seconds=1)
        for key, name, log in self._worker_slots():
            spawner = partial(
                processes.spawn,
                f"Prefect worker {name!r}",
                commands.worker_command(self.work_pool, name, self.worker_limit),
                env=self.worker_env(name),
                cwd=Path.cwd(),
                log=log,
                death_signal=signal.SIGKILL if self._die_with_parent else None,
            )
            self._children[key] = self._supervisor.start(key, spawner)

    def _worker_online(self, key: str, name: str) -> bool:
        if self._workers_since is None or not worker_online(
            self.prefect_api_url, self.work_pool, name, self._workers_since
        ):
            return False
        self._log(f"worker {name!r} is polling {self.work_pool!r} ({self._elapsed():.1f} s)")
        return True

    def _timeout_error(self, key: str) -> ServiceError:
        child = self._children.get(key)
        within = f"within {self.timeout:.0f} s"
        if key in _SERVERS:
            message = f"{child.name} did not answer {self._health_url(key)} {within}"
        elif key == "pool":
            message = f"creating work pool {self.work_pool!r} did not finish {within}"
            child = child or self._children["prefect"]
        else:
            name = {slot: name for slot, name, _ in self._worker_slots()}[key]
            message = f"the Prefect worker {name!r} did not come online in pool {self.work_pool!r} {within}"
        return ServiceError(f"{message}; {child.tail() if child else ''}")

    def _elapsed(self) -> float:
        return time.monotonic() - self._t0

    # Supervision ----------------------------------------------------------------------------------
    def supervise(self) -> None:
        """One round of supervision, to call every second or so while started: a server or worker that
        has exited is restarted after its backoff (logged: "MLflow server exited with code -9;
        restarting in 1 s (1/5 in 2 min)"), its recovery logged once it answers again; once a
        restarted Prefect server answers, the work pool and the automations are re-ensured (the
        workers keep polling and reconnect on their own; one that exits is restarted like any other).
        Raises CrashLoop (naming the service, with its log's last lines) on the RESTART_LIMIT + 1st exit
        within RESTART_WINDOW seconds."""
        if "prefect" in self._supervisor.supervise(self._children, self._recovered):
            self._resync = True
        if self._resync and "prefect" not in self._supervisor.restarting:
            self._resync = False
            self._ensure_pool_and_automations()
        pool = self._children.get("pool")
        if pool is not None and not pool.alive:
            del self._children["pool"]
            if pool.exit_code != 0:
                self._log(f"re-creating work pool {self.work_pool!r} failed (exit code {pool.exit_code})")

    @property
    def restarting(self) -> list[str]:
        """The services exited and not answering again yet (keys of `children`)."""
        return self._supervisor.restarting

    def _recovered(self, key: str, since: datetime) -> bool:
        if key in _SERVERS:
            return answers(self._health_url(key))
        name = {slot: name for slot, name, _ in self._worker_slots()}[key]
        return worker_online(self.prefect_api_url, self.work_pool, name, since)

    def _ensure_pool_and_automations(self) -> None:
        """After a Prefect server restart: the work pool (again, --overwrite) and the automations. They
        persist in its database; this re-syncs them in case it lost them. Failures are logged."""
        self._children.pop("pool", None)
        try:
            self._start_pool_and_automation()
        except ServiceError as exc:
            self._log(f"warning: {exc}")

    def failed(self) -> list[Child]:
        """Long-running children that have exited (they should not while started)."""
        return [child for key, child in self._children.items() if key != "pool" and not child.alive]

    def stop(self) -> float:
        """Stop the workers (all at once), then both servers; returns the seconds it took. Idempotent."""
        t0 = time.monotonic()
        workers = [self._children.get(key) for key, _, _ in self._worker_slots()]
        processes.stop([*workers, self._children.get("pool")], WORKER_STOP_SCHEDULE)
        processes.stop([self._children.get(key) for key in _SERVERS], SERVER_STOP_SCHEDULE)
        self._children.clear()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        self._stopped = True
        return time.monotonic() - t0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def start_services(data_dir: str | os.PathLike, **kwargs) -> Iterator[Services]:
    """Start the stack (see `Services` for the keyword arguments); stopped on exit."""
    services = Services(data_dir, **kwargs)
    services.start()
    try:
        yield services
    finally:
        services.stop()
