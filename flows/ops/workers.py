"""What a Prefect server knows of the workers of one work pool: their records, and whether a worker has
come online (polling, with a fresh heartbeat) since a given time."""

from __future__ import annotations

from datetime import datetime


def read_workers(api_url: str, pool: str) -> list:
    """The workers the Prefect server at `api_url` knows in `pool` ([] if it cannot say)."""
    import httpx  # lazy, as Prefect: keeps `sngp --help` fast
    from prefect.client.orchestration import get_client  # lazy: keeps `sngp --help` fast
    from prefect.exceptions import PrefectException  # lazy: keeps `sngp --help` fast
    from prefect.settings import PREFECT_API_URL, temporary_settings  # lazy: keeps `sngp --help` fast

    try:
        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            return client.read_workers_for_work_pool(pool)
    except (httpx.HTTPError, PrefectException):
        return []


def online_since(worker, since: datetime) -> bool:
    """ONLINE with a heartbeat at or after `since`."""
    beat = worker.last_heartbeat_time
    return worker.status == "ONLINE" and beat is not None and beat >= since


def worker_online(api_url: str, pool: str, name: str, since: datetime) -> bool:
    """Whether the worker `name` of `pool` is ONLINE with a heartbeat at or after `since` (a heartbeat
    from before, e.g. of a previous run's worker of the same name, does not count)."""
    return any(worker.name == name and online_since(worker, since) for worker in read_workers(api_url, pool))
