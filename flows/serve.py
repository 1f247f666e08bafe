"""`sngp serve`: the Prefect server, the MLflow tracking server and process workers, on one data dir.

Started as child processes, in this order, each waited for until healthy:

    prefect server start --host H --port P          PREFECT_HOME=DIR/prefect, SQLite DIR/prefect/prefect.db
                                                     (or --prefect-db postgresql://...)
    mlflow server --host H --port Q --artifacts-destination DIR/mlflow/artifacts --workers 1
                                                     backend store sqlite:///DIR/mlflow/mlflow.db (or --db)
    prefect work-pool create POOL --type process --overwrite
    prefect worker start --pool POOL --name sngp-serve-worker --limit 1
                                                     with PREFECT_API_URL and MLFLOW_TRACKING_URI set
                                                     (--workers N: sngp-serve-worker-1 .. -N, one each)

Each worker runs at most --worker-limit flow runs at once (default 1) and polls every 2 s (unless
PREFECT_WORKER_QUERY_SECONDS says otherwise): Prefect's process worker would otherwise take every
scheduled run it sees in one poll, so the runs of `sngp sweep --runner workpool` would not spread
over several workers.

Unresponsive flow runs: the workers' flow runs send a heartbeat event every --heartbeat-seconds (30,
Prefect's minimum: PREFECT_FLOWS_HEARTBEAT_FREQUENCY in the workers' environment), and once the Prefect
server is healthy `sngp serve` makes sure it has the automation CRASH_AUTOMATION_NAME (created once,
updated when the interval changes): a flow run of a deployment that has sent no heartbeat nor reached a
final state for 3 intervals + 30 s (crash_after_seconds) is set Crashed, so a run whose worker or
machine died does not stay Running forever. --heartbeat-seconds 0 disables it (see crash_automation).

Logs go to DIR/logs/*.log; restarting on the same DIR keeps every run, deployment and work pool.
Ctrl-C / SIGTERM stops the workers first (they tend to ignore the first signal, so TERM, TERM, KILL),
then both servers. docker/compose.yaml starts the same commands as separate services.

Database URLs carry passwords: they reach the servers through environment variables (never argv) and
are only ever shown redacted (postgresql://user:***@host/db).

The same machinery is a small Python API for tests and scripts:

    with start_services("/tmp/stack", prefect_port=4311, mlflow_port=5311) as services:
        subprocess.run([...], env={**os.environ, **services.env})   # PREFECT_API_URL, MLFLOW_TRACKING_URI

This module imports only the standard library at import time (the `sngp` CLI imports it to build
its parser); psycopg2 is imported only to check a PostgreSQL URL.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Self

from flows.cli.common import UserError
from flows.ops.processes import die_with_parent, executable

HELP = "start the Prefect server, MLflow tracking server and process worker(s) (Ctrl-C stops all)"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_WORK_POOL = "sngp-pool"
WORKER_NAME = "sngp-serve-worker"  # the only worker's name; with --workers N: WORKER_NAME-1 .. -N
DEFAULT_WORKER_LIMIT = 1  # flow runs at once per worker (None: Prefect's default, no limit)
WORKER_QUERY_SECONDS = "2"  # how often workers poll for scheduled runs (Prefect's default: 10 s)
DB_URL_ENV = "SNGP_DB_URL"  # MLflow backend store (PostgreSQL) when --db is not given
PREFECT_DB_URL_ENV = "SNGP_PREFECT_DB_URL"  # Prefect server database when --prefect-db is not given
DEFAULT_TIMEOUT = 120.0

# Unresponsive flow runs (see the module doc). Prefect rejects heartbeat intervals under 30 s (and
# defaults to 180 s); within = 3 intervals + a margin, so one late or lost heartbeat never counts.
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
MIN_HEARTBEAT_SECONDS = 30
DEFAULT_HEARTBEAT_SECONDS = 30
CRASH_MARGIN_SECONDS = 30
CRASH_AUTOMATION_NAME = "sngp: crash unresponsive flow runs"
UNRESPONSIVE = "stopped responding"

# Worker: TERM, wait, TERM again (it often ignores the first one), wait, then KILL the process group.
WORKER_STOP_SCHEDULE = ((signal.SIGTERM, 3.0), (signal.SIGTERM, 3.0))
SERVER_STOP_SCHEDULE = ((signal.SIGTERM, 10.0),)

_POSTGRES_SCHEMES = {"postgresql", "postgres", "postgresql+psycopg2", "postgresql+asyncpg"}
# Database settings a user's shell may carry; the servers get exactly the ones we set.
_PREFECT_DB_ENV_PREFIXES = ("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_")


class ServiceError(UserError):
    """A server did not start (or died): names it and quotes the end of its log."""


# --------------------------------------------------------------------------------------------------
# Commands (shared with docker/compose.yaml, which runs the same argv in separate containers)


def prefect_server_command(host: str, port: int) -> list[str]:
    return ["prefect", "server", "start", "--host", host, "--port", str(port)]


def mlflow_server_command(host: str, port: int, artifacts_destination: str) -> list[str]:
    return [
        "mlflow", "server", "--host", host, "--port", str(port),
        "--artifacts-destination", artifacts_destination, "--workers", "1",
    ]  # fmt: skip


def work_pool_command(pool: str) -> list[str]:
    return ["prefect", "work-pool", "create", pool, "--type", "process", "--overwrite"]


def worker_command(pool: str, name: str | None = WORKER_NAME, limit: int | None = None) -> list[str]:
    return (
        ["prefect", "worker", "start", "--pool", pool]
        + (["--name", name] if name else [])
        + (["--limit", str(limit)] if limit is not None else [])
    )


def crash_after_seconds(heartbeat_seconds: int) -> int:
    """How long a flow run may send no heartbeat before the automation sets it Crashed: 3 intervals and
    a margin. Prefect's proactive trigger restarts the window at each heartbeat and checks every ~5 s,
    so a dead run is marked between this minus one interval and this plus a few seconds after it died."""
    return 3 * heartbeat_seconds + CRASH_MARGIN_SECONDS


def crash_message(heartbeat_seconds: int) -> str:
    """The Crashed state's message (shown in the Prefect UI; flows.sweep recognises the name in it)."""
    return (
        f"No heartbeat for {crash_after_seconds(heartbeat_seconds)} s: the flow run {UNRESPONSIVE}, "
        f"its worker or machine died? (automation {CRASH_AUTOMATION_NAME!r} of sngp serve)"
    )


def crash_automation(heartbeat_seconds: int) -> dict:
    """The automation (Prefect's REST API JSON) that marks unresponsive flow runs of deployments Crashed.

    Prefect's documented zombie-flow automation (docs: v3/advanced/detect-zombie-flows): a proactive
    trigger per flow run (for_each prefect.resource.id) that, after each `prefect.flow-run.heartbeat`,
    expects another heartbeat or a final state within crash_after_seconds, else sets the run CRASHED.
    Only flow runs of deployments (match_related role deployment): those are what the workers run with
    our interval, while `sngp run` / `sngp sweep` in a terminal keep Prefect's default of 180 s and must
    not be crashed between two heartbeats. Suspended and AwaitingRetry also end a window: a suspended
    run and one waiting to retry send no heartbeat until they resume (and then start a new window)."""
    within = crash_after_seconds(heartbeat_seconds)
    return {
        "name": CRASH_AUTOMATION_NAME,
        "description": (
            f"Created by `sngp serve`: a flow run of a deployment that has sent no heartbeat for {within} s "
            f"(its flow runs send one every {heartbeat_seconds} s) is set Crashed, so a run whose worker "
            "or machine died does not stay Running forever. Updated by `sngp serve --heartbeat-seconds`."
        ),
        "enabled": True,
        "tags": [],
        "trigger": {
            "type": "event",
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "match_related": {"prefect.resource.role": "deployment"},
            "after": ["prefect.flow-run.heartbeat"],
            "expect": [
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
                "prefect.flow-run.Suspended",
                "prefect.flow-run.AwaitingRetry",
            ],
            "for_each": ["prefect.resource.id"],
            "posture": "Proactive",
            "threshold": 1,
            "within": within,
        },
        "actions": [
            {
                "type": "change-flow-run-state",
                "state": "CRASHED",
                "message": crash_message(heartbeat_seconds),
                "force": False,  # never overwrite a final state reported meanwhile
            }
        ],
        "actions_on_trigger": [],
        "actions_on_resolve": [],
    }


def worker_names(count: int) -> list[str]:
    """`sngp-serve-worker` for one worker (the name it always had), else sngp-serve-worker-1 .. -N."""
    return [WORKER_NAME] if count == 1 else [f"{WORKER_NAME}-{i}" for i in range(1, count + 1)]


# --------------------------------------------------------------------------------------------------
# Database URLs


def redact_url(url: str) -> str:
    """The URL with its password replaced by *** (postgresql://user:***@host:5432/db)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    hostpart = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{hostpart}"))


@dataclass(frozen=True)
class PostgresURLs:
    """One PostgreSQL database as each client wants it (SQLAlchemy 2.1 defaults to psycopg 3, which
    is not installed, so MLflow gets the psycopg2 driver named explicitly)."""

    libpq: str  # postgresql://...           psycopg2.connect, psql
    mlflow: str  # postgresql+psycopg2://... MLflow backend store
    prefect: str  # postgresql+asyncpg://... Prefect server database

    @classmethod
    def parse(cls, url: str, option: str) -> PostgresURLs:
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise UserError(f"{option} is not a valid URL: {redact_url(url)}") from None
        if parts.scheme not in _POSTGRES_SCHEMES or not parts.hostname:
            raise UserError(
                f"{option} must be a PostgreSQL URL like postgresql://user:password@host:5432/dbname "
                f"(got {redact_url(url)})"
            )
        if not parts.path.strip("/"):
            raise UserError(f"{option} must name a database: postgresql://user:password@host:5432/dbname")
        rest = url.split("://", 1)[1]
        return cls(f"postgresql://{rest}", f"postgresql+psycopg2://{rest}", f"postgresql+asyncpg://{rest}")


def _check_database(url: str, what: str) -> None:
    """Fail fast, with a clear message, if the PostgreSQL database cannot be reached."""
    try:
        import psycopg2
    except ImportError:  # pragma: no cover - psycopg2-binary is a project dependency
        raise UserError("PostgreSQL support needs psycopg2: pip install psycopg2-binary") from None
    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except psycopg2.Error as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"cannot connect to the {what} database {redact_url(url)}: {reason}") from None


# --------------------------------------------------------------------------------------------------
# Ports, HTTP


def _url_host(host: str) -> str:
    """Host to put in client URLs: wildcard binds are reached through loopback; IPv6 gets brackets."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def check_port_free(host: str, port: int, option: str) -> None:
    """UserError unless `port` can be bound on `host` (as the servers will, with SO_REUSEADDR)."""
    if not 1 <= port <= 65535:
        raise UserError(f"{option} must be between 1 and 65535 (got {port})")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host!r} is not a valid address: {exc.strerror}") from None
    family, socktype, proto, _, sockaddr = infos[0]
    with socket.socket(family, socktype, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} is already in use (choose another with {option})") from None
            raise UserError(
                f"cannot listen on {host}:{port} ({exc.strerror}); check --host and {option}"
            ) from None


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def _http(url: str, body: dict | None = None, timeout: float = 2.0, method: str | None = None):
    """GET (or POST JSON, or `method`) and decode the JSON/text answer; raises OSError/ValueError."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method=method
    )
    with _NO_PROXY.open(request, timeout=timeout) as response:
        text = response.read().decode()
    try:
        return json.loads(text)
    except ValueError:
        return text


def _healthy(url: str) -> bool:
    try:
        _http(url)
        return True
    except (OSError, ValueError, http.client.HTTPException):
        return False


# --------------------------------------------------------------------------------------------------
# The crash automation


def _normalized(value):
    """JSON value comparable regardless of list order (the API returns sets as lists) and int/float."""
    if isinstance(value, dict):
        return {key: _normalized(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set):
        items = [_normalized(item) for item in value]
        return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _automation_differs(existing: dict, desired: dict) -> bool:
    """Whether any setting of `desired` has another value in `existing` (as the API returns it, with
    ids, timestamps and defaults we do not set, which are ignored)."""
    for key in ("name", "description", "enabled", "tags", "actions_on_trigger", "actions_on_resolve"):
        if _normalized(existing.get(key)) != _normalized(desired[key]):
            return True
    trigger = existing.get("trigger") or {}
    if any(_normalized(trigger.get(key)) != _normalized(value) for key, value in desired["trigger"].items()):
        return True
    actions = existing.get("actions") or []
    if len(actions) != len(desired["actions"]):
        return True
    return any(
        _normalized(have.get(key)) != _normalized(value)
        for have, want in zip(actions, desired["actions"], strict=True)
        for key, value in want.items()
    )


def _api(
    method: str, url: str, body: dict | None = None, timeout: float = 30.0, unavailable_for: float = 30.0
):
    """One request; HTTP 503 (a just-started server whose services are not all up yet: seen on a PUT to
    /automations right after /health answered) is retried for up to `unavailable_for` seconds."""
    deadline = time.monotonic() + unavailable_for
    while True:
        try:
            return _http(url, body=body, timeout=timeout, method=method)
        except urllib.error.HTTPError as exc:
            if exc.code == 503 and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            detail = " ".join(exc.read().decode(errors="replace").split())[:1000]
            raise ServiceError(f"{method} {url} answered HTTP {exc.code}: {detail}") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise ServiceError(f"{method} {url} failed: {exc}") from None


def sync_crash_automation(api_url: str, heartbeat_seconds: int | None) -> str:
    """Make the Prefect server at `api_url` hold exactly one automation CRASH_AUTOMATION_NAME with
    crash_automation(heartbeat_seconds)'s settings: created if missing, updated (same id) if it
    differs, extra copies deleted; with heartbeat_seconds None or 0 an existing one is disabled.
    Returns what it did: 'created', 'updated', 'unchanged', 'disabled' or 'absent'.
    Raises ServiceError if the server refuses."""
    found = _api(
        "POST",
        f"{api_url}/automations/filter",
        {"automations": {"name": {"any_": [CRASH_AUTOMATION_NAME]}}, "limit": 50},
    )
    found = sorted(
        (a for a in found if a.get("name") == CRASH_AUTOMATION_NAME), key=lambda a: a.get("created") or ""
    )
    if not heartbeat_seconds:
        enabled = [a for a in found if a.get("enabled")]
        for automation in enabled:
            _api("PATCH", f"{api_url}/automations/{automation['id']}", {"enabled": False})
        return "disabled" if enabled else "absent"
    desired = crash_automation(heartbeat_seconds)
    if not found:
        _api("POST", f"{api_url}/automations/", desired)
        return "created"
    keep, *extra = found
    for automation in extra:  # e.g. made by hand with the same name: one automation, one Crashed state
        _api("DELETE", f"{api_url}/automations/{automation['id']}")
    if _automation_differs(keep, desired):
        _api("PUT", f"{api_url}/automations/{keep['id']}", desired)
        return "updated"
    return "updated" if extra else "unchanged"


# --------------------------------------------------------------------------------------------------
# Child processes


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    log: Path
    log_offset: int
    secrets: tuple[str, ...] = ()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        """The last lines this child wrote to its log (this start only), passwords redacted."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return f"(no log at {self.log})"
        for secret in self.secrets:
            text = text.replace(secret, "***")
        kept = [line for line in text.splitlines() if line.strip()][-lines:]
        if not kept:
            return f"({self.log} is empty)"
        return f"last lines of {self.log}:\n" + "\n".join("    " + line for line in kept)


def _spawn(
    name: str,
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    log: Path,
    death_signal: int | None,
    secrets: tuple[str, ...] = (),
) -> _Child:
    argv = [executable(argv[0]), *argv[1:]]
    with open(log, "ab") as f:
        offset = f.tell()
        stamp = datetime.now().isoformat(timespec="seconds")
        f.write(f"\n===== {stamp} sngp serve: {' '.join(argv)}\n".encode())
        f.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # own process group: Ctrl-C reaches only us, we stop them in order
            # preexec_fn only calls prctl (no locks, no imports): safe enough with other threads running.
            preexec_fn=die_with_parent(death_signal) if death_signal else None,  # noqa: PLW1509
        )
    return _Child(name, proc, log, offset, secrets)


def _signal(child: _Child, sig: int) -> None:
    try:
        os.kill(child.proc.pid, sig)
    except ProcessLookupError:
        pass


def _terminate(children: list[_Child], schedule) -> None:
    """Signal the children per `schedule` [(signal, seconds to wait)], then KILL whatever remains,
    including leftovers in their process groups (uvicorn workers, flow-run subprocesses)."""
    children = [c for c in children if c is not None]
    for sig, wait in schedule:
        running = [c for c in children if c.alive]
        if not running:
            break
        for child in running:
            _signal(child, sig)
        deadline = time.monotonic() + wait
        while any(c.alive for c in running) and time.monotonic() < deadline:
            time.sleep(0.05)
    for child in children:
        if child.alive:
            _killpg(child.proc.pid, signal.SIGKILL)
        child.proc.wait()
    for child in children:  # the leader is gone; give its group a moment, then KILL the rest
        deadline = time.monotonic() + 2.0
        while _group_exists(child.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _killpg(child.proc.pid, signal.SIGKILL)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


# --------------------------------------------------------------------------------------------------
# The stack


class Services:
    """Prefect server + MLflow server (+ work pool and `workers` process workers) on one data directory.

    `start()` returns once everything answers (or raises ServiceError naming what failed, having
    stopped the rest); `stop()` shuts down in order. Use as a context manager or `start_services()`.
    URLs are available before starting: `prefect_url`, `prefect_api_url`, `mlflow_url`, `env`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        host: str = DEFAULT_HOST,
        prefect_port: int = DEFAULT_PREFECT_PORT,
        mlflow_port: int = DEFAULT_MLFLOW_PORT,
        db_url: str | None = None,
        prefect_db_url: str | None = None,
        work_pool: str = DEFAULT_WORK_POOL,
        worker: bool = True,
        workers: int = 1,
        worker_limit: int | None = DEFAULT_WORKER_LIMIT,
        timeout: float = DEFAULT_TIMEOUT,
        log: Callable[[str], None] | None = None,
        die_with_parent: bool = True,
        heartbeat_seconds: int | None = DEFAULT_HEARTBEAT_SECONDS,
    ):
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.host = host
        self.prefect_port = int(prefect_port)
        self.mlflow_port = int(mlflow_port)
        self.db_url = db_url
        self.prefect_db_url = prefect_db_url
        self.work_pool = work_pool
        self.worker = worker  # False: no worker at all (as workers=0)
        self.workers = int(workers) if worker else 0
        self.worker_limit = worker_limit
        self.timeout = timeout
        # Seconds between the heartbeats of the workers' flow runs; the crash automation follows it.
        # None or 0: no crash automation (an existing one is disabled), Prefect's own heartbeat setting.
        self.heartbeat_seconds = int(heartbeat_seconds) if heartbeat_seconds else None
        self.crash_automation_status: str | None = None  # what start() did: sync_crash_automation()
        self._log = log or (lambda message: None)
        self._die_with_parent = die_with_parent
        self._children: dict[str, _Child] = {}
        self._lock_file = None
        self._stopped = True
        self.startup_seconds: float | None = None

    # URLs --------------------------------------------------------------------------------------
    @property
    def prefect_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.mlflow_port}"

    @property
    def mlflow_ui_url(self) -> str:
        # MLflow 3 opens in its GenAI view; this query selects the classic runs/experiments view.
        return f"{self.mlflow_url}/#/experiments?workflowType=machine_learning"

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs to record to these servers."""
        return {"PREFECT_API_URL": self.prefect_api_url, "MLFLOW_TRACKING_URI": self.mlflow_url}

    @property
    def crash_after_seconds(self) -> int | None:
        """Seconds without a heartbeat after which a deployment's flow run is set Crashed (None: off)."""
        return crash_after_seconds(self.heartbeat_seconds) if self.heartbeat_seconds else None

    @property
    def mlflow_store_display(self) -> str:
        return redact_url(self.db_url) if self.db_url else f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def prefect_store_display(self) -> str:
        return (
            redact_url(self.prefect_db_url)
            if self.prefect_db_url
            else f"sqlite:///{self.prefect_home / 'prefect.db'}"
        )

    @property
    def prefect_home(self) -> Path:
        return self.data_dir / "prefect"

    @property
    def mlflow_dir(self) -> Path:
        return self.data_dir / "mlflow"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    # Checks ------------------------------------------------------------------------------------
    def _secrets(self) -> tuple[str, ...]:
        found = []
        for url in (self.db_url, self.prefect_db_url):
            if url:
                password = urllib.parse.urlsplit(url).password
                if password:
                    found += [password, urllib.parse.unquote(password)]
        return tuple(sorted(set(found), key=len, reverse=True))

    def _preflight(self) -> tuple[str, str]:
        """Validate everything cheap to validate; returns (MLflow store URI, Prefect database URL)."""
        if self.prefect_port == self.mlflow_port:
            raise UserError(
                f"--prefect-port and --mlflow-port are both {self.prefect_port}; choose two ports"
            )
        if not self.work_pool.strip():
            raise UserError("--work-pool must not be empty")
        if self.worker and self.workers < 1:
            raise UserError(f"--workers must be at least 1 (got {self.workers}); use --no-worker for none")
        if self.worker_limit is not None and self.worker_limit < 1:
            raise UserError(f"--worker-limit must be at least 1 (got {self.worker_limit})")
        if self.heartbeat_seconds is not None and self.heartbeat_seconds < MIN_HEARTBEAT_SECONDS:
            raise UserError(
                f"--heartbeat-seconds must be at least {MIN_HEARTBEAT_SECONDS} (Prefect's minimum), or 0 to "
                f"turn the detection of unresponsive flow runs off (got {self.heartbeat_seconds})"
            )
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise UserError(f"--data-dir {self.data_dir} exists and is not a directory")
        check_port_free(self.host, self.prefect_port, "--prefect-port")
        check_port_free(self.host, self.mlflow_port, "--mlflow-port")

        mlflow_store = f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"
        prefect_db = f"sqlite+aiosqlite:///{self.prefect_home / 'prefect.db'}"
        mlflow_pg = PostgresURLs.parse(self.db_url, "--db") if self.db_url else None
        prefect_pg = PostgresURLs.parse(self.prefect_db_url, "--prefect-db") if self.prefect_db_url else None
        if mlflow_pg and prefect_pg and _same_database(mlflow_pg.libpq, prefect_pg.libpq):
            raise UserError(
                "--db and --prefect-db must be different databases (MLflow and Prefect each keep "
                "their own schema migrations)"
            )
        if mlflow_pg:
            _check_database(mlflow_pg.libpq, "MLflow")
            mlflow_store = mlflow_pg.mlflow
        if prefect_pg:
            _check_database(prefect_pg.libpq, "Prefect")
            prefect_db = prefect_pg.prefect

        try:
            for path in (self.prefect_home, self.mlflow_dir / "artifacts", self.log_dir):
                path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create {exc.filename}: {exc.strerror}") from None
        self._lock_file = open(self.data_dir / ".serve.lock", "w")  # noqa: SIM115 - held while we run
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise UserError(
                f"another `sngp serve` is already running on --data-dir {self.data_dir}"
            ) from None
        return mlflow_store, prefect_db

    # Environments ------------------------------------------------------------------------------
    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in list(env):
            if key.startswith(_PREFECT_DB_ENV_PREFIXES) or key in (
                "MLFLOW_BACKEND_STORE_URI", DB_URL_ENV, PREFECT_DB_URL_ENV,
            ):  # fmt: skip
                del env[key]  # no database credentials where they are not needed
        env["PREFECT_HOME"] = str(self.prefect_home)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _prefect_server_env(self, database_url: str) -> dict[str, str]:
        return {
            **self._base_env(),
            "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
            "PREFECT_API_URL": self.prefect_api_url,
            # What the browser calls: else the UI would use the default port 4200. Behind --host 0.0.0.0,
            # set PREFECT_UI_API_URL=http://<this machine>:PORT/api yourself for remote browsers.
            "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL") or self.prefect_api_url,
            "PREFECT_SERVER_API_HOST": self.host,
            "PREFECT_SERVER_API_PORT": str(self.prefect_port),
        }

    def _mlflow_server_env(self, store_uri: str) -> dict[str, str]:
        return {
            **self._base_env(),
            "MLFLOW_BACKEND_STORE_URI": store_uri,  # = --backend-store-uri, kept out of `ps`
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner: ~0.5 GB instead of ~2.8 GB
        }

    def _client_env(self) -> dict[str, str]:
        return {**self._base_env(), **self.env, "PREFECT_CLI_PROMPT": "false"}

    def _worker_env(self) -> dict[str, str]:
        env = self._client_env()
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", WORKER_QUERY_SECONDS)  # the user's setting wins
        if self.heartbeat_seconds:
            # Not the user's setting: the crash automation's window is derived from this interval.
            # The flow-run processes inherit it (Prefect's process worker passes its environment on).
            env.pop("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", None)  # Prefect's legacy name for it
            env[HEARTBEAT_ENV] = str(self.heartbeat_seconds)
        return env

    # Workers -----------------------------------------------------------------------------------
    @property
    def worker_names(self) -> list[str]:
        """The names our workers register with (none with worker=False)."""
        return worker_names(self.workers) if self.workers else []

    def _worker_slots(self) -> list[tuple[str, str, Path]]:
        """(child key, worker name, log file) per worker: 'worker'/worker.log for the only one (as
        always), else 'worker-1'/worker-1.log, ..."""
        names = self.worker_names
        if len(names) == 1:
            return [("worker", names[0], self.log_dir / "worker.log")]
        return [(f"worker-{i}", name, self.log_dir / f"worker-{i}.log") for i, name in enumerate(names, 1)]

    def _worker_children(self) -> list[_Child | None]:
        return [self._children.get(key) for key, _, _ in self._worker_slots()]

    # Lifecycle ---------------------------------------------------------------------------------
    def start(self, stop_event: threading.Event | None = None) -> Services:
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
        mlflow_store, prefect_db = self._preflight()
        t0 = time.monotonic()
        death = signal.SIGTERM if self._die_with_parent else None
        secrets = self._secrets()
        self._log(f"starting Prefect and MLflow servers in {self.data_dir} (logs in {self.log_dir})")
        self._children["prefect"] = _spawn(
            "Prefect server",
            prefect_server_command(self.host, self.prefect_port),
            env=self._prefect_server_env(prefect_db),
            cwd=self.prefect_home,
            log=self.log_dir / "prefect-server.log",
            death_signal=death,
            secrets=secrets,
        )
        self._children["mlflow"] = _spawn(
            "MLflow server",
            mlflow_server_command(self.host, self.mlflow_port, str(self.mlflow_dir / "artifacts")),
            env=self._mlflow_server_env(mlflow_store),
            cwd=self.mlflow_dir,
            log=self.log_dir / "mlflow-server.log",
            death_signal=death,
            secrets=secrets,
        )
        health = {
            "prefect": f"{self.prefect_api_url}/health",
            "mlflow": f"{self.mlflow_url}/health",
        }
        slots = self._worker_slots()
        pending = ["prefect", "mlflow", "pool", "automation"] + [key for key, _, _ in slots]
        deadline = t0 + self.timeout
        worker_started_at: datetime | None = None
        while pending:
            if stop_event is not None and stop_event.is_set():
                raise KeyboardInterrupt
            for key, child in self._children.items():
                if key != "pool" and not child.alive:
                    raise ServiceError(
                        f"{child.name} exited during start-up (exit code {child.proc.returncode}); "
                        + child.tail()
                    )
            for key in ("prefect", "mlflow"):
                if key in pending and _healthy(health[key]):
                    pending.remove(key)
                    self._log(
                        f"{self._children[key].name} is up at {health[key]} ({time.monotonic() - t0:.1f} s)"
                    )
            if "pool" in pending and "prefect" not in pending:
                pool = self._children.get("pool")
                if pool is None:
                    self._children["pool"] = _spawn(
                        f"work pool creation ({self.work_pool})",
                        work_pool_command(self.work_pool),
                        env=self._client_env(),
                        cwd=self.data_dir,
                        log=self.log_dir / "work-pool.log",
                        death_signal=death,
                    )
                    # While that CLI starts (seconds), a few quick requests: the crash automation.
                    self._sync_crash_automation()
                    pending.remove("automation")
                    self._log(self._automation_line(time.monotonic() - t0))
                elif not pool.alive:
                    if pool.proc.returncode != 0:
                        raise ServiceError(
                            f"creating work pool {self.work_pool!r} failed "
                            f"(exit code {pool.proc.returncode}); {pool.tail()}"
                        )
                    pending.remove("pool")
                    self._log(
                        f"work pool {self.work_pool!r} (process) is ready ({time.monotonic() - t0:.1f} s)"
                    )
                    worker_started_at = datetime.now().astimezone() - timedelta(seconds=1)
                    for key, name, log in slots:
                        self._children[key] = _spawn(
                            f"Prefect worker {name!r}",
                            worker_command(self.work_pool, name, self.worker_limit),
                            env=self._worker_env(),
                            cwd=Path.cwd(),
                            log=log,
                            death_signal=signal.SIGKILL if self._die_with_parent else None,
                        )
            waiting = [(key, name) for key, name, _ in slots if key in pending]
            if waiting and worker_started_at is not None:
                online = self._online_workers(worker_started_at)
                for key, name in waiting:
                    if name in online:
                        pending.remove(key)
                        self._log(
                            f"worker {name!r} is polling {self.work_pool!r} ({time.monotonic() - t0:.1f} s)"
                        )
            if pending and time.monotonic() > deadline:
                raise self._timeout_error(pending[0], health)
            if pending:
                time.sleep(0.2)
        self.startup_seconds = time.monotonic() - t0

    def _sync_crash_automation(self) -> None:
        try:
            self.crash_automation_status = sync_crash_automation(self.prefect_api_url, self.heartbeat_seconds)
        except ServiceError as exc:
            raise ServiceError(
                f"could not set up the automation {CRASH_AUTOMATION_NAME!r} on the Prefect server: {exc}"
            ) from None

    def _automation_line(self, seconds: float) -> str:
        status = self.crash_automation_status
        if not self.heartbeat_seconds:
            what = "disabled" if status == "disabled" else "not set up"
            return f"automation {CRASH_AUTOMATION_NAME!r} {what} (--heartbeat-seconds 0) ({seconds:.1f} s)"
        return (
            f"automation {CRASH_AUTOMATION_NAME!r} {status}: flow runs of deployments silent for "
            f"{self.crash_after_seconds} s are marked Crashed ({seconds:.1f} s)"
        )

    def _timeout_error(self, what: str, health: dict[str, str]) -> ServiceError:
        child = self._children.get(what)
        if what in health:
            message = f"{child.name} did not answer {health[what]} within {self.timeout:.0f} s"
        elif what == "pool":
            message = f"creating work pool {self.work_pool!r} did not finish within {self.timeout:.0f} s"
            child = child or self._children["prefect"]
        else:
            name = dict((key, name) for key, name, _ in self._worker_slots()).get(what, what)
            message = (
                f"the Prefect worker {name!r} did not come online in pool {self.work_pool!r} "
                f"within {self.timeout:.0f} s"
            )
        return ServiceError(f"{message}; {child.tail() if child else ''}")

    def worker_statuses(self) -> dict[str, dict]:
        """The Prefect server's records of our workers (name, status, last_heartbeat_time), by name."""
        pool = urllib.parse.quote(self.work_pool, safe="")
        try:
            workers = _http(f"{self.prefect_api_url}/work_pools/{pool}/workers/filter", body={})
        except (OSError, ValueError, http.client.HTTPException):
            return {}
        ours = set(self.worker_names)
        return {w["name"]: w for w in (workers if isinstance(workers, list) else []) if w.get("name") in ours}

    def worker_status(self) -> dict | None:
        """The server's record of our (first) worker, or None."""
        names = self.worker_names
        return self.worker_statuses().get(names[0]) if names else None

    def _online_workers(self, since: datetime) -> set[str]:
        """Our workers that are ONLINE with a heartbeat since `since` (not one left from a previous start)."""
        online = set()
        for name, worker in self.worker_statuses().items():
            if worker.get("status") != "ONLINE" or not worker.get("last_heartbeat_time"):
                continue
            try:
                beat = datetime.fromisoformat(worker["last_heartbeat_time"])
            except ValueError:
                continue
            if beat >= since:
                online.add(name)
        return online

    def failed(self) -> list[_Child]:
        """Long-running children that have exited (they should not while started)."""
        return [c for key, c in self._children.items() if key != "pool" and not c.alive]

    def stop(self) -> float:
        """Stop the workers (all at once), then both servers; returns the seconds it took. Idempotent."""
        t0 = time.monotonic()
        if self._children:
            _terminate([*self._worker_children(), self._children.get("pool")], WORKER_STOP_SCHEDULE)
            _terminate([self._children.get("prefect"), self._children.get("mlflow")], SERVER_STOP_SCHEDULE)
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


def _same_database(a: str, b: str) -> bool:
    pa, pb = urllib.parse.urlsplit(a), urllib.parse.urlsplit(b)
    return (pa.hostname, pa.port or 5432, pa.path.strip("/")) == (
        pb.hostname,
        pb.port or 5432,
        pb.path.strip("/"),
    )


@contextmanager
def start_services(data_dir: str | os.PathLike, **kwargs) -> Iterator[Services]:
    """Start the stack (see `Services` for the keyword arguments); stopped on exit."""
    services = Services(data_dir, **kwargs)
    services.start()
    try:
        yield services
    finally:
        services.stop()


# --------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", required=True, type=Path, metavar="DIR",
        help="where the servers keep their data (prefect/, mlflow/, logs/); reused on restart",
    )  # fmt: skip
    parser.add_argument("--prefect-port", type=int, default=DEFAULT_PREFECT_PORT, metavar="PORT")
    parser.add_argument("--mlflow-port", type=int, default=DEFAULT_MLFLOW_PORT, metavar="PORT")
    parser.add_argument(
        "--db", metavar="URL", default=None,
        help=f"PostgreSQL URL for MLflow's backend store (default: ${DB_URL_ENV}, else SQLite in DIR/mlflow)",
    )  # fmt: skip
    parser.add_argument(
        "--prefect-db", metavar="URL", default=None,
        help=f"PostgreSQL URL for the Prefect server's database, not the same database as --db "
        f"(default: ${PREFECT_DB_URL_ENV}, else SQLite in DIR/prefect)",
    )  # fmt: skip
    parser.add_argument(
        "--host", default=DEFAULT_HOST,
        help="address both servers bind (default: %(default)s); with 0.0.0.0 also set PREFECT_UI_API_URL "
        "to http://<this machine>:PORT/api so remote browsers reach the Prefect API",
    )  # fmt: skip
    parser.add_argument(
        "--work-pool", default=DEFAULT_WORK_POOL, metavar="NAME", help="process work pool to create"
    )
    parser.add_argument("--no-worker", action="store_true", help="create the work pool but start no worker")
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help=f"process workers to start (default: %(default)s, named {WORKER_NAME!r}; with N > 1 "
        f"{WORKER_NAME}-1 .. -N), e.g. 2 to spread `sngp sweep --runner workpool` over two",
    )  # fmt: skip
    parser.add_argument(
        "--worker-limit", type=int, default=DEFAULT_WORKER_LIMIT, metavar="K",
        help="flow runs each worker runs at once (default: %(default)s; 0: no limit, Prefect's default, "
        "where one worker takes every scheduled run it sees). Workers poll every "
        f"{WORKER_QUERY_SECONDS} s unless PREFECT_WORKER_QUERY_SECONDS is set",
    )  # fmt: skip
    parser.add_argument(
        "--heartbeat-seconds", type=int, default=DEFAULT_HEARTBEAT_SECONDS, metavar="S",
        help="the workers' flow runs send a heartbeat every S seconds (PREFECT_FLOWS_HEARTBEAT_FREQUENCY; "
        f"default: %(default)s, Prefect's minimum: {MIN_HEARTBEAT_SECONDS}); a flow run of a deployment "
        f"silent for 3 S + {CRASH_MARGIN_SECONDS} seconds (its worker or machine died) is marked Crashed "
        f"by the automation {CRASH_AUTOMATION_NAME!r}, which sngp serve creates or updates. "
        "0: no heartbeat setting, the automation is disabled",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help="how long to wait for everything to come up (default: %(default)s)",
    )  # fmt: skip


def _say(message: str) -> None:
    print(f"sngp serve: {message}", flush=True)


def main(args: argparse.Namespace) -> int:
    services = Services(
        args.data_dir,
        host=args.host,
        prefect_port=args.prefect_port,
        mlflow_port=args.mlflow_port,
        db_url=args.db or os.environ.get(DB_URL_ENV) or None,
        prefect_db_url=args.prefect_db or os.environ.get(PREFECT_DB_URL_ENV) or None,
        work_pool=args.work_pool,
        worker=not args.no_worker,
        workers=args.workers,
        worker_limit=args.worker_limit or None,  # 0: no limit
        heartbeat_seconds=args.heartbeat_seconds,
        timeout=args.timeout,
        log=_say,
    )
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        stop.set()

    handled = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        services.start(stop_event=stop)
        _print_ready(services)
        while not stop.wait(1.0):
            failed = services.failed()
            if failed:
                child = failed[0]
                print(
                    f"sngp serve: error: {child.name} stopped unexpectedly "
                    f"(exit code {child.proc.returncode}); "
                    f"{child.tail()}\nsngp serve: stopping the other services",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
        what = "workers" if services.workers > 1 else "worker"
        _say(f"received {signal.Signals(received[0]).name}, stopping the {what}, then the servers")
    finally:
        seconds = services.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _say(f"stopped ({seconds:.1f} s); data kept in {services.data_dir}")
    return 0


def _print_ready(services: Services) -> None:
    names = services.worker_names
    limit = (
        f"{services.worker_limit} flow run{'s' if services.worker_limit != 1 else ''} at a time"
        if services.worker_limit
        else "no limit on flow runs"
    )
    if not names:
        worker = " (no worker: --no-worker)"
    elif len(names) == 1:
        worker = f", worker {names[0]!r} ({limit})"
    else:
        worker = f", workers {', '.join(repr(n) for n in names)} ({limit} each)"
    crash = (
        f"flow runs of deployments are marked Crashed after {services.crash_after_seconds} s without a "
        f"heartbeat (their worker or machine died); heartbeats every {services.heartbeat_seconds} s"
        if services.heartbeat_seconds
        else "off (--heartbeat-seconds 0): flow runs whose worker dies stay Running"
    )
    lines = [
        f"all services are up ({services.startup_seconds:.1f} s)",
        "",
        f"  Prefect UI:   {services.prefect_url}",
        f"  MLflow UI:    {services.mlflow_ui_url}",
        f"  Work pool:    {services.work_pool} (process){worker}",
        f"  Crash check:  {crash}",
        f"  Prefect DB:   {services.prefect_store_display}",
        f"  MLflow store: {services.mlflow_store_display}, artifacts in {services.mlflow_dir / 'artifacts'}",
        f"  Logs:         {services.log_dir}/",
        "",
        "Point clients (sngp run, prefect deploy, mlflow) at these servers with:",
        "",
        f"  export PREFECT_API_URL={services.prefect_api_url} MLFLOW_TRACKING_URI={services.mlflow_url}",
        "",
        "Press Ctrl-C to stop everything.",
    ]
    print(
        "\n".join(f"sngp serve: {line}" if line and i == 0 else line for i, line in enumerate(lines)),
        flush=True,
    )
