"""One standalone server a fault-injection test can SIGKILL and start again: `mlflow server` (one worker, no
job runner, SQLite + artefact folder) or `prefect server start` (SQLite in its PREFECT_HOME), on a free
loopback port that stays the same across restarts, with its store kept. And a small tmpfs a test can fill.

Nothing is mocked: real servers, real mounts (tmpfs needs root: tests skip without it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .cli import REPO, clean_server_env
from .pgcluster import free_port

VENV_BIN = REPO / ".venv" / "bin"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StandaloneServer:
    """A server process in its own process group (so a SIGKILL takes all of it) on a fixed port."""

    health_path = "/health"

    def __init__(self, root: Path, port: int | None = None):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self, timeout: float = 180) -> float:
        """Start it and wait until it answers its health check -> the seconds that took."""
        args, env = self.command()
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{args[0]} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            if self.healthy():
                return time.monotonic() - started
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"{args[0]} did not answer within {timeout:.0f} s:\n{self.log.read_text()[-3000:]}"
        )

    def healthy(self) -> bool:
        try:
            with _NO_PROXY.open(self.base_url + self.health_path, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server and everything it started (its process group), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


class MlflowServer(StandaloneServer):
    """`mlflow server --workers 1` with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false (~0.5 GB, ~5 s to start):
    SQLite at ROOT/mlflow.db, artefacts served from ROOT/artifacts."""

    @property
    def url(self) -> str:
        return self.base_url

    def command(self) -> tuple[list[str], dict[str, str]]:
        args = [
            str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        return args, clean_server_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")


class PrefectServer(StandaloneServer):
    """`prefect server start` with its own PREFECT_HOME (ROOT/home, SQLite there)."""

    health_path = "/api/health"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api"

    def command(self) -> tuple[list[str], dict[str, str]]:
        args = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        return args, clean_server_env(PREFECT_HOME=str(self.root / "home"))


@contextmanager
def running(server: StandaloneServer) -> Iterator[StandaloneServer]:
    """The server started for a `with` block, stopped (or killed) at its end whatever happened."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------------
# A small disk


@contextmanager
def tmpfs(path: Path, size: str = "20m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` for a `with` block, unmounted at its end (skips the test when it
    cannot be mounted: not root, or no mount permission in this container)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, leave: int) -> Path:
    """Fill the file system of `path` with one ballast file until `leave` bytes are free -> the ballast
    (delete it to give the space back)."""
    ballast = path / "ballast"
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    with open(ballast, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return ballast


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize
