"""`sngp retrain`: run the retraining flow once (the same flow the `nightly` deployment schedules)."""

from __future__ import annotations

import argparse

from flows.cli.common import add_flow_arguments, checked_config, run_flow

HELP = "Retrain on fresh data and promote each method's model in the MLflow registry if it is as good."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flow_arguments(parser)
    parser.epilog = (
        "Settings of the champion/challenger rule live under 'retrain:' (accuracy_tolerance, "
        "auroc_tolerance, holdout_seed, data_seed, registry_prefix)."
    )


def main(args: argparse.Namespace) -> int:
    finished = run_flow("sngp retrain: failed", checked_config(args), load_retrain)
    result = finished.state.result()
    print(f"\nRetraining finished in {finished.seconds:.1f} s (data seed {result['data_seed']}).")
    for d in result["decisions"].values():
        verdict = "PROMOTED to champion" if d["promoted"] else "rejected"
        print(f"  {d['model']} v{d['version']}: {verdict} ({d['reason']})")
    return 0


def load_retrain():
    from flows.retrain import retrain  # lazy: Prefect loads while its server starts

    return retrain
