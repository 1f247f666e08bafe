"""What each service of `sngp serve` runs: its command line and its environment.

docker/compose.yaml runs the same commands as separate containers (tests/servers/test_serve.py checks
that they agree). Database URLs, which carry passwords, go through the environment, never argv.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_WORK_POOL = "sngp-pool"
WORKER_NAME = "sngp-serve-worker"  # the only worker's name; with N workers: WORKER_NAME-1 .. -N
DEFAULT_WORKER_LIMIT = 1  # flow runs at once per worker (None: Prefect's default, no limit)
WORKER_QUERY_SECONDS = "2"  # how often workers poll for scheduled runs (Prefect's default: 10 s)
DB_URL_ENV = "SNGP_DB_URL"  # MLflow backend store (PostgreSQL) when --db is not given
PREFECT_DB_URL_ENV = "SNGP_PREFECT_DB_URL"  # Prefect server database when --prefect-db is not given
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"  # seconds between a flow run's heartbeats
# Each worker's own name, for its flow runs (they inherit the worker's environment) and their tasks.
WORKER_NAME_ENV = "SNGP_WORKER_NAME"

# Database settings a user's shell may carry; the servers get exactly the ones we set.
_DATABASE_ENV_PREFIXES = ("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_")
_DATABASE_ENV = ("MLFLOW_BACKEND_STORE_URI", DB_URL_ENV, PREFECT_DB_URL_ENV)


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


def worker_names(count: int) -> list[str]:
    """`sngp-serve-worker` for one worker (the name it always had), else sngp-serve-worker-1 .. -N."""
    return [WORKER_NAME] if count == 1 else [f"{WORKER_NAME}-{i}" for i in range(1, count + 1)]


# --------------------------------------------------------------------------------------------------
# Environments


def base_env(prefect_home: Path) -> dict[str, str]:
    """This process's environment without database credentials, with the stack's PREFECT_HOME."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_DATABASE_ENV_PREFIXES) and key not in _DATABASE_ENV
    }
    env["PREFECT_HOME"] = str(prefect_home)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def prefect_server_env(base: dict[str, str], database_url: str, host: str, port: int, api_url: str) -> dict:
    return {
        **base,
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_API_URL": api_url,
        # What the browser calls: else the UI would use the default port 4200. Behind --host 0.0.0.0,
        # set PREFECT_UI_API_URL=http://<this machine>:PORT/api yourself for remote browsers.
        "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL") or api_url,
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
    }


def mlflow_server_env(base: dict[str, str], store_uri: str) -> dict[str, str]:
    return {
        **base,
        "MLFLOW_BACKEND_STORE_URI": store_uri,  # = --backend-store-uri, kept out of `ps`
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner: ~0.5 GB instead of ~2.8 GB
    }


def client_env(base: dict[str, str], prefect_api_url: str, mlflow_url: str) -> dict[str, str]:
    """A Prefect CLI call or worker of the stack: both servers' URLs, never a prompt."""
    return {
        **base,
        "PREFECT_API_URL": prefect_api_url,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "PREFECT_CLI_PROMPT": "false",
    }


def worker_env(client: dict[str, str], name: str, heartbeat_seconds: int | None) -> dict[str, str]:
    """One worker: its name in WORKER_NAME_ENV, our poll interval unless the user set one, and the
    heartbeat interval the crash automation's window is derived from (the flow-run processes inherit
    it: Prefect's process worker passes its environment on). heartbeat_seconds None: the user's."""
    env = {**client, WORKER_NAME_ENV: name}
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", WORKER_QUERY_SECONDS)
    if heartbeat_seconds:
        env.pop("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", None)  # Prefect's legacy name for it
        env[HEARTBEAT_ENV] = str(heartbeat_seconds)
    return env
