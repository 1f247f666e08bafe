"""Prefect's temporary server for local mode, started the moment `sngp run` knows it will need one.

Without PREFECT_API_URL, Prefect starts a temporary server on its first API call, after `import prefect`
and the flow's imports (~5 s), then waits for it (~5 s). Starting a server ourselves before anything
heavy is imported overlaps the two, which is most of a fully cached run's time. Prefect is then pointed
at it with PREFECT_API_URL, so it uses it like any server. The server dies with this process: stopped at
exit, and killed by the kernel if we are SIGKILLed (PR_SET_PDEATHSIG).

It is Prefect's server app (`prefect.server.api.server:create_app`, as `prefect server start` runs it)
under uvicorn, configured only through public settings to be what Prefect's own temporary server is:
no UI, and none of the services that only matter to a long-lived server (SERVER_SETTINGS).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

from flows.ops.processes import die_with_parent

# Prefect's temporary server runs its app with no UI and, of the server's background services, only
# those that record what a run reports (events, task runs, logs, automations); these settings give
# the same. The services left out schedule deployments' runs, mark runs late, expire pauses, clean up
# cancellations and leases, and mark workers offline: nothing a run of this process needs, and a
# scheduler would start creating runs for the deployments of a local database. (Prefect's other flag
# for its temporary server only frees memory under FastAPI < 0.137, older than the one installed.)
SERVER_SETTINGS = {
    "PREFECT_UI_ENABLED": "false",
    **{
        f"PREFECT_SERVER_SERVICES_{service}_ENABLED": "false"
        for service in (
            "SCHEDULER",
            "LATE_RUNS",
            "PAUSE_EXPIRATIONS",
            "CANCELLATION_CLEANUP",
            "REPOSSESSOR",
            "CLEANUP_RECONCILER",
            "FOREMAN",
        )
    },
}


def _configured_api_url() -> bool:
    """True if the environment or the active Prefect profile already names a server."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    try:
        profiles = tomllib.loads((home / "profiles.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return bool(profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _default_database() -> Path | None:
    """Prefect's SQLite file when no other database is configured (the local-mode default)."""
    if os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or os.environ.get(
        "PREFECT_SERVER_DATABASE_CONNECTION_URL"
    ):
        return None
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect") / "prefect.db"


class LocalPrefectServer:
    def __init__(self) -> None:
        database = _default_database()
        # A new database is migrated before the server answers: ~5 s more than a start on an existing one.
        self.creates_database = database is not None and not database.exists()
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent
        env = {**os.environ, **SERVER_SETTINGS}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect_dir.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509 - prctl only
        )
        atexit.register(self.stop)  # registered before Prefect's own exit hooks, so it runs after them

    def ready(self) -> bool:
        """True once the server answers its health check; RuntimeError if it has exited."""
        if self.process.poll() is not None:
            err = self.process.stderr.read().decode(errors="replace")[-2000:] if self.process.stderr else ""
            code = self.process.returncode
            raise RuntimeError(f"Prefect's temporary server exited with code {code}: {err}")
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Prefect's temporary server did not answer within {timeout:.0f} s")

    def flow_settings(self):
        """Prefect settings for flows run against this server: no flow-run heartbeats. They let a
        long-lived server detect crashed runs; this one dies with the run, and stopping the heartbeat
        thread costs up to a second at the end of every flow."""
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        return temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_if_local() -> LocalPrefectServer | None:
    """Start the temporary server and point Prefect at it, unless a server is configured.

    Must run before `prefect` is imported (Prefect reads PREFECT_API_URL once, at import)."""
    if _configured_api_url() or "prefect" in sys.modules:
        return None
    server = LocalPrefectServer()
    os.environ["PREFECT_API_URL"] = server.api_url
    return server
