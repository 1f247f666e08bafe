"""`sngp serve` against real servers: a Prefect server, an MLflow tracking server and a process worker,
on free loopback ports and temporary data directories (SQLite, and PostgreSQL in a throwaway cluster).

What a user relies on: the printed URLs answer, the work pool exists and a worker polls it, MLflow
records land on the server, SIGTERM stops every child and frees the ports, a restart on the same data
directory keeps the records, a busy port fails at once with a clear message, and database passwords
are never shown. docker/compose.yaml is checked to start the same commands.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest
import yaml
from support.cli import clean_server_env
from support.net import http_bytes, http_json, port_free, two_ports
from support.pgcluster import free_port, pg_cluster_or_skip
from support.stack import ServeProcess, alive, children_of, cmdline, serve_processes, use_server_env

from flows.ops import commands
from flows.ops.databases import PostgresURLs
from flows.ops.errors import ServiceError
from flows.ops.stack import Services, start_services

ROOT = Path(__file__).resolve().parents[2]
STOP_WITHIN = 15.0


def _ours(ports: tuple[int, ...]) -> dict[int, str]:
    """Children of this (pytest) process serving on `ports`."""
    return {
        pid: cmd for pid, cmd in children_of(os.getpid()).items() if any(str(port) in cmd for port in ports)
    }


@pytest.fixture
def serve(tmp_path):
    """Factory: serve(*args, env=...) -> a launched ServeProcess (`sngp serve --data-dir tmp_path/stack` on
    free ports, .prefect_port and .mlflow_port); anything still running is stopped afterwards."""
    with serve_processes(tmp_path / "stack") as launch:
        yield launch


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
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {pid: cmd for pid, cmd in children.items() if alive(pid)}
    assert not left, f"still running after sngp serve exited: {left}"
    for port in ports:
        assert port_free(port), f"port {port} still in use"


# ---------------------------------------------------------------------------------------------------


def test_serve_lifecycle_sqlite_and_restart_keeps_data(tmp_path, serve, mlflow_client_env, monkeypatch):
    data = tmp_path / "stack"
    first = serve()
    prefect_port, mlflow_port = first.prefect_port, first.mlflow_port
    ports_used = (prefect_port, mlflow_port)
    prefect_api, tracking_uri = first.wait_ready()
    assert prefect_api == f"http://127.0.0.1:{prefect_port}/api"
    assert tracking_uri == f"http://127.0.0.1:{mlflow_port}"
    assert f"Prefect UI:   http://127.0.0.1:{prefect_port}\n" in first.output
    assert f"http://127.0.0.1:{mlflow_port}/#/experiments?workflowType=machine_learning" in first.output

    assert http_json(f"{prefect_api}/health") is True
    assert http_bytes(f"{tracking_uri}/health") == b"OK"
    # The UI must call this server's API, not the default port.
    assert http_json(f"http://127.0.0.1:{prefect_port}/ui-settings")["api_url"] == prefect_api

    pool = http_json(f"{prefect_api}/work_pools/sngp-pool")
    assert pool["type"] == "process"
    workers = http_json(f"{prefect_api}/work_pools/sngp-pool/workers/filter", body={})
    assert [w["status"] for w in workers if w["name"] == "sngp-serve-worker"] == ["ONLINE"]

    run_id = _log_run(tracking_uri, "serve-check")
    uploaded = list((data / "mlflow" / "artifacts").rglob("notes/hello.txt"))
    assert len(uploaded) == 1 and uploaded[0].read_text() == "uploaded through the server"
    assert (data / "mlflow" / "mlflow.db").exists() and (data / "prefect" / "prefect.db").exists()
    for log in ("prefect-server.log", "mlflow-server.log", "work-pool.log", "worker.log"):
        assert (data / "logs" / log).stat().st_size > 0, log

    services = {role: first.service_pid(role) for role in ("prefect", "mlflow", "worker")}
    code, seconds, children = first.terminate(STOP_WITHIN)
    assert code == 0, first.output
    assert set(services.values()) <= set(children), (services, children)
    commands = " | ".join(children.values())
    for expected in ("prefect server start", "mlflow server", "prefect worker start"):
        assert expected in commands
    assert seconds < STOP_WITHIN
    _assert_all_stopped(children, (prefect_port, mlflow_port))
    assert "stopped (" in first.output

    # Restart on the same data dir and (now free) ports, in-process through the Python API this time:
    # the run, its artifact and the work pool are still there.
    use_server_env(monkeypatch)
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
        assert http_json(f"{services.prefect_api_url}/work_pools/sngp-pool")["type"] == "process"
        assert not [cmd for cmd in _ours(ports_used).values() if "worker start" in cmd]  # worker=False

        # A second launcher on the same data dir is refused (other ports, so the lock is what stops it).
        result = ServeProcess(data).run_to_exit()
        assert result.returncode == 2
        assert "another `sngp serve` is already running on --data-dir" in result.stderr
    stop_seconds = services.stop()  # already stopped by the context manager: idempotent
    assert stop_seconds < 1
    assert not _ours(ports_used)
    assert port_free(prefect_port) and port_free(mlflow_port)
    print(
        f"\nfirst start {first.startup_seconds:.1f} s, stop {seconds:.1f} s, restart {restart_seconds:.1f} s"
    )


@pytest.mark.parametrize("busy", ["--prefect-port", "--mlflow-port"])
def test_port_in_use_fails_fast_with_a_clear_message(tmp_path, busy):
    serve = ServeProcess(tmp_path / "d")
    taken = serve.prefect_port if busy == "--prefect-port" else serve.mlflow_port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        started = time.monotonic()
        result = serve.run_to_exit()
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
    result = ServeProcess(tmp_path / "d", *args).run_to_exit()
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
    closed = free_port()
    url = f"postgresql://alice:s3cret-pw@127.0.0.1:{closed}/mlflow"
    result = ServeProcess(tmp_path / "d", "--db", url).run_to_exit()
    assert result.returncode == 2
    assert (
        f"cannot connect to the MLflow database postgresql://alice:***@127.0.0.1:{closed}/mlflow"
        in result.stderr
    )
    assert "s3cret-pw" not in result.stdout + result.stderr
    bad = ServeProcess(tmp_path / "d", "--db", "mysql://bob:pw@db/x").run_to_exit()
    assert bad.returncode == 2 and "--db must be a PostgreSQL URL" in bad.stderr and ":pw@" not in bad.stderr


def test_serve_on_postgres_keeps_the_password_out_of_output_logs_and_argv(tmp_path, serve, mlflow_client_env):
    with pg_cluster_or_skip() as cluster:
        mlflow_db = cluster.create_database("mlflow")
        prefect_db = cluster.create_database("prefect")
        data = tmp_path / "stack"
        # --db through its environment variable, --prefect-db on the command line: both paths.
        process = serve("--prefect-db", prefect_db, env=clean_server_env(SNGP_DB_URL=mlflow_db))
        prefect_api, tracking_uri = process.wait_ready()
        assert f"Prefect DB:   postgresql://sngp:***@127.0.0.1:{cluster.port}/prefect" in process.output
        assert f"MLflow store: postgresql://sngp:***@127.0.0.1:{cluster.port}/mlflow" in process.output
        children = process.children()
        assert not [cmd for cmd in children.values() if cluster.password in cmd]
        assert cmdline(process.proc.pid).count(cluster.password) == 1  # only the --prefect-db we passed

        run_id = _log_run(tracking_uri, "serve-postgres")
        workers = http_json(f"{prefect_api}/work_pools/sngp-pool/workers/filter", body={})
        assert [w["status"] for w in workers if w["name"] == "sngp-serve-worker"] == ["ONLINE"]

        import psycopg2

        with psycopg2.connect(mlflow_db) as conn, conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
            assert cur.fetchall() == [("FINISHED",)]
        with psycopg2.connect(prefect_db) as conn, conn.cursor() as cur:
            cur.execute("SELECT name, type FROM work_pool WHERE name = 'sngp-pool'")
            assert cur.fetchall() == [("sngp-pool", "process")]

        code, _seconds, children = process.terminate(STOP_WITHIN)
        assert code == 0, process.output
        _assert_all_stopped(children, (process.prefect_port, process.mlflow_port))
        assert not (data / "mlflow" / "mlflow.db").exists() and not (data / "prefect" / "prefect.db").exists()
        logs = "".join(p.read_text(errors="replace") for p in (data / "logs").glob("*.log"))
        assert "Uvicorn running" in logs or "Application startup complete" in logs
        assert cluster.password not in logs
        assert cluster.password not in process.output


def test_python_api_names_the_server_that_failed_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    prefect_port, mlflow_port = two_ports()
    failing = Services(tmp_path / "a", prefect_port=prefect_port, mlflow_port=mlflow_port, timeout=0.5)
    with pytest.raises(ServiceError) as error:
        failing.start()
    message = str(error.value)
    assert re.match(
        rf"Prefect server did not answer http://127\.0\.0\.1:{prefect_port}/api/health within 0 s", message
    )
    assert f"last lines of {tmp_path / 'a' / 'logs' / 'prefect-server.log'}" in message
    assert not _ours((prefect_port, mlflow_port))  # the MLflow server it had started is gone too
    assert port_free(prefect_port) and port_free(mlflow_port)


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
