"""`sngp deploy-automations`: create or update the automations `sngp: retrain on drift` and `sngp: retry a
crashed nightly retrain` on the Prefect server in PREFECT_API_URL (make deploy runs it after `prefect deploy
--all`; running it again changes nothing)."""

from __future__ import annotations

import argparse
import os

from flows.cli.common import UserError
from flows.ops.drift_automation import (
    DEFAULT_COOLDOWN_MINUTES,
    DRIFT_AUTOMATION_NAME,
    RETRAIN_DEPLOYMENT,
    sync_drift_automation,
)
from flows.ops.retry_automation import RETRY_AUTOMATION_NAME, RETRY_DEPLOYMENT, sync_retry_automation
from tasks.model_ref import DRIFT_EVENT

HELP = (
    f"Create or update the Prefect automations {DRIFT_AUTOMATION_NAME!r} and {RETRY_AUTOMATION_NAME!r} "
    "(make deploy runs it)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cooldown-minutes", type=int, default=DEFAULT_COOLDOWN_MINUTES, metavar="M",
        help=f"after a drift event starts {RETRAIN_DEPLOYMENT}, further drift events start nothing for M "
        "minutes (default: %(default)s)",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    api_url = os.environ.get("PREFECT_API_URL")
    if not api_url:
        raise UserError("set PREFECT_API_URL to the Prefect server (sngp serve prints it)")
    status = sync_drift_automation(api_url, args.cooldown_minutes)
    print(
        f"automation {DRIFT_AUTOMATION_NAME!r}: {status} ({DRIFT_EVENT} -> {RETRAIN_DEPLOYMENT}, "
        f"at most once per {args.cooldown_minutes} min)"
    )
    status = sync_retry_automation(api_url)
    crashed = f"a crashed {RETRAIN_DEPLOYMENT} run"
    print(f"automation {RETRY_AUTOMATION_NAME!r}: {status} ({crashed} -> {RETRY_DEPLOYMENT}, once)")
    return 0
