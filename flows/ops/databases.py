"""PostgreSQL databases of the servers: URL checks, the URL each client wants, and a reachability check.

URLs are parsed with SQLAlchemy's `make_url` and only ever shown through tasks.redaction.redact_url
(postgresql://user:***@host/db).

No pool settings are passed on: both servers' SQLAlchemy engines already test each pooled connection
before use (`pool_pre_ping=True` in MLflow's `create_sqlalchemy_engine` and in Prefect's PostgreSQL
configuration), so after a PostgreSQL restart their next requests open new connections instead of
failing (tests/servers/test_postgres_restart.py)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from flows.ops.errors import ServiceError
from tasks.redaction import redact_url

# What `sngp serve --db / --prefect-db` accept: PostgreSQL with no driver or one of the two we install.
POSTGRES_SCHEMES = {"postgresql", "postgres", "postgresql+psycopg2", "postgresql+asyncpg"}
DEFAULT_PORT = 5432


@dataclass(frozen=True)
class PostgresURLs:
    """One PostgreSQL database as each client wants it (SQLAlchemy 2.1 defaults to psycopg 3, which
    is not installed, so MLflow gets the psycopg2 driver named explicitly)."""

    libpq: str  # postgresql://...           psycopg2.connect, psql
    mlflow: str  # postgresql+psycopg2://... MLflow backend store
    prefect: str  # postgresql+asyncpg://... Prefect server database
    secrets: tuple[str, ...]  # the password as written in these URLs and decoded, longest first

    @classmethod
    def parse(cls, url: str, option: str) -> PostgresURLs:
        """ServiceError naming `option` unless `url` is a PostgreSQL URL with a host and a database."""
        parsed = _parse(url, option)
        if parsed.drivername not in POSTGRES_SCHEMES or not parsed.host:
            raise ServiceError(
                f"{option} must be a PostgreSQL URL like postgresql://user:password@host:5432/dbname "
                f"(got {redact_url(url)})"
            )
        if not parsed.database:
            raise ServiceError(f"{option} must name a database: postgresql://user:password@host:5432/dbname")
        return cls(
            libpq=_render(parsed, "postgresql"),
            mlflow=_render(parsed, "postgresql+psycopg2"),
            prefect=_render(parsed, "postgresql+asyncpg"),
            secrets=_password_forms(parsed),
        )

    def same_database(self, other: PostgresURLs) -> bool:
        """Whether both name one database on one server (the user and password may differ)."""
        return _identity(self.libpq) == _identity(other.libpq)


def check_database(url: str, what: str) -> None:
    """ServiceError naming the `what` database (redacted) unless psycopg2 can connect to `url` (libpq)."""
    import psycopg2  # only when a PostgreSQL database is used

    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except psycopg2.Error as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ServiceError(f"cannot connect to the {what} database {redact_url(url)}: {reason}") from None


def _parse(url: str, option: str) -> URL:
    try:
        parsed = make_url(url)
        port = parsed.port  # make_url raises ValueError on a port that is not a number
    except (ArgumentError, ValueError):
        raise ServiceError(f"{option} is not a valid URL: {redact_url(url)}") from None
    if port is not None and not 1 <= port <= 65535:
        raise ServiceError(f"{option} is not a valid URL: {redact_url(url)} (port {port})")
    return parsed


def _render(url: URL, drivername: str) -> str:
    return url.set(drivername=drivername).render_as_string(hide_password=False)


def _password_forms(url: URL) -> tuple[str, ...]:
    """The password decoded and as SQLAlchemy writes it in the URLs we pass on (percent-encoded)."""
    if not url.password:
        return ()
    shown, hidden = url.render_as_string(hide_password=False), url.render_as_string(hide_password=True)
    before, after = hidden.split("***", 1)
    written = shown[len(before) : len(shown) - len(after)]
    return tuple(sorted({url.password, written}, key=len, reverse=True))


def _identity(url: str) -> tuple:
    parsed = make_url(url)
    return parsed.host, parsed.port or DEFAULT_PORT, parsed.database
