"""What one `sngp serve` stack is, before anything runs: its settings, where its data and logs go, the
URLs clients use, each worker's environment, and the checks made before anything starts."""

from __future__ import annotations

import os
from pathlib import Path

from flows.ops import commands
from flows.ops.automation import MIN_HEARTBEAT_SECONDS, crash_after_seconds
from flows.ops.commands import DEFAULT_HOST, DEFAULT_MLFLOW_PORT, DEFAULT_PREFECT_PORT, DEFAULT_WORK_POOL
from flows.ops.databases import PostgresURLs, check_database
from flows.ops.errors import ServiceError
from flows.ops.network import check_port_free, client_url
from tasks.redaction import redact_url

DEFAULT_TIMEOUT = 120.0
DEFAULT_HEARTBEAT_SECONDS = 30


class StackSettings:
    """The settings of a stack (the keyword arguments of `Services`) and what follows from them.

    heartbeat_seconds: the interval of the workers' flow-run heartbeats, which the crash automation
    follows; None or 0: no crash automation (an existing one is disabled), Prefect's own heartbeat setting.
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
        worker_limit: int | None = commands.DEFAULT_WORKER_LIMIT,
        timeout: float = DEFAULT_TIMEOUT,
        heartbeat_seconds: int | None = DEFAULT_HEARTBEAT_SECONDS,
    ):
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.host = host
        self.prefect_port = int(prefect_port)
        self.mlflow_port = int(mlflow_port)
        # The URLs clients use (`env` gives them to a client process).
        self.prefect_url = client_url(host, self.prefect_port)
        self.prefect_api_url = f"{self.prefect_url}/api"
        self.mlflow_url = client_url(host, self.mlflow_port)
        self.db_url = db_url
        self.prefect_db_url = prefect_db_url
        self.work_pool = work_pool
        self.worker = worker  # False: no worker at all (as workers=0)
        self.workers = int(workers) if worker else 0
        self.worker_limit = worker_limit
        self.timeout = timeout
        self.heartbeat_seconds = int(heartbeat_seconds) if heartbeat_seconds else None

    # URLs and places ---------------------------------------------------------------------------
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
        if self.prefect_db_url:
            return redact_url(self.prefect_db_url)
        return f"sqlite:///{self.prefect_home / 'prefect.db'}"

    @property
    def prefect_home(self) -> Path:
        return self.data_dir / "prefect"

    @property
    def mlflow_dir(self) -> Path:
        return self.data_dir / "mlflow"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    # Workers -----------------------------------------------------------------------------------
    @property
    def worker_names(self) -> list[str]:
        """The names our workers register with (none with worker=False)."""
        return commands.worker_names(self.workers) if self.workers else []

    def _worker_slots(self) -> list[tuple[str, str, Path]]:
        """(child key, worker name, log file) per worker: 'worker'/worker.log for the only one, else
        'worker-1'/worker-1.log, ..."""
        names = self.worker_names
        if len(names) == 1:
            return [("worker", names[0], self.log_dir / "worker.log")]
        return [(f"worker-{i}", name, self.log_dir / f"worker-{i}.log") for i, name in enumerate(names, 1)]

    def worker_env(self, name: str) -> dict[str, str]:
        """The environment the worker `name` runs with (its flow runs inherit it)."""
        return commands.worker_env(self._client_env(), name, self.heartbeat_seconds)

    def _client_env(self) -> dict[str, str]:
        return commands.client_env(
            commands.base_env(self.prefect_home), self.prefect_api_url, self.mlflow_url
        )

    # Checks ------------------------------------------------------------------------------------
    def check_options(self) -> None:
        """ServiceError naming the option unless every setting is usable (ports free, ...)."""
        if self.prefect_port == self.mlflow_port:
            raise ServiceError(
                f"--prefect-port and --mlflow-port are both {self.prefect_port}; choose two ports"
            )
        if not self.work_pool.strip():
            raise ServiceError("--work-pool must not be empty")
        if self.worker and self.workers < 1:
            raise ServiceError(f"--workers must be at least 1 (got {self.workers}); use --no-worker for none")
        if self.worker_limit is not None and self.worker_limit < 1:
            raise ServiceError(f"--worker-limit must be at least 1 (got {self.worker_limit})")
        if self.heartbeat_seconds is not None and self.heartbeat_seconds < MIN_HEARTBEAT_SECONDS:
            raise ServiceError(
                f"--heartbeat-seconds must be at least {MIN_HEARTBEAT_SECONDS} (Prefect's minimum), or 0 to "
                f"turn the detection of unresponsive flow runs off (got {self.heartbeat_seconds})"
            )
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise ServiceError(f"--data-dir {self.data_dir} exists and is not a directory")
        check_port_free(self.host, self.prefect_port, "--prefect-port")
        check_port_free(self.host, self.mlflow_port, "--mlflow-port")

    def databases(self) -> tuple[str, str, tuple[str, ...]]:
        """(MLflow store URI, Prefect database URL, passwords to hide in logs); PostgreSQL ones checked."""
        mlflow_pg = PostgresURLs.parse(self.db_url, "--db") if self.db_url else None
        prefect_pg = PostgresURLs.parse(self.prefect_db_url, "--prefect-db") if self.prefect_db_url else None
        if mlflow_pg and prefect_pg and mlflow_pg.same_database(prefect_pg):
            raise ServiceError(
                "--db and --prefect-db must be different databases (MLflow and Prefect each keep "
                "their own schema migrations)"
            )
        if mlflow_pg:
            check_database(mlflow_pg.libpq, "MLflow")
        if prefect_pg:
            check_database(prefect_pg.libpq, "Prefect")
        secrets = (mlflow_pg.secrets if mlflow_pg else ()) + (prefect_pg.secrets if prefect_pg else ())
        return (
            mlflow_pg.mlflow if mlflow_pg else f"sqlite:///{self.mlflow_dir / 'mlflow.db'}",
            prefect_pg.prefect if prefect_pg else f"sqlite+aiosqlite:///{self.prefect_home / 'prefect.db'}",
            tuple(sorted(set(secrets), key=len, reverse=True)),
        )
