"""The `sngp` command: one entry point, one module per subcommand (imported only when used).

Each subcommand module defines `HELP` (one line), `add_arguments(parser)` and `main(args) -> int`.
Errors the user can fix (bad config, port in use, ...) raise `UserError`: printed as one line, exit 2;
a run ended from outside (a server away longer than --server-grace, a full disk) raises `RunFailed`:
one line, exit 1. `--debug` shows the traceback instead. A flow run that failed raises `FlowFailed`:
its one line, exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flows.cli.errors import FlowFailed, RunFailed, UserError
from flows.ops.errors import ServiceError

SUBCOMMANDS = {
    "run": "flows.cli.run",
    "retrain": "flows.cli.retrain",
    "serve": "flows.cli.serve",
    "sweep": "flows.cli.sweep",
    "serve-model": "flows.cli.serve_model",
    "monitor": "flows.cli.monitor",
    "deploy-automations": "flows.cli.deploy_automations",
}


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
        p.set_defaults(command_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `sngp` command; callers passing argv (tests) get the exit code back."""
    code = _run(argv)
    if argv is None:
        sys.exit(code)
    return code


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.command_module.main(args) or 0)
    except (UserError, ServiceError) as exc:
        if args.debug:
            raise
        print(f"sngp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FlowFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    except RunFailed as exc:  # a server away longer than --server-grace, a full disk
        if args.debug:
            raise
        print(f"sngp {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sngp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
