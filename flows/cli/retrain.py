"""`sngp retrain`: run the retraining flow once (the same flow the `nightly` deployment schedules)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from flows.cli.common import (
    add_config_arguments,
    check_cache_dir,
    check_tracking,
    config_from_args,
    flow_kwargs,
    terminate_on_sigterm,
)
from flows.ops.local_prefect import start_if_local

HELP = "Retrain on fresh data and promote each method's model in the MLflow registry if it is as good."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.epilog = (
        "Settings of the champion/challenger rule live under 'retrain:' (accuracy_tolerance, "
        "auroc_tolerance, holdout_seed, data_seed, registry_prefix)."
    )


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_cache_dir()
    config = check_tracking(config)  # fails fast on a bad URI; keeps a password out of flow parameters
    terminate_on_sigterm()
    started = time.perf_counter()
    local_server = start_if_local()  # as `sngp run`: our own temporary server, started before the imports
    from flows.retrain import retrain

    if local_server is not None:
        local_server.wait_ready()
    with local_server.flow_settings() if local_server is not None else contextlib.nullcontext():
        state = retrain(**flow_kwargs(config, retrain), return_state=True)
    if not state.is_completed():
        try:
            state.result()
        except BaseException as exc:  # noqa: BLE001
            print(f"sngp retrain: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    result = state.result()
    print(
        f"\nRetraining finished in {time.perf_counter() - started:.1f} s (data seed {result['data_seed']})."
    )
    for d in result["decisions"].values():
        verdict = "PROMOTED to champion" if d["promoted"] else "rejected"
        print(f"  {d['model']} v{d['version']}: {verdict} ({d['reason']})")
    return 0
