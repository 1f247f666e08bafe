"""`sngp serve`: the Prefect server, the MLflow tracking server and process workers on one data dir
(flows.ops.stack), until Ctrl-C / SIGTERM / SIGHUP; then everything stops in order and the data stays.

Supervised like docker's `restart: unless-stopped`: a server or worker that exits on its own is
started again after 1, 2, 4 ... s (logged); more than RESTART_LIMIT restarts of one service within
RESTART_WINDOW seconds is a crash loop, which stops everything (exit 1) with the service's last log lines.
After the Prefect server restarts, the work pool and the crash automation are re-ensured.

Each worker runs at most --worker-limit flow runs at once (default 1) and polls every 2 s (unless
PREFECT_WORKER_QUERY_SECONDS says otherwise): Prefect's process worker would otherwise take every
scheduled run it sees in one poll, so the runs of `sngp sweep --runner workpool` would not spread
over several workers. Each worker's environment names it in SNGP_WORKER_NAME.

The workers' flow runs send a heartbeat every --heartbeat-seconds, and the automation
"sngp: crash unresponsive flow runs" (flows.ops.automation) sets a deployment's flow run Crashed when
they stop. Database URLs carry passwords: they reach the servers through environment variables
(never argv) and are only ever shown redacted (postgresql://user:***@host/db).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from flows.cli.common import add_timeout_argument
from flows.ops.automation import CRASH_AUTOMATION_NAME, CRASH_MARGIN_SECONDS, MIN_HEARTBEAT_SECONDS
from flows.ops.commands import (
    DB_URL_ENV,
    DEFAULT_HOST,
    DEFAULT_MLFLOW_PORT,
    DEFAULT_PREFECT_PORT,
    DEFAULT_WORK_POOL,
    DEFAULT_WORKER_LIMIT,
    PREFECT_DB_URL_ENV,
    WORKER_NAME,
    WORKER_QUERY_SECONDS,
)
from flows.ops.stack import RESTART_LIMIT, RESTART_WINDOW, CrashLoop, Services
from flows.ops.stack_settings import DEFAULT_HEARTBEAT_SECONDS, DEFAULT_TIMEOUT

HELP = "start the Prefect server, MLflow tracking server and process worker(s) (Ctrl-C stops all)"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", required=True, type=Path, metavar="DIR",
        help="where the servers keep their data (prefect/, mlflow/, logs/); reused on restart",
    )  # fmt: skip
    parser.add_argument("--prefect-port", type=int, default=DEFAULT_PREFECT_PORT, metavar="PORT")
    parser.add_argument("--mlflow-port", type=int, default=DEFAULT_MLFLOW_PORT, metavar="PORT")
    parser.add_argument(
        "--db", metavar="URL", default=None,
        help=f"PostgreSQL URL for MLflow's backend store (default: ${DB_URL_ENV}, else SQLite in DIR/mlflow)",
    )  # fmt: skip
    parser.add_argument(
        "--prefect-db", metavar="URL", default=None,
        help=f"PostgreSQL URL for the Prefect server's database, not the same database as --db "
        f"(default: ${PREFECT_DB_URL_ENV}, else SQLite in DIR/prefect)",
    )  # fmt: skip
    parser.add_argument(
        "--host", default=DEFAULT_HOST,
        help="address both servers bind (default: %(default)s); with 0.0.0.0 also set PREFECT_UI_API_URL "
        "to http://<this machine>:PORT/api so remote browsers reach the Prefect API",
    )  # fmt: skip
    parser.add_argument(
        "--work-pool", default=DEFAULT_WORK_POOL, metavar="NAME", help="process work pool to create"
    )
    parser.add_argument("--no-worker", action="store_true", help="create the work pool but start no worker")
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help=f"process workers to start (default: %(default)s, named {WORKER_NAME!r}; with N > 1 "
        f"{WORKER_NAME}-1 .. -N), e.g. 2 to spread `sngp sweep --runner workpool` over two",
    )  # fmt: skip
    parser.add_argument(
        "--worker-limit", type=int, default=DEFAULT_WORKER_LIMIT, metavar="K",
        help="flow runs each worker runs at once (default: %(default)s; 0: no limit, Prefect's default, "
        "where one worker takes every scheduled run it sees). Workers poll every "
        f"{WORKER_QUERY_SECONDS} s unless PREFECT_WORKER_QUERY_SECONDS is set",
    )  # fmt: skip
    parser.add_argument(
        "--heartbeat-seconds", type=int, default=DEFAULT_HEARTBEAT_SECONDS, metavar="S",
        help="the workers' flow runs send a heartbeat every S seconds (PREFECT_FLOWS_HEARTBEAT_FREQUENCY; "
        f"default: %(default)s, Prefect's minimum: {MIN_HEARTBEAT_SECONDS}); a flow run of a deployment "
        f"silent for 3 S + {CRASH_MARGIN_SECONDS} seconds (its worker or machine died) is marked Crashed "
        f"by the automation {CRASH_AUTOMATION_NAME!r}, which sngp serve creates or updates. "
        "0: no heartbeat setting, the automation is disabled",
    )  # fmt: skip
    add_timeout_argument(parser, DEFAULT_TIMEOUT, until="everything to come up")


def _say(message: str) -> None:
    print(f"sngp serve: {message}", flush=True)


def main(args: argparse.Namespace) -> int:
    services = Services(
        args.data_dir,
        host=args.host,
        prefect_port=args.prefect_port,
        mlflow_port=args.mlflow_port,
        db_url=args.db or os.environ.get(DB_URL_ENV) or None,
        prefect_db_url=args.prefect_db or os.environ.get(PREFECT_DB_URL_ENV) or None,
        work_pool=args.work_pool,
        worker=not args.no_worker,
        workers=args.workers,
        worker_limit=args.worker_limit or None,  # 0: no limit
        heartbeat_seconds=args.heartbeat_seconds,
        timeout=args.timeout,
        log=_say,
    )
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    code = 1
    try:
        services.start(stop_event=stop)
        _print_ready(services)
        code = _supervise(services, stop)
        if code == 0:
            what = "workers" if services.workers > 1 else "worker"
            _say(f"received {signal.Signals(received[0]).name}, stopping the {what}, then the servers")
    finally:
        seconds = services.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0:
        _say(f"stopped ({seconds:.1f} s); data kept in {services.data_dir}")
    return code


def _supervise(services: Services, stop: threading.Event) -> int:
    """Until a stop signal (0): restart a server or worker that exits, with backoff (services.supervise);
    1 on a crash loop (one service restarted more than RESTART_LIMIT times in RESTART_WINDOW s)."""
    while not stop.wait(0.5):
        try:
            services.supervise()
        except CrashLoop as exc:
            print(
                f"sngp serve: error: {exc}\nsngp serve: stopping the other services (data kept in "
                f"{services.data_dir})",
                file=sys.stderr,
                flush=True,
            )
            return 1
    return 0


def _print_ready(services: Services) -> None:
    lines = [
        f"sngp serve: all services are up ({services.startup_seconds:.1f} s)",
        "",
        f"  Prefect UI:   {services.prefect_url}",
        f"  MLflow UI:    {services.mlflow_ui_url}",
        f"  Work pool:    {services.work_pool} (process){_workers_line(services)}",
        f"  Crash check:  {_crash_line(services)}",
        f"  Restarts:     a server or worker that exits is restarted; more than {RESTART_LIMIT} restarts of "
        f"one in {RESTART_WINDOW / 60:g} min stop everything",
        f"  Prefect DB:   {services.prefect_store_display}",
        f"  MLflow store: {services.mlflow_store_display}, artifacts in {services.mlflow_dir / 'artifacts'}",
        f"  Logs:         {services.log_dir}/",
        "",
        "Point clients (sngp run, prefect deploy, mlflow) at these servers with:",
        "",
        f"  export PREFECT_API_URL={services.prefect_api_url} MLFLOW_TRACKING_URI={services.mlflow_url}",
        "",
        "Press Ctrl-C to stop everything.",
    ]
    print("\n".join(lines), flush=True)


def _workers_line(services: Services) -> str:
    names = services.worker_names
    if not names:
        return " (no worker: --no-worker)"
    limit = services.worker_limit
    runs = f"{limit} flow run{'s' if limit != 1 else ''} at a time" if limit else "no limit on flow runs"
    if len(names) == 1:
        return f", worker {names[0]!r} ({runs})"
    return f", workers {', '.join(repr(n) for n in names)} ({runs} each)"


def _crash_line(services: Services) -> str:
    if not services.heartbeat_seconds:
        return "off (--heartbeat-seconds 0): flow runs whose worker dies stay Running"
    return (
        f"flow runs of deployments are marked Crashed after {services.crash_after_seconds} s without a "
        f"heartbeat (their worker or machine died); heartbeats every {services.heartbeat_seconds} s"
    )
