"""How `sngp` commands ride out a server that is away (--server-grace: MLflow's and Prefect's own
retry settings) and report what stops a run from outside the code (a server gone for good, a full disk)
as one line, exit code 1."""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

from flows.cli.errors import RunFailed, ServerUnavailable, UserError
from tasks.redaction import redact

DEFAULT_SERVER_GRACE = 60
# MLflow allows at most 10 retries (its _MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT) and urllib3 caps each
# wait at 120 s (Retry.DEFAULT_BACKOFF_MAX): 9 waits of 120 s = 1080 s is the longest window it has.
MAX_SERVER_GRACE = 900
_URLLIB3_BACKOFF_MAX = 120


def add_server_grace_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server-grace",
        metavar="SECONDS",
        type=int,
        default=DEFAULT_SERVER_GRACE,
        help="how long the MLflow tracking server or the Prefect server may be away (a restart, a "
        f"blip) before the run fails: their clients retry for that long (default {DEFAULT_SERVER_GRACE}, "
        f"at most {MAX_SERVER_GRACE}); a server away longer ends the run with one line, exit code 1",
    )


def mlflow_backoff_window(retries: int, factor: int) -> int:
    """Seconds MLflow's HTTP client sleeps in one request to a server that refuses connections, when
    each attempt fails at once: urllib3 sleeps 0 after the 1st failure and factor * 2**(k-1) after the
    k-th (k = 2..retries; each capped at 120 s), then gives up after attempt retries + 1."""
    return sum(min(_URLLIB3_BACKOFF_MAX, factor * 2 ** (k - 1)) for k in range(2, retries + 1))


# Prefect's client gives its connection pool 3 connect retries (httpcore waits 0, 0.5 and 1 s between
# them): each attempt at a port nobody listens on costs 1.5 s before Prefect's own retry logic sees it.
_PREFECT_CONNECT_SECONDS = 1.5


def prefect_backoff_window(retries: int) -> float:
    """Seconds Prefect's client spends on one request to a server that refuses connections: it sleeps
    2, 4, ..., 2**retries s between its retries + 1 attempts, each attempt taking 1.5 s."""
    return 2 ** (retries + 1) - 2 + _PREFECT_CONNECT_SECONDS * (retries + 1)


def server_retry_settings(grace: int) -> dict[str, str]:
    """The environment that makes MLflow's and Prefect's HTTP clients retry a request to a server that
    is away for at least `grace` seconds, and not much longer (read by both on import or per call).

    MLflow (requests + urllib3 Retry): with N = MLFLOW_HTTP_REQUEST_MAX_RETRIES and
    f = MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR (an integer), a request to a dead server (connection refused:
    every attempt fails at once) sleeps 0, 2f, 4f, ..., 2**(N-1) f s between its N + 1 attempts
    (mlflow_backoff_window: f * (2**N - 2) s while no wait reaches 120 s), plus up to
    MLFLOW_HTTP_REQUEST_BACKOFF_JITTER = 0.5 s per wait. The finest schedule that covers the grace
    is chosen: the largest N (short first waits, so a short blip costs seconds) whose smallest
    covering f overshoots the grace by at most min(15, grace / 2) s:

        grace 20 s -> N 5, f 1: 0+2+4+8+16 = 30 s      grace 60 s  -> N 6, f 1: 0+2+...+32 = 62 s
        grace 90 s -> N 5, f 3: 0+6+12+24+48 = 90 s    grace 300 s -> N 7, f 3: 6+...+96+120 = 306 s

    Prefect (httpx, prefect.client.base): with M = PREFECT_CLIENT_MAX_RETRIES a request sleeps
    2, 4, ..., 2**M s between its M + 1 attempts, 2**(M+1) - 2 s in all, and each refused attempt
    takes 1.5 s (prefect_backoff_window); the base is fixed, so M is the smallest that covers the grace
    (windows 5, 10.5, 20, 37.5, 71, 136.5, 266, 523.5, 1037 s: grace 20 -> M 3, 14 + 4 x 1.5 = 20 s;
    grace 60 -> M 5, 62 + 6 x 1.5 = 71 s; for a grace just above one of these, Prefect's window is up
    to twice the grace). PREFECT_CLIENT_RETRY_JITTER_FACTOR = 0: Prefect's jitter can shorten a wait
    to ~0.8x, which would end the window before the grace.

    A server that accepts connections but never answers costs a timeout per attempt:
    MLFLOW_HTTP_REQUEST_TIMEOUT = PREFECT_API_REQUEST_TIMEOUT = grace / 2 within 15..60 s (MLflow's
    default is 120 s; a localhost request that is merely slow stays far below 15 s)."""
    if not 1 <= grace <= MAX_SERVER_GRACE:
        raise ValueError(f"grace must be 1..{MAX_SERVER_GRACE} s, got {grace}")
    slack = min(15, grace / 2)
    for retries in range(10, 1, -1):
        factor = 1
        while mlflow_backoff_window(retries, factor) < grace and factor < _URLLIB3_BACKOFF_MAX:
            factor += 1
        if grace <= mlflow_backoff_window(retries, factor) <= grace + slack:
            break
    prefect_retries = 1
    while prefect_backoff_window(prefect_retries) < grace:
        prefect_retries += 1
    timeout = min(60, max(15, grace // 2))
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(factor),
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
        "PREFECT_CLIENT_MAX_RETRIES": str(prefect_retries),
        "PREFECT_CLIENT_RETRY_JITTER_FACTOR": "0",
        "PREFECT_API_REQUEST_TIMEOUT": str(timeout),
    }


def prepare_clients(args: argparse.Namespace) -> None:
    """Before MLflow or Prefect is imported: their clients' retry settings from --server-grace (also
    inherited by worker processes), and, unless --debug, a quiet console (one_line_console)."""
    grace = args.server_grace
    if not 1 <= grace <= MAX_SERVER_GRACE:
        raise UserError(f"--server-grace: must be 1..{MAX_SERVER_GRACE} seconds, got {grace}")
    os.environ.update(server_retry_settings(grace))
    os.environ["SNGP_SERVER_GRACE"] = str(grace)
    if not args.debug:
        # A log handler that cannot deliver (Prefect's API log worker with its server gone) writes
        # "--- Error logging to API ---" or a traceback to stderr for every batch unless this is off.
        logging.raiseExceptions = False
        _console.one_line = True


class _Console:
    one_line = False  # set by prepare_clients: no tracebacks in the console


_console = _Console()


class OneLineFormatter(logging.Formatter):
    """Wraps a console handler's formatter: each record on one line, without its traceback (the API
    handler, which sends it to the Prefect UI, has already formatted the whole record)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            text = self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        return " ".join(line.strip() for line in text.splitlines() if line.strip())


class OncePer(logging.Filter):
    """Lets each kind of record (its message template) through once per `seconds`: urllib3 warns on
    every retry of MLflow's requests, Prefect's events client on every event it could not send; a
    server away shows once, not once per attempt."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if record.created - self.last.get(key, -self.seconds) < self.seconds:
            return False
        self.last[key] = record.created
        return True


# Loggers that repeat themselves while a server is away (MLflow's retries; Prefect's events client and
# the service that runs it, one warning and one error per event it could not send).
RETRY_LOGGERS = ("urllib3.connectionpool", "prefect.events.clients", "prefect._internal.concurrency")


def one_line_console() -> None:
    """Once Prefect has configured logging (it is imported): unless --debug, Prefect's console handler
    prints every record, also a failed task's or flow's, as one line; retry warnings show once per
    outage (RETRY_LOGGERS). The full text still reaches the Prefect UI (its API log handler)."""
    if not _console.one_line:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *logging.root.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            formatter = handler.formatter
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(formatter, OneLineFormatter):
                handler.setFormatter(OneLineFormatter(formatter or logging.Formatter()))
    settings = server_retry_settings(int(os.environ.get("SNGP_SERVER_GRACE", DEFAULT_SERVER_GRACE)))
    mlflow_window = mlflow_backoff_window(
        int(settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]), int(settings["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    )
    prefect_window = prefect_backoff_window(int(settings["PREFECT_CLIENT_MAX_RETRIES"]))
    for name in RETRY_LOGGERS:  # once per outage: the longest a client retries one request, and a bit
        logger = logging.getLogger(name)
        if not any(isinstance(f, OncePer) for f in logger.filters):
            logger.addFilter(OncePer(max(mlflow_window, prefect_window) + 10))


# How MLflow words a request its client gave up on; names the URL, and still says what happened if
# the exception reached us without its cause.
_MLFLOW_GAVE_UP = re.compile(
    r"API request to (https?://\S+?) failed with (?:timeout )?exception.*(?:Max retries exceeded|timed out)"
)


def server_unavailable(exc: BaseException) -> ServerUnavailable | None:
    """The one-line error for a run that failed because the MLflow tracking server or the Prefect
    server stopped answering (its client's retries, set from --server-grace, ran out), else None."""
    from tasks import faults  # lazy: imports the HTTP clients

    server = faults.unreachable(exc)
    mlflow_url = None
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen and mlflow_url is None:
        seen.add(id(cause))
        if found := _MLFLOW_GAVE_UP.search(str(cause)):
            mlflow_url = re.split(r"/(?:ajax-)?api/", found.group(1), maxsplit=1)[0]
        cause = cause.__cause__ or cause.__context__
    if server is None and mlflow_url is not None:
        server = faults.MLFLOW
    if server == faults.MLFLOW:
        url = mlflow_url or os.environ.get("MLFLOW_TRACKING_URI") or "?"
    elif server == faults.PREFECT:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value() or "?"
    else:
        return None
    grace = os.environ.get("SNGP_SERVER_GRACE", str(DEFAULT_SERVER_GRACE))
    return ServerUnavailable(
        f"the {server} server at {redact(url)} stopped answering ({grace} s); finished tasks are "
        "cached: rerun when it is back"
    )


def disk_full(exc: BaseException) -> RunFailed | None:
    """The one-line error for a run that failed because a disk it writes (the cache folder, a local
    MLflow artefact store) is full, else None."""
    from tasks import faults  # lazy: imports the HTTP clients

    cache = Path(os.environ.get("SNGP_CACHE_DIR") or Path.cwd() / ".sngp_cache").resolve()
    full = faults.disk_full(exc, [str(cache)])
    if full is None:
        return None
    path = Path(full.filename)
    where = "--cache-dir" if path.is_relative_to(cache) else "the MLflow artefact store"
    free = faults.free_bytes(path) / 1e6
    return RunFailed(
        f"no space left on device for {redact(str(path))} ({free:.1f} MB free there): free some space "
        f"or move {where} elsewhere, then rerun; finished tasks are cached"
    )
