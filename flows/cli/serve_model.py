"""`sngp serve-model`: one MLflow model behind MLflow's scoring server until Ctrl-C (flows.ops.model_server).

The model contract (DESIGN.md): POST /invocations with a DataFrame (JSON `dataframe_split` or
`dataframe_records`, or CSV with Content-Type text/csv) of the feature columns by name; the answer has
`predicted`, `prob_<class>`, `uncertainty` and `abstain` per row; `{"params": {"abstain_threshold": t}}`
overrides the threshold for one request. An alias (models:/NAME@champion) is resolved to its version
when the server starts: moving the alias later does not change what this server answers.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from flows.cli.common import UserError, add_timeout_argument, add_tracking_argument
from flows.ops.model_server import DEFAULT_MODEL_PORT, READY_TIMEOUT, ModelServer, model_server_env
from flows.ops.network import check_port_free

HELP = "Serve an MLflow model (e.g. models:/sngp-uncertainty-sngp@champion) over REST until Ctrl-C."
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--port", type=int, default=DEFAULT_MODEL_PORT, help="default: %(default)s")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    add_tracking_argument(
        parser,
        default="$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory",
        use=" where models:/ and runs:/ URIs are looked up",
    )
    add_timeout_argument(parser, READY_TIMEOUT, until="the server to answer")
    parser.epilog = (
        "Then: curl -H 'Content-Type: application/json' -d "
        '\'{"dataframe_split": {"columns": ["x0", "x1"], "data": [[0.5, 0.2]]}}\' '
        "http://127.0.0.1:5001/invocations"
    )


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="URI",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/MODEL_ID or runs:/RUN_ID/PATH",
    )  # fmt: skip


def tracking_uri(args: argparse.Namespace) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db, which must then exist (a lookup
    would otherwise create an empty store and report the model missing)."""
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    default = Path.cwd() / "mlflow.db"
    if args.model.startswith(("models:/", "runs:/")) and not default.is_file():
        raise UserError(
            f"no MLflow store here ({default} does not exist): give --tracking-uri or set MLFLOW_TRACKING_URI"
        )
    return f"sqlite:///{default}"


def resolved_model(args: argparse.Namespace, tracking: str):
    from tasks.model_ref import ModelNotFound, resolve_model  # lazy: imports MLflow

    try:
        return resolve_model(args.model, tracking)
    except ModelNotFound as exc:
        raise UserError(f"--model: {exc}") from None


def main(args: argparse.Namespace) -> int:
    check_port_free(args.host, args.port, "--port")  # before the model lookup: a clear error at once
    tracking = tracking_uri(args)
    ref = resolved_model(args, tracking)
    server = ModelServer(
        ref.resolved_uri, host=args.host, port=args.port, env=model_server_env(tracking_uri=tracking)
    )
    print(f"sngp serve-model: starting the scoring server of {ref.label} ({ref.resolved_uri})", flush=True)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        stop.set()

    previous: dict = {}
    try:  # a Ctrl-C while it starts is a KeyboardInterrupt: the server is stopped all the same
        seconds = server.start(timeout=args.timeout)
        previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
        print(
            f"sngp serve-model: serving {ref.label} at {server.invocations_url} (up in {seconds:.1f} s); "
            "Ctrl-C stops it",
            flush=True,
        )
        while not stop.wait(1.0):
            if not server.alive:
                code = server.child.exit_code
                print(
                    f"sngp serve-model: error: the scoring server stopped (exit code {code})", file=sys.stderr
                )
                return 1
        print(f"sngp serve-model: received {signal.Signals(received[0]).name}, stopping", flush=True)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
