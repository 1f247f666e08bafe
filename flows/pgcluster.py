"""Throwaway PostgreSQL clusters for tests and local try-outs of the Postgres-backed servers.

A cluster is made with the distribution's own `initdb`/`pg_ctl` (Debian: /usr/lib/postgresql/<ver>/bin)
in a fresh temporary directory, listening only on 127.0.0.1 at a free port, with password
(scram-sha-256) authentication for one superuser. PostgreSQL refuses to run as root, so when this
process is root the server runs as an unprivileged OS user (`postgres` if it exists, else `nobody`;
override with SNGP_PG_OS_USER) that owns the temporary directory.

    with pg_cluster() as pg:
        url = pg.create_database("mlflow")    # postgresql://sngp:<password>@127.0.0.1:<port>/mlflow
        ...                                    # pass url to `sngp serve --db URL`

From a shell (prints the URLs, Ctrl-C removes the cluster):

    python -m flows.pgcluster mlflow prefect

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

SUPERUSER = "sngp"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries (initdb, pg_ctl) are installed on this machine."""


def find_bindir() -> Path:
    """Directory holding initdb/pg_ctl: $SNGP_PG_BINDIR, the newest /usr/lib/postgresql/*/bin, or PATH."""
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
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    raise PostgresUnavailable(
        "no PostgreSQL server binaries found (initdb/pg_ctl in /usr/lib/postgresql/*/bin or on PATH); "
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
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(self.root),
        }
        result = subprocess.run(
            argv,
            check=False,
            cwd=self.root,
            env=env,
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
        last_error: Exception | None = None
        for _attempt in range(3):  # the free port can be taken between choosing and binding
            port = self.port or free_port(self.host)
            settings = {
                "listen_addresses": f"'{self.host}'",
                "port": str(port),
                "unix_socket_directories": f"'{self.root}'",
                "fsync": "off",  # a throwaway cluster: speed over durability
                "max_connections": "100",
            }
            with open(self.datadir / "postgresql.auto.conf", "a") as conf:
                conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
            try:
                self._run(
                    str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                    "-w", "-t", "60", "start",
                )  # fmt: skip
            except RuntimeError as exc:
                last_error = exc
                if self.port:
                    break
                continue
            self.port = port
            return self
        self.stop()
        raise RuntimeError(f"could not start PostgreSQL: {last_error}")

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy/libpq URL (with the password) for `database`."""
        return f"postgresql://{self.superuser}:{self.password}@{self.host}:{self.port}/{database}"

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
        if self.bindir is not None and (self.datadir / "postmaster.pid").exists():
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run_kill()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def _run_kill(self) -> None:
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass

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


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.pgcluster [DB ...]`: start a cluster, print one URL per database, wait for Ctrl-C."""
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
