"""`sngp sweep`: run a sweep file's points as mapped tasks on a thread pool or a Dask cluster, or as
flow runs on a Prefect work pool."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

from flows.cli.common import (
    UserError,
    add_cache_dir_argument,
    add_tracking_argument,
    check_cache_dir,
    finish_flow_run,
    terminate_on_sigterm,
    use_cache_dir,
)
from flows.cli.faults import add_server_grace_argument, prepare_clients
from flows.config import ConfigError
from flows.ops.local_prefect import start_if_local
from flows.sweep_spec import SweepError, SweepSpec, expand, load_sweep
from tasks.redaction import redact
from tasks.sweep_points import format_settings

HELP = "Run a hyperparameter sweep (conf/sweep_*.yaml) on a thread pool, a Dask cluster or a work pool."
DEFAULT_DEPLOYMENT = "sweep-point/pool"  # prefect.yaml; registered by `make deploy`
POINT_FLOW = "sweep-point"  # flows/sweep_point_flow.py
T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="PATH", required=True, help="sweep file, e.g. conf/sweep_smoke.yaml"
    )
    parser.add_argument(
        "--runner",
        choices=("thread", "dask", "workpool"),
        default=None,
        help="where the points run: 'thread' (default) = a thread pool in this process; 'dask' = Dask "
        "workers (a local cluster started for the run, or --dask-address); 'workpool' = one flow run "
        "per point on the Prefect work pool of --deployment (needs PREFECT_API_URL: 'sngp serve "
        "--workers 2', then 'make deploy')",
    )
    parser.add_argument(
        "--threads", metavar="N", type=int, default=2, help="thread runner: points run at once (default 2)"
    )
    parser.add_argument(
        "--dask-address",
        metavar="ADDR",
        default=None,
        help="an existing Dask scheduler, e.g. tcp://127.0.0.1:8786 (implies --runner dask); its workers "
        "must share this sweep's cache folder (SNGP_CACHE_DIR)",
    )
    parser.add_argument(
        "--dask-workers",
        metavar="N",
        type=int,
        default=None,
        help="--runner dask without --dask-address: worker processes of the local cluster (default 2)",
    )
    parser.add_argument(
        "--deployment",
        metavar="FLOW/NAME",
        default=None,
        help=f"--runner workpool: the sweep-point deployment whose work pool runs the points (default "
        f"{DEFAULT_DEPLOYMENT}; implies --runner workpool); its workers must share this sweep's cache "
        "folder (each point's flow run gets SNGP_CACHE_DIR)",
    )
    add_tracking_argument(
        parser,
        default="the base config's, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working "
        "directory",
    )
    add_cache_dir_argument(
        parser,
        "cache folder (default: $SNGP_CACHE_DIR, else ./.sngp_cache); Dask and work-pool workers must "
        "share it",
    )
    add_server_grace_argument(parser)
    parser.epilog = (
        "Results: one MLflow parent run (sweep.yaml, sweep_results.csv, plots/sweep_<metric>.png) with a "
        "nested run per point, whichever runner computed it (with --runner workpool each point is also a "
        "flow run of the sweep-point deployment, tagged with its worker). Exit code 1 if any point failed "
        "(the others still finish), 2 for a bad sweep file or options."
    )


def runner_kind(args: argparse.Namespace) -> str:
    """'thread', 'dask' or 'workpool' from the options; UserError for combinations that clash."""
    runner = args.runner or (
        "workpool" if args.deployment else "dask" if args.dask_address or args.dask_workers else "thread"
    )
    if args.deployment and runner != "workpool":
        raise UserError("--deployment needs --runner workpool (or leave --runner out)")
    if runner == "workpool" and (args.dask_address or args.dask_workers):
        raise UserError("--dask-address/--dask-workers need --runner dask, not --runner workpool")
    return runner


def check_runner_options(args: argparse.Namespace) -> str:
    """The runner ('thread', 'dask' or 'workpool'), after the checks that need neither Prefect nor a
    server; UserError for options that clash or cannot work."""
    runner = runner_kind(args)
    if runner == "thread":
        if args.dask_address or args.dask_workers:
            raise UserError("--dask-address/--dask-workers need --runner dask (or leave --runner out)")
        if args.threads < 1:
            raise UserError(f"--threads: must be >= 1, got {args.threads}")
    if runner == "dask":
        if args.dask_address and args.dask_workers:
            raise UserError(
                "give either --dask-address (an existing cluster) or --dask-workers (a local one)"
            )
        if args.dask_address:
            check_scheduler(args.dask_address)
        elif (args.dask_workers or 2) < 1:
            raise UserError(f"--dask-workers: must be >= 1, got {args.dask_workers}")
    return runner


def choose_runner(args: argparse.Namespace, runner: str, points: int = 1):
    """(task runner, description) for check_runner_options' `runner`.

    Runner workpool: a thread pool of this process whose tasks dispatch the points to the work pool
    and wait for them (one thread per point, at most tasks.sweep.MAX_DISPATCHED)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if runner == "workpool":
        from tasks.sweep import MAX_DISPATCHED

        deployment = args.deployment or DEFAULT_DEPLOYMENT
        pool, online = check_deployment(deployment)
        if not online:
            print(
                f"sngp sweep: warning: no worker of work pool {pool!r} is online; the points wait until "
                "one starts (e.g. sngp serve --workers 2)",
                file=sys.stderr,
            )
        workers = f"{len(online)} worker{'s' if len(online) != 1 else ''} online"
        runner_ = ThreadPoolTaskRunner(max_workers=max(1, min(points, MAX_DISPATCHED)))
        return runner_, f"work pool {pool!r} via deployment {deployment} ({workers})"
    if runner == "thread":
        return ThreadPoolTaskRunner(max_workers=args.threads), f"thread pool ({args.threads} threads)"
    quiet_dask()
    import dask
    from prefect_dask import DaskTaskRunner

    if args.dask_address:
        return DaskTaskRunner(address=args.dask_address), f"Dask cluster at {args.dask_address}"
    workers = args.dask_workers or 2
    # TensorFlow is not fork-safe: worker processes start fresh (spawn), as Dask does by default.
    dask.config.set({"distributed.worker.multiprocessing-method": "spawn"})
    runner_ = DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
        },
    )
    return runner_, f"local Dask cluster ({workers} worker processes)"


def quiet_dask() -> None:
    # Dask logs every connection at INFO; keep warnings. The env var reaches spawned worker processes.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.getLogger("distributed").setLevel(logging.WARNING)


def check_deployment(name: str) -> tuple[str, list[str]]:
    """Fail fast, in one line, unless PREFECT_API_URL reaches a server that has the sweep-point
    deployment `name`; -> (its work pool, names of the pool's online workers)."""
    from prefect.settings import PREFECT_API_URL

    fix = (
        "start the servers with 'sngp serve --workers 2', export the PREFECT_API_URL it prints, "
        "then 'make deploy'"
    )
    flow_name, _, deployment_name = name.partition("/")
    if not flow_name or not deployment_name or "/" in deployment_name:
        raise UserError(f"--deployment must be FLOW/DEPLOYMENT, e.g. {DEFAULT_DEPLOYMENT} (got {name!r})")
    url = PREFECT_API_URL.value()
    if not url:
        raise UserError(f"--runner workpool needs a Prefect server and PREFECT_API_URL is not set: {fix}")
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
        if error is not None:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise UserError(f"no Prefect server answers at PREFECT_API_URL={url} ({reason}): {fix}")
        deployment = found(
            lambda: client.read_deployment_by_name(name),
            f"deployment {name!r} does not exist on the Prefect server at {url}: register it with "
            "'make deploy' (with PREFECT_API_URL exported)",
        )
        flow = client.read_flow(deployment.flow_id)
        if flow.name != POINT_FLOW:
            raise UserError(
                f"deployment {name!r} runs flow {flow.name!r}, not {POINT_FLOW!r}: use a deployment of "
                f"flows/sweep_point_flow.py, e.g. {DEFAULT_DEPLOYMENT}"
            )
        pool = deployment.work_pool_name
        if not pool:
            raise UserError(f"deployment {name!r} has no work pool: register it with 'make deploy'")
        workers = found(
            lambda: client.read_workers_for_work_pool(pool),
            f"work pool {pool!r} of deployment {name!r} does not exist: 'sngp serve' or 'make deploy' "
            "creates it",
        )
    return pool, sorted(w.name for w in workers if str(getattr(w.status, "value", w.status)) == "ONLINE")


def found(read: Callable[[], T], missing: str) -> T:
    """`read()`'s answer from the Prefect server; UserError(`missing`) if the server has no such object."""
    from prefect.exceptions import ObjectNotFound  # lazy: `sngp --help` loads this module without Prefect

    try:
        return read()
    except ObjectNotFound:
        raise UserError(missing) from None


def check_scheduler(address: str) -> None:
    """Fail fast, in one line, when nothing listens at a tcp:// scheduler address."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme != "tcp" or not parsed.hostname:
        return  # tls://, ucx://, ...: let Dask report
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 8786), timeout=5):
            pass
    except OSError as exc:
        raise UserError(
            f"--dask-address {address}: no Dask scheduler reachable ({exc.strerror or exc}); start one with "
            "'dask scheduler --host 127.0.0.1' and workers with 'dask worker tcp://127.0.0.1:8786'"
        ) from None


def main(args: argparse.Namespace) -> int:
    use_cache_dir(args)
    check_cache_dir()
    extra = [f"mlflow.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []
    try:
        spec, base = load_sweep(args.config, extra)
    except (SweepError, ConfigError) as exc:
        raise UserError(str(exc)) from None
    points = len(expand(spec))
    runner = check_runner_options(args)
    prepare_clients(args)  # before Prefect is imported (choose_runner)
    # Local mode: one temporary Prefect server for the flow and every worker process (they inherit
    # PREFECT_API_URL). The work pool needs a real server (check_deployment says so).
    local_server = start_if_local() if runner != "workpool" else None
    task_runner, where = choose_runner(args, runner, points)  # checks the deployment of a work pool
    from flows.sweep import sweep  # MLflow only now, once the file, options and deployment are good
    from tasks.cache import cache_root

    os.environ["SNGP_CACHE_DIR"] = str(cache_root())  # absolute, inherited by local worker processes
    deployment = (args.deployment or DEFAULT_DEPLOYMENT) if runner == "workpool" else None
    terminate_on_sigterm()
    print(f"Sweep {args.config}: {points} points on {where}")
    started = time.perf_counter()
    flow_ = sweep.with_options(task_runner=task_runner)
    state = finish_flow_run(
        "sngp sweep: failed", local_server, flow_, spec=spec, base=base, deployment=deployment
    )
    summary = state.result()
    print_summary(spec, summary, time.perf_counter() - started, where)
    return 1 if summary["failed"] else 0


def print_summary(spec: SweepSpec, summary: dict, seconds: float, where: str) -> None:
    points = summary["points"]
    cached = sum(p["cached"] for p in points)
    failed = [p for p in points if p["status"] != "FINISHED"]
    print()
    print(
        f"Sweep finished in {seconds:.1f} s on {where}: {len(points)} points, "
        f"{len(points) - len(failed)} finished ({cached} from the cache), {len(failed)} failed."
    )
    print(
        f"MLflow parent run: {summary['parent_run_id']} (experiment {summary['experiment_id']}, "
        f"{redact(summary['tracking_uri'])})"
    )
    metrics = list(spec.metrics)
    width = max(len(p["label"]) for p in points) + 2
    cols = {m: max(12, len(m) + 2) for m in metrics}
    header = f"{'point':<6}{'setting':<{width}}{'status':<10}" + "".join(f"{m:>{cols[m]}}" for m in metrics)
    print()
    print(header + "  cached")
    print("-" * (len(header) + 8))
    for p in points:
        values = p["metrics"]
        cells = "".join(f"{values[m]:>{cols[m]}.4f}" if m in values else f"{'-':>{cols[m]}}" for m in metrics)
        print(f"{p['id']:<6}{p['label']:<{width}}{p['status']:<10}{cells}  {'yes' if p['cached'] else '-'}")
    if len(spec.seeds) > 1:
        print()
        print(f"Mean ± std over seeds {', '.join(str(s) for s in spec.seeds)}:")
        for row in summary["aggregates"]:
            setting = format_settings(row["settings"])
            cells = "  ".join(f"{m} {s['mean']:.4f}±{s['std']:.4f}" for m, s in row["stats"].items())
            print(f"  {row['method']} {setting} (n={row['seeds']}): {cells or 'no finished seeds'}")
    if failed:
        print()
        print(f"{len(failed)} of {len(points)} points failed:")
        for p in failed:
            print(f"  {p['id']} {p['label']}: {p['error']}")
    served = {}
    for p in points:
        if p.get("prefect_worker"):
            served.setdefault(p["prefect_worker"], []).append(p["id"])
    if served:
        print()
        print("Work-pool workers:")
        for worker, ids in sorted(served.items()):
            print(f"  {worker}: {', '.join(ids)}")
    print()
    print(f"Table: {summary['csv']}")
    print(f"Plots: {summary['summary_png']}")
    for png in summary["plots"]:
        if png != summary["summary_png"]:
            print(f"       {png}")
    uri, exp, parent = summary["tracking_uri"], summary["experiment_id"], summary["parent_run_id"]
    if uri.startswith(("http://", "https://")):
        print(f"Open the MLflow UI: {uri.rstrip('/')}/#/experiments/{exp}/runs/{parent}")
    else:
        print(f"Open the MLflow UI: mlflow ui --backend-store-uri {redact(uri)} --port 5000")
        print(f"  then http://127.0.0.1:5000/#/experiments/{exp}/runs/{parent}")
