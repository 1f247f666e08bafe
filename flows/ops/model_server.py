"""One model behind MLflow's scoring server, the process of `sngp serve-model` (POST /invocations, GET /ping):
the app `mlflow models serve -m URI --env-manager local` runs (`mlflow.pyfunc.scoring_server`), served by
uvicorn in this interpreter (flows/ops/scoring_app.py), whose error answers carry no stack trace.

The child is `<this python> -m uvicorn flows.ops.scoring_app:app`, with this interpreter's bin directory
first on its PATH, so `.venv/bin/sngp serve-model` works without an activated venv. The model runs in this
environment, which already has every requirement it pins (no virtualenv is built per model).

    server = ModelServer("models:/sngp-uncertainty-sngp@champion", port=5001, env=model_server_env())
    server.start()          # ServiceError: port taken, the server exited or did not answer in time
    ...                     # http://127.0.0.1:5001/invocations
    server.stop()
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from flows.ops import processes
from flows.ops.errors import ServiceError
from flows.ops.network import answers, check_port_free, client_url

MODEL_URI_ENV = "SNGP_SERVE_MODEL_URI"  # flows/ops/scoring_app.py serves the model it names

DEFAULT_MODEL_PORT = 5001
READY_TIMEOUT = 180.0  # loading TensorFlow and the model takes ~20 s on 2 cores
STOP_SCHEDULE = ((signal.SIGTERM, 5.0),)


def model_server_command(host: str, port: int, workers: int = 1) -> list[str]:
    """uvicorn serving flows/ops/scoring_app.py (the model: $SNGP_SERVE_MODEL_URI, see model_server_env)."""
    return [
        sys.executable, "-m", "uvicorn", "flows.ops.scoring_app:app",
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


def model_server_env(base: dict[str, str] | None = None, tracking_uri: str | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with this interpreter's bin directory first on PATH,
    and MLFLOW_TRACKING_URI if given (where models:/ and runs:/ URIs are looked up)."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    rest = [entry for entry in env.get("PATH", "").split(os.pathsep) if entry and entry != bindir]
    env["PATH"] = os.pathsep.join([bindir, *rest] if rest else [bindir, "/usr/local/bin", "/usr/bin", "/bin"])
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return env


class ModelServer:
    """The scoring server of one model URI as a child process; its output goes to `log` (None: ours)."""

    def __init__(
        self,
        uri: str,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_MODEL_PORT,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        cwd: Path | None = None,
        die_with_parent: bool = True,
    ):
        self.uri, self.host, self.port = uri, host, port
        self.url = client_url(host, port)
        self.invocations_url = f"{self.url}/invocations"
        self.env = env if env is not None else model_server_env()
        self.log, self.cwd = log, cwd or Path.cwd()
        self.die_with_parent = die_with_parent
        self.child: processes.Child | None = None
        self.startup_seconds: float | None = None

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.alive

    def start(self, timeout: float = READY_TIMEOUT) -> float:
        """Start the server and wait until /ping answers -> the seconds it took. ServiceError (one line)
        if the port is taken, the server exits first or does not answer within `timeout`."""
        check_port_free(self.host, self.port, "--port")
        started = time.monotonic()
        self.child = processes.spawn(
            "model-server",
            model_server_command(self.host, self.port),
            env={**self.env, MODEL_URI_ENV: self.uri},
            cwd=self.cwd,
            log=self.log,
            death_signal=signal.SIGTERM if self.die_with_parent else None,
        )
        while time.monotonic() - started < timeout:
            if not self.child.alive:
                code = self.child.exit_code
                self.stop()
                where = f"; {self.child.tail(15)}" if self.log else " (its output is above)"
                raise ServiceError(f"the scoring server of {self.uri} exited with code {code}{where}")
            if answers(f"{self.url}/ping", timeout=2):
                self.startup_seconds = time.monotonic() - started
                return self.startup_seconds
            time.sleep(0.3)
        self.stop()
        raise ServiceError(
            f"the scoring server of {self.uri} did not answer {self.url}/ping within {timeout:.0f} s"
        )

    def stop(self) -> None:
        """Stop the server and the uvicorn workers it started (TERM, then KILL)."""
        if self.child is not None:
            processes.stop([self.child], STOP_SCHEDULE)

    def __enter__(self) -> ModelServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
