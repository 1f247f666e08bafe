"""`sngp monitor`: run the `monitor` flow once on an inbox (the deployment monitor/every-15-minutes runs the
same flow on a schedule). One line per batch; exit 0 whether or not drift was found (drift is a
finding, not an error), 2 for bad usage (a missing inbox, an unknown model), 1 if the run failed."""

from __future__ import annotations

import argparse
import os
import time

from flows.cli.common import UserError, add_tracking_argument, finish_flow_run, terminate_on_sigterm
from flows.cli.faults import add_server_grace_argument, prepare_clients
from flows.cli.serve_model import add_model_argument, resolved_model, tracking_uri
from flows.ops.local_prefect import start_if_local
from sngp_models.drift import DEFAULT_ALPHA, check_alpha
from tasks.redaction import redact

HELP = "Score the new batch files of an inbox once with a model, test each for drift, record in MLflow."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument(
        "--inbox", required=True, metavar="DIR",
        help="folder of CSV/Parquet batch files; results go to DIR/scored/, bad files to DIR/rejected/",
    )  # fmt: skip
    parser.add_argument(
        "--alpha", type=float, default=DEFAULT_ALPHA,
        help="false-alarm rate per batch of the drift test (default: %(default)s)",
    )  # fmt: skip
    add_tracking_argument(parser, default="$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    add_server_grace_argument(parser)
    parser.epilog = (
        "Drift: a one-sided test of each batch's abstain count against the model's reference split "
        "(README, 'Serving and monitoring'). On drift the Prefect event sngp.drift.detected is sent; "
        "the automation 'sngp: retrain on drift' (make deploy) answers it with a retrain/nightly run."
    )


def main(args: argparse.Namespace) -> int:
    from tasks.inbox import InboxError, check_inbox  # lazy: pandas, not needed for `sngp --help`

    try:
        inbox = check_inbox(args.inbox)
        alpha = check_alpha(args.alpha)
    except (InboxError, ValueError) as exc:
        raise UserError(str(exc).replace("alpha:", "--alpha:")) from None
    prepare_clients(args)
    tracking = tracking_uri(args)
    ref = resolved_model(args, tracking)  # an unknown model is a usage error, before Prefect starts
    parameter = tracking
    if redact(tracking) != tracking:  # a password stays out of the flow's parameters
        os.environ["MLFLOW_TRACKING_URI"] = tracking
        parameter = None
    terminate_on_sigterm()
    started = time.perf_counter()
    local_server = start_if_local()
    from flows.monitor import monitor  # lazy: Prefect loads while its server starts

    state = finish_flow_run(
        "sngp monitor: failed", local_server, monitor,
        model=args.model, inbox=str(inbox), alpha=alpha, tracking_uri=parameter,
    )  # fmt: skip
    result = state.result()
    print_summary(result, ref.label, time.perf_counter() - started)
    return 0


def print_summary(result: dict, label: str, seconds: float) -> None:
    batches = result["batches"]
    if result["mlflow_run_id"] is None:
        print(f"sngp monitor: no new batch in {result['inbox']} ({seconds:.1f} s)")
        return
    for batch in batches:
        print(batch["line"])
    counts = {status: sum(b["status"] == status for b in batches) for status in ("scored", "rejected")}
    drifting = [str(b["batch"]) for b in batches if b.get("drift")]
    print(
        f"sngp monitor: {result['model']}: {counts['scored']} batch(es) scored, {counts['rejected']} rejected"
        + (f", drift in batch {', '.join(drifting)} (event sent)" if drifting else ", no drift")
        + f" in {seconds:.1f} s; MLflow run {result['mlflow_run_id']} (experiment sngp-monitor, "
        f"{result['tracking_uri']})"
    )
