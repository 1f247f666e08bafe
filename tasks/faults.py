"""Faults from outside the code that end a flow run: a server it talks to (the MLflow tracking server,
the Prefect server) away for the whole grace, and a full disk.

Both clients retry each request for about `sngp --server-grace` seconds (their retry settings, set by
flows/cli/faults.py's server_retry_settings). A flow makes many requests in a row, though: ending its
MLflow runs, the Prefect engine proposing the final state. Once one request has waited out the whole
grace, each later one would wait as long again, so the run would fail after a multiple of the grace.
give_up() makes the process's later requests to that server try once instead.

A full disk shows as OSError(ENOSPC), often without the file (the cache's own writers name theirs:
tasks.cache.write_atomic): disk_full() then names the fullest of the places the run writes.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import httpx
import requests

MLFLOW, PREFECT = "MLflow", "Prefect"

# What MLflow's client (requests + urllib3) raises once its retries are spent: no connection, no answer
# in time, or only error statuses (RetryError: 5xx/429 on every attempt).
_MLFLOW_GAVE_UP = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.RetryError,
)
_UNAVAILABLE_STATUSES = {502, 503, 504}


def unreachable(exc: BaseException | None) -> str | None:
    """MLFLOW or PREFECT if `exc` (or an error it was raised from) is that server's client giving up on
    it after every retry its settings allow, else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _MLFLOW_GAVE_UP):
            return MLFLOW
        if isinstance(exc, httpx.TransportError):  # Prefect's client (httpx): no connection, no answer
            return PREFECT
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in _UNAVAILABLE_STATUSES:
            return PREFECT  # retried by Prefect's client until its retries ran out
        exc = exc.__cause__ or exc.__context__
    return None


def give_up(server: str) -> None:
    """From now on this process tries each request to `server` once: it has been away for the whole
    grace already. The MLflow runs it leaves RUNNING are marked FAILED by the next pipeline start
    (tasks.tracking.fail_orphaned_runs); the Prefect flow run stays as far as its server saw it."""
    if server == MLFLOW:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # MLflow reads it on every request
    elif server == PREFECT:
        from prefect.events.clients import NullEventsClient
        from prefect.events.worker import EventsWorker
        from prefect.settings import get_current_settings

        # Prefect reads PREFECT_CLIENT_MAX_RETRIES from the current settings on every request, and has
        # no process-wide setter after import (temporary_settings is scoped to one context): update the
        # settings object the running flow and its task threads share.
        get_current_settings().client.max_retries = 0
        # Task-run states travel as events, sent one at a time by a worker that tries each for ~8 s
        # (10 websocket reconnects) and drains its queue before the process exits: the events of a run
        # whose server is gone would hold the exit ~8 s each. Later events go nowhere instead.
        EventsWorker.set_client_override(NullEventsClient)


def disk_full(exc: BaseException | None, places: list[str]) -> OSError | None:
    """The ENOSPC error in `exc`'s chain as an OSError naming the full place: of the files it names
    (a copy names its source too: shutil sets filename = source, filename2 = destination) and `places`
    (paths or file:// URIs the run writes), the one on the fullest file system, the named ones first;
    None if no disk was full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            named = [os.fsdecode(p) for p in (exc.filename2, exc.filename) if p]
            local = [
                Path(p.removeprefix("file://"))
                for p in [*named, *places]
                if "://" not in p or p.startswith("file://")
            ]
            path = min(local, key=free_bytes) if local else Path("?")  # the first of equals
            if named == [str(path)]:
                return exc  # it names the file on the full disk itself
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        exc = exc.__cause__ or exc.__context__
    return None


def free_bytes(path: Path) -> int:
    """Free bytes on the file system of `path` (of its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0
