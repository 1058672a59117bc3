"""The `openmm-stable` command line: one sub-module per stage, each with `register(subparsers)`.

A sub-module's `register` adds its sub-command and sets `func` on the parser; the
function receives the parsed arguments and returns an exit code. Bad input raises
`openmm_stable.errors.InputError` (message, exit code 2); a failed distributed worker raises
`openmm_stable.errors.WorkerError` (message, exit code 3); anything else shows its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from openmm_stable.errors import InputError, WorkerError

# Stage modules, in pipeline order. Each lives in openmm_stable/cli/<name>.py (`importing`: the
# `import` command, a model trained elsewhere in place of `pretrain`).
_STAGES = ["data", "pretrain", "importing", "export", "simulate", "refine", "compare"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openmm-stable",
        description="Stability-aware training (StABlE) of ML force fields with OpenMM.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for stage in _STAGES:  # a command module that fails to import is an error, not a missing command
        importlib.import_module(f"openmm_stable.cli.{stage}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except (InputError, FileNotFoundError) as err:  # bad input; any other exception is a bug: traceback
        print(f"openmm-stable {args.command}: error: {err}", file=sys.stderr)
        return 2
    except WorkerError as err:  # a distributed worker failed: the message says how to go on
        print(f"openmm-stable {args.command}: worker failure: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
