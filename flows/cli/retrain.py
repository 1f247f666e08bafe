"""`sngp retrain`: run the retraining flow once (the same flow the `nightly` deployment schedules)."""

from __future__ import annotations

import argparse
import time

from flows.cli.common import (
    add_config_arguments,
    add_tracking_argument,
    checked_config,
    run_flow,
)
from flows.cli.faults import add_server_grace_argument, prepare_clients

HELP = "Retrain on fresh data and promote each method's model in the MLflow registry if it is as good."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_tracking_argument(parser)
    add_server_grace_argument(parser)
    parser.epilog = (
        "Settings of the champion/challenger rule live under 'retrain:' (accuracy_tolerance, "
        "auroc_tolerance, holdout_seed, data_seed, registry_prefix)."
    )


def main(args: argparse.Namespace) -> int:
    config = checked_config(args)
    prepare_clients(args)
    started = time.perf_counter()
    state = run_flow("sngp retrain: failed", config, load_retrain)
    if state is None:
        return 1
    result = state.result()
    print(
        f"\nRetraining finished in {time.perf_counter() - started:.1f} s (data seed {result['data_seed']})."
    )
    for d in result["decisions"].values():
        verdict = "PROMOTED to champion" if d["promoted"] else "rejected"
        print(f"  {d['model']} v{d['version']}: {verdict} ({d['reason']})")
    return 0


def load_retrain():
    from flows.retrain import retrain  # lazy: Prefect loads while its server starts

    return retrain
