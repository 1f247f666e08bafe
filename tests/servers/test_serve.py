"""`sngp serve` against real servers: a Prefect server, an MLflow tracking server and a process worker,
on free loopback ports and temporary data directories (SQLite, and PostgreSQL in a throwaway cluster).

What a user relies on: the printed URLs answer, the work pool exists and a worker polls it, MLflow
records land on the server, SIGTERM stops every child and frees the ports, a restart on the same data
directory keeps the records, a busy port fails at once with a clear message, and database passwords
are never shown. docker/compose.yaml is checked to start the same commands.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from support.pgcluster import PgCluster, PostgresUnavailable, free_port

from flows.ops import commands
from flows.ops.databases import PostgresURLs
from flows.ops.errors import ServiceError
from flows.ops.stack import Services, start_services

ROOT = Path(__file__).resolve().parents[2]
SNGP = Path(sys.executable).parent / "sngp"  # the venv's console script
STARTUP_TIMEOUT = 180.0
STOP_WITHIN = 15.0

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _env(**extra: str) -> dict[str, str]:
    """A clean environment for `sngp serve`: no client/server URLs inherited from the developer's shell."""
    drop = {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "SNGP_DB_URL", "SNGP_PREFECT_DB_URL"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", **extra)
    return env


def _get(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _NO_PROXY.open(request, timeout=10) as response:
        text = response.read().decode()
    try:
        return json.loads(text)
    except ValueError:
        return text


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _two_ports() -> tuple[int, int]:
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    return first, second


def _children_of(root: int) -> dict[int, str]:
    """{pid: command line} of every live descendant of `root` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = _cmdline(pid)
                frontier.append(pid)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ours(ports: tuple[int, ...]) -> dict[int, str]:
    """Children of this (pytest) process serving on `ports`."""
    return {
        pid: cmd for pid, cmd in _children_of(os.getpid()).items() if any(str(port) in cmd for port in ports)
    }


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class ServeProcess:
    """`sngp serve ...` as a subprocess, its output collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.args = args
        self.proc = subprocess.Popen(
            [str(SNGP), "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env or _env(),
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("Press Ctrl-C"):
                self._ready.set()
        self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> tuple[str, str]:
        """(PREFECT_API_URL, MLFLOW_TRACKING_URI) from the printed export line."""
        started = time.monotonic()
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            pytest.fail(f"sngp serve did not come up within {timeout:.0f} s:\n{self.output}")
        match = re.search(r"^  export PREFECT_API_URL=(\S+) MLFLOW_TRACKING_URI=(\S+)$", self.output, re.M)
        assert match, self.output
        self.startup_seconds = time.monotonic() - started
        return match.group(1), match.group(2)

    def terminate(self, timeout: float = STOP_WITHIN) -> tuple[int, float, dict[int, str]]:
        """SIGTERM; (exit code, seconds until exit, children that were running before)."""
        children = _children_of(self.proc.pid)
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"sngp serve still running {timeout:.0f} s after SIGTERM:\n{self.output}")
        self._reader.join(timeout=5)
        return code, time.monotonic() - started, children

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            children = _children_of(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for pid in children:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def serve():
    """Factory: serve(*args, env=...) -> ServeProcess; anything still running is stopped afterwards."""
    started: list[ServeProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
        process = ServeProcess(*args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.cleanup()


@pytest.fixture
def mlflow_client_env(monkeypatch):
    # A dead server should fail a test quickly, not after minutes of client retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def _log_run(tracking_uri: str, experiment: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name="serve-check")
    client.log_param(run.info.run_id, "method", "sngp")
    client.log_metric(run.info.run_id, "test_accuracy", 0.97)
    client.log_text(run.info.run_id, "uploaded through the server", "notes/hello.txt")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _assert_all_stopped(children: dict[int, str], ports: tuple[int, ...]) -> None:
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {pid: cmd for pid, cmd in children.items() if _alive(pid)}
    assert not left, f"still running after sngp serve exited: {left}"
    for port in ports:
        assert _port_free(port), f"port {port} still in use"


# ---------------------------------------------------------------------------------------------------


def test_serve_lifecycle_sqlite_and_restart_keeps_data(tmp_path, serve, mlflow_client_env, monkeypatch):
    data = tmp_path / "stack"
    prefect_port, mlflow_port = _two_ports()
    ports_used = (prefect_port, mlflow_port)
    first = serve(
        "--data-dir", str(data), "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)
    )
    prefect_api, tracking_uri = first.wait_ready()
    assert prefect_api == f"http://127.0.0.1:{prefect_port}/api"
    assert tracking_uri == f"http://127.0.0.1:{mlflow_port}"
    assert f"Prefect UI:   http://127.0.0.1:{prefect_port}\n" in first.output
    assert f"http://127.0.0.1:{mlflow_port}/#/experiments?workflowType=machine_learning" in first.output

    assert _get(f"{prefect_api}/health") is True
    assert _get(f"{tracking_uri}/health") == "OK"
    # The UI must call this server's API, not the default port.
    assert _get(f"http://127.0.0.1:{prefect_port}/ui-settings")["api_url"] == prefect_api

    pool = _get(f"{prefect_api}/work_pools/sngp-pool")
    assert pool["type"] == "process"
    workers = _get(f"{prefect_api}/work_pools/sngp-pool/workers/filter", body={})
    assert [w["status"] for w in workers if w["name"] == "sngp-serve-worker"] == ["ONLINE"]

    run_id = _log_run(tracking_uri, "serve-check")
    uploaded = list((data / "mlflow" / "artifacts").rglob("notes/hello.txt"))
    assert len(uploaded) == 1 and uploaded[0].read_text() == "uploaded through the server"
    assert (data / "mlflow" / "mlflow.db").exists() and (data / "prefect" / "prefect.db").exists()
    for log in ("prefect-server.log", "mlflow-server.log", "work-pool.log", "worker.log"):
        assert (data / "logs" / log).stat().st_size > 0, log

    code, seconds, children = first.terminate()
    assert code == 0, first.output
    commands = " | ".join(children.values())
    for expected in ("prefect server start", "mlflow server", "prefect worker start"):
        assert expected in commands
    assert seconds < STOP_WITHIN
    _assert_all_stopped(children, (prefect_port, mlflow_port))
    assert "stopped (" in first.output

    # Restart on the same data dir and (now free) ports, in-process through the Python API this time:
    # the run, its artifact and the work pool are still there.
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    restarted = time.monotonic()
    with start_services(data, prefect_port=prefect_port, mlflow_port=mlflow_port, worker=False) as services:
        restart_seconds = time.monotonic() - restarted
        assert services.env == {"PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": tracking_uri}
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=services.mlflow_url)
        run = client.get_run(run_id)
        assert run.data.metrics["test_accuracy"] == 0.97 and run.data.params["method"] == "sngp"
        assert run.info.status == "FINISHED"
        downloaded = client.download_artifacts(run_id, "notes/hello.txt", str(tmp_path))
        assert Path(downloaded).read_text() == "uploaded through the server"
        assert _get(f"{services.prefect_api_url}/work_pools/sngp-pool")["type"] == "process"
        assert not [cmd for cmd in _ours(ports_used).values() if "worker start" in cmd]  # worker=False

        # A second launcher on the same data dir is refused (other ports, so the lock is what stops it).
        other_ports = [str(port) for port in _two_ports()]
        result = subprocess.run(
            [str(SNGP), "serve", "--data-dir", str(data), "--prefect-port", other_ports[0],
             "--mlflow-port", other_ports[1]],
            capture_output=True, text=True, env=_env(), timeout=60,
        )  # fmt: skip
        assert result.returncode == 2
        assert "another `sngp serve` is already running on --data-dir" in result.stderr
    stop_seconds = services.stop()  # already stopped by the context manager: idempotent
    assert stop_seconds < 1
    assert not _ours(ports_used)
    assert _port_free(prefect_port) and _port_free(mlflow_port)
    print(
        f"\nfirst start {first.startup_seconds:.1f} s, stop {seconds:.1f} s, restart {restart_seconds:.1f} s"
    )


@pytest.mark.parametrize("busy", ["--prefect-port", "--mlflow-port"])
def test_port_in_use_fails_fast_with_a_clear_message(tmp_path, busy):
    prefect_port, mlflow_port = _two_ports()
    taken = prefect_port if busy == "--prefect-port" else mlflow_port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        started = time.monotonic()
        result = subprocess.run(
            [str(SNGP), "serve", "--data-dir", str(tmp_path / "d"), "--prefect-port", str(prefect_port),
             "--mlflow-port", str(mlflow_port)],
            capture_output=True, text=True, env=_env(), timeout=60,
        )  # fmt: skip
        elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"sngp serve: error: port {taken} is already in use (choose another with {busy})"
    )
    assert elapsed < 15
    assert not (tmp_path / "d").exists()  # nothing started, nothing written


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "--workers must be at least 1 (got 0); use --no-worker for none"),
        (["--worker-limit", "-1"], "--worker-limit must be at least 1 (got -1)"),
    ],
    ids=["no-workers", "negative-limit"],
)
def test_bad_worker_options_fail_fast(tmp_path, args, message):
    prefect_port, mlflow_port = _two_ports()
    result = subprocess.run(
        [str(SNGP), "serve", "--data-dir", str(tmp_path / "d"), "--prefect-port", str(prefect_port),
         "--mlflow-port", str(mlflow_port), *args],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == f"sngp serve: error: {message}"
    assert not (tmp_path / "d").exists()


def test_worker_names_and_commands():
    assert commands.worker_names(1) == ["sngp-serve-worker"]  # the name it always had
    assert commands.worker_names(3) == [f"sngp-serve-worker-{i}" for i in (1, 2, 3)]
    assert commands.worker_command("p", "w", 1)[-4:] == ["--name", "w", "--limit", "1"]
    assert "--limit" not in commands.worker_command("p", "w", None)
    two = Services("/tmp/unused-sngp-data", workers=2)
    assert two.worker_names == ["sngp-serve-worker-1", "sngp-serve-worker-2"]
    # Each worker (and the flow runs it starts, which inherit its environment) knows its own name.
    assert [two.worker_env(name)["SNGP_WORKER_NAME"] for name in two.worker_names] == two.worker_names
    assert Services("/tmp/unused-sngp-data", worker=False).worker_names == []


def test_unreachable_database_fails_fast_and_hides_the_password(tmp_path):
    prefect_port, mlflow_port = _two_ports()
    closed = free_port()
    url = f"postgresql://alice:s3cret-pw@127.0.0.1:{closed}/mlflow"
    result = subprocess.run(
        [str(SNGP), "serve", "--data-dir", str(tmp_path / "d"), "--prefect-port", str(prefect_port),
         "--mlflow-port", str(mlflow_port), "--db", url],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        f"cannot connect to the MLflow database postgresql://alice:***@127.0.0.1:{closed}/mlflow"
        in result.stderr
    )
    assert "s3cret-pw" not in result.stdout + result.stderr
    bad = subprocess.run(
        [str(SNGP), "serve", "--data-dir", str(tmp_path / "d"), "--db", "mysql://bob:pw@db/x"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "--db must be a PostgreSQL URL" in bad.stderr and ":pw@" not in bad.stderr


def test_serve_on_postgres_keeps_the_password_out_of_output_logs_and_argv(tmp_path, serve, mlflow_client_env):
    cluster = PgCluster()
    try:
        cluster.start()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL server binaries are not installed ({exc})")
    try:
        mlflow_db = cluster.create_database("mlflow")
        prefect_db = cluster.create_database("prefect")
        data = tmp_path / "stack"
        prefect_port, mlflow_port = _two_ports()
        # --db through its environment variable, --prefect-db on the command line: both paths.
        process = serve(
            "--data-dir", str(data), "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port),
            "--prefect-db", prefect_db,
            env=_env(SNGP_DB_URL=mlflow_db),
        )  # fmt: skip
        prefect_api, tracking_uri = process.wait_ready()
        assert f"Prefect DB:   postgresql://sngp:***@127.0.0.1:{cluster.port}/prefect" in process.output
        assert f"MLflow store: postgresql://sngp:***@127.0.0.1:{cluster.port}/mlflow" in process.output
        children = _children_of(process.proc.pid)
        assert not [cmd for cmd in children.values() if cluster.password in cmd]
        assert _cmdline(process.proc.pid).count(cluster.password) == 1  # only the --prefect-db we passed

        run_id = _log_run(tracking_uri, "serve-postgres")
        workers = _get(f"{prefect_api}/work_pools/sngp-pool/workers/filter", body={})
        assert [w["status"] for w in workers if w["name"] == "sngp-serve-worker"] == ["ONLINE"]

        import psycopg2

        with psycopg2.connect(mlflow_db) as conn, conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
            assert cur.fetchall() == [("FINISHED",)]
        with psycopg2.connect(prefect_db) as conn, conn.cursor() as cur:
            cur.execute("SELECT name, type FROM work_pool WHERE name = 'sngp-pool'")
            assert cur.fetchall() == [("sngp-pool", "process")]

        code, _seconds, children = process.terminate()
        assert code == 0, process.output
        _assert_all_stopped(children, (prefect_port, mlflow_port))
        assert not (data / "mlflow" / "mlflow.db").exists() and not (data / "prefect" / "prefect.db").exists()
        logs = "".join(p.read_text(errors="replace") for p in (data / "logs").glob("*.log"))
        assert "Uvicorn running" in logs or "Application startup complete" in logs
        assert cluster.password not in logs
        assert cluster.password not in process.output
    finally:
        cluster.stop()


def test_python_api_names_the_server_that_failed_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    prefect_port, mlflow_port = _two_ports()
    failing = Services(tmp_path / "a", prefect_port=prefect_port, mlflow_port=mlflow_port, timeout=0.5)
    with pytest.raises(ServiceError) as error:
        failing.start()
    message = str(error.value)
    assert re.match(
        rf"Prefect server did not answer http://127\.0\.0\.1:{prefect_port}/api/health within 0 s", message
    )
    assert f"last lines of {tmp_path / 'a' / 'logs' / 'prefect-server.log'}" in message
    assert not _ours((prefect_port, mlflow_port))  # the MLflow server it had started is gone too
    assert _port_free(prefect_port) and _port_free(mlflow_port)


def test_postgres_urls_for_each_client():
    urls = PostgresURLs.parse("postgres://u:p%40ss@db/x?sslmode=require", "--db")
    assert urls.libpq == "postgresql://u:p%40ss@db/x?sslmode=require"
    assert urls.mlflow == "postgresql+psycopg2://u:p%40ss@db/x?sslmode=require"
    assert urls.prefect == "postgresql+asyncpg://u:p%40ss@db/x?sslmode=require"
    assert urls.secrets == ("p%40ss", "p@ss")  # as the servers' logs may show it, encoded or not
    assert urls.same_database(PostgresURLs.parse("postgresql+asyncpg://other@db:5432/x", "--prefect-db"))
    assert not urls.same_database(PostgresURLs.parse("postgresql://u@db/y", "--prefect-db"))
    for bad, message in [
        ("postgresql://u:pw@db:99999/x", "--db is not a valid URL: postgresql://u:***@db:99999/x"),
        ("postgresql://u:pw@db:port/x", "--db is not a valid URL"),
        ("postgresql://u:pw@db/", "--db must name a database"),
        ("postgresql:///x", "--db must be a PostgreSQL URL"),
    ]:
        with pytest.raises(ServiceError, match=re.escape(message)):
            PostgresURLs.parse(bad, "--db")


# ---------------------------------------------------------------------------------------------------
# docker/: no Docker engine runs in CI, so check the files say what `sngp serve` does.


def test_compose_starts_what_sngp_serve_starts():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "prefect-server", "work-pool", "worker"}

    mlflow_cmd = services["mlflow"]["command"]
    split = mlflow_cmd.index("--allowed-hosts")
    assert mlflow_cmd[:split] == commands.mlflow_server_command("0.0.0.0", 5000, "/data/mlflow/artifacts")
    assert {"mlflow:*", "localhost:*", "127.0.0.1:*"} <= set(mlflow_cmd[split + 1].split(","))
    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"] == (
        "postgresql+psycopg2://${POSTGRES_USER}:${POSTGRES_PASSWORD}@postgres:5432/mlflow"
    )

    prefect = services["prefect-server"]
    assert prefect["command"] == commands.prefect_server_command("0.0.0.0", 4200)
    assert prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"] == (
        "postgresql+asyncpg://${POSTGRES_USER}:${POSTGRES_PASSWORD}@postgres:5432/prefect"
    )
    assert services["work-pool"]["command"] == commands.work_pool_command("sngp-pool")
    assert services["work-pool"]["restart"] == "no"
    worker = services["worker"]
    assert worker["command"] == commands.worker_command(
        "sngp-pool", name=None, limit=commands.DEFAULT_WORKER_LIMIT
    )
    assert worker["environment"]["PREFECT_WORKER_QUERY_SECONDS"] == commands.WORKER_QUERY_SECONDS
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["depends_on"]["work-pool"]["condition"] == "service_completed_successfully"
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N

    published = {name: svc.get("ports", []) for name, svc in services.items() if svc.get("ports")}
    assert set(published) == {"mlflow", "prefect-server"}  # never the database
    assert all(port.startswith("127.0.0.1:") for ports in published.values() for port in ports)
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    for name in ("mlflow", "prefect-server", "work-pool", "worker"):
        assert services[name]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}


def test_docker_files_hold_no_secrets_and_run_as_non_root():
    text = (ROOT / "docker" / "compose.yaml").read_text()
    assert "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?" in text  # from docker/.env, required
    example = dict(
        line.split("=", 1)
        for line in (ROOT / "docker" / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD"} <= set(example)
    assert "change-me" in example["POSTGRES_PASSWORD"]
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile and "TF_USE_LEGACY_KERAS=1" in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
