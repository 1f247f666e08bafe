"""The `sngp` command: one entry point, one module per subcommand (imported only when used).

Each subcommand module defines `HELP` (one line), `add_arguments(parser)` and `main(args) -> int`.
Errors the user can fix (bad config, port in use, ...) raise `UserError`: printed as one line, exit 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import threading
from typing import NoReturn

SUBCOMMANDS = {
    "run": "flows.run_command",
    "retrain": "flows.retrain_command",
    "serve": "flows.serve",
    "sweep": "flows.sweep_command",
}


class UserError(Exception):
    """A problem with the user's input or environment: reported as one clear line, exit code 2."""


def _load(name: str):
    try:
        return importlib.import_module(SUBCOMMANDS[name])
    except ModuleNotFoundError as exc:  # a subcommand not shipped yet
        if exc.name == SUBCOMMANDS[name]:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sngp",
        description="Uncertainty-aware deep learning with SNGP: Prefect pipelines recorded in MLflow.",
        epilog="Example: sngp run --config conf/smoke.yaml --set training.epochs=5  "
        "('sngp COMMAND --help' lists a command's options).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = _load(name)
        if module is None:
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    code = _run(argv)
    if argv is None:  # the `sngp` command itself; callers passing argv (tests) get the code back
        _exit_without_teardown(code)
    return code


def _exit_without_teardown(code: int) -> NoReturn:
    """Exit as Python would, minus freeing every module and object one by one (~0.6 s with Prefect and
    MLflow loaded, more with TensorFlow: a tenth of a cached run). Everything an exit must do still
    happens, in Python's order: pending thread-pool work and non-daemon threads are waited for, the
    atexit handlers run (Prefect delivers its last logs and events, logging flushes, the temporary
    Prefect server stops, temporary folders are removed), then stdout and stderr are flushed."""
    shutdown_threads = getattr(threading, "_shutdown", None)  # what the interpreter itself calls first
    if shutdown_threads is not None:
        shutdown_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._module.main(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"sngp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sngp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
