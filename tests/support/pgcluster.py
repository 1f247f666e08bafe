"""Throwaway PostgreSQL clusters for tests and local try-outs of the Postgres-backed servers.

A cluster is made with the distribution's own `initdb` and `postgres` (Debian: /usr/lib/postgresql/<ver>/bin)
in a fresh temporary directory, listening only on 127.0.0.1 at a free port, with password
(scram-sha-256) authentication for one superuser. PostgreSQL refuses to run as root, so when this
process is root the server runs as an unprivileged OS user (`postgres` if it exists, else `nobody`;
override with SNGP_PG_OS_USER) that owns the temporary directory.

    with pg_cluster() as pg:
        url = pg.create_database("mlflow")    # postgresql://sngp:<password>@127.0.0.1:<port>/mlflow
        ...                                    # pass url to `sngp serve --db URL`

From a shell (prints the URLs, Ctrl-C removes the cluster):

    python -m tests.support.pgcluster mlflow prefect

Nothing here is needed in production: there the database is a managed server or the compose service.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from flows.ops.processes import die_with_parent

SUPERUSER = "sngp"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries (initdb, postgres) are installed on this machine."""


def find_bindir() -> Path:
    """Directory holding initdb/postgres: $SNGP_PG_BINDIR, the newest /usr/lib/postgresql/*/bin, or PATH."""
    candidates = []
    if os.environ.get("SNGP_PG_BINDIR"):
        candidates.append(Path(os.environ["SNGP_PG_BINDIR"]))
    versions = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    versions.sort(
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
    )
    candidates += [Path(p).parent for p in reversed(versions)]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    raise PostgresUnavailable(
        "no PostgreSQL server binaries found (initdb/postgres in /usr/lib/postgresql/*/bin or on PATH); "
        "install them with `apt-get install postgresql`"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _os_user() -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as, or None when we are not root (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    names = [os.environ["SNGP_PG_OS_USER"]] if os.environ.get("SNGP_PG_OS_USER") else ["postgres", "nobody"]
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable(
        f"running as root and no unprivileged OS user to run PostgreSQL as (tried {names})"
    )


class PgCluster:
    """One temporary PostgreSQL cluster; `start()` it, `create_database(name)`, `stop()` removes it."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, superuser: str = SUPERUSER):
        self.host = host
        self.port = port
        self.superuser = superuser
        self.password = secrets.token_urlsafe(18)
        self.bindir: Path | None = None
        self.root: Path | None = None
        self._user = None
        self._server: subprocess.Popen | None = None

    @property
    def datadir(self) -> Path:
        assert self.root is not None, "cluster not started"
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        assert self.root is not None, "cluster not started"
        return self.root / "postgres.log"

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        kwargs: dict = {}
        if self._user is not None:
            kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        result = subprocess.run(
            argv,
            check=False,
            cwd=self.root,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{Path(argv[0]).name} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
                + self._log_tail()
            )
        return result

    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(self.root),
        }

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.logfile.read_text(errors="replace").splitlines()[-lines:]
        except (OSError, AssertionError):
            return ""
        return "\n-- postgres.log --\n" + "\n".join(text)

    def start(self) -> PgCluster:
        self.bindir = find_bindir()
        self._user = _os_user()
        # Not under the caller's tmp dir: pytest's is mode 0700 root, which the postgres user cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="sngp-pg-"))
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._user is not None:
            for path in (self.root, pwfile):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        os.chmod(pwfile, 0o600)
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.datadir),
            "-U", self.superuser,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-instructions",
        )  # fmt: skip
        pwfile.unlink()
        last_error = ""
        for _attempt in range(3):  # the free port can be taken between choosing and binding
            port = self.port or free_port(self.host)
            self._server = self._launch_postgres(port)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self._server.poll() is None:
                if self._accepting(port):
                    self.port = port
                    return self
                time.sleep(0.1)
            last_error = self._log_tail()
            self._shutdown_server()
            if self.port:
                break
        self.stop()
        raise RuntimeError(f"could not start PostgreSQL{last_error}")

    def _launch_postgres(self, port: int) -> subprocess.Popen:
        """`postgres -D data` as our child (not daemonised by pg_ctl), so it cannot outlive us: Linux
        sends it SIGQUIT (immediate shutdown) if this process dies without stopping it."""
        settings = {
            "listen_addresses": self.host,
            "port": str(port),
            "unix_socket_directories": str(self.root),
            "fsync": "off",  # a throwaway cluster: speed over durability
            "full_page_writes": "off",
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.datadir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        kwargs: dict = {}
        if self._user is not None:
            kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        with open(self.logfile, "ab") as log:
            return subprocess.Popen(
                argv,
                cwd=self.root,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGQUIT),  # noqa: PLW1509 - only calls prctl
                **kwargs,
            )

    def _accepting(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=0.5):
                pass
        except OSError:
            return False
        import psycopg2

        try:
            psycopg2.connect(self._url_for(port, "postgres"), connect_timeout=2).close()
            return True
        except psycopg2.OperationalError:  # still starting up ("the database system is starting up")
            return False

    def _shutdown_server(self) -> None:
        server, self._server = self._server, None
        if server is None or server.poll() is not None:
            return
        server.send_signal(signal.SIGINT)  # "fast" shutdown: disconnect clients, checkpoint, exit
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    def restart(self, down: float = 0.0, timeout: float = 60) -> float:
        """Stop the server (fast mode: every client connection is cut), wait `down` seconds, start it
        again on the same port and data; returns the seconds until it accepts connections again."""
        assert self.root is not None and self.port, "cluster not started"
        started = time.monotonic()
        self._shutdown_server()
        time.sleep(down)
        self._server = self._launch_postgres(self.port)
        deadline = time.monotonic() + timeout
        while not self._accepting(self.port):
            if self._server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start again on port {self.port}{self._log_tail()}")
            time.sleep(0.1)
        return time.monotonic() - started

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy/libpq URL (with the password) for `database`."""
        return self._url_for(self.port, database)

    def _url_for(self, port: int | None, database: str) -> str:
        return f"postgresql://{self.superuser}:{self.password}@{self.host}:{port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database `name` (if missing) and return its URL."""
        import psycopg2

        conn = psycopg2.connect(self.url("postgres"), connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast mode: disconnects clients) and delete the cluster directory."""
        if self.root is None:
            return
        self._shutdown_server()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def pg_cluster(**kwargs) -> Iterator[PgCluster]:
    """A started throwaway cluster, stopped and deleted on exit."""
    cluster = PgCluster(**kwargs)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@contextmanager
def pg_cluster_or_skip(**kwargs) -> Iterator[PgCluster]:
    """pg_cluster() for a test, which is skipped where the PostgreSQL server binaries are not installed."""
    import pytest  # only tests call this

    try:
        find_bindir()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL server binaries are not installed ({exc})")
    with pg_cluster(**kwargs) as cluster:
        yield cluster


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.support.pgcluster [DB ...]`: start a cluster, print one URL per database, wait
    for Ctrl-C."""
    names = (argv if argv is not None else sys.argv[1:]) or ["mlflow"]
    try:
        with pg_cluster() as pg:
            for name in names:
                print(f"{name}: {pg.create_database(name)}", flush=True)
            print("PostgreSQL is running; Ctrl-C stops it and deletes its data.", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            while True:
                time.sleep(3600)
    except PostgresUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
