"""The `shardyard` entry point: the argument parser (each command group adds its own commands) and the
one place that turns a UserError into its message and exit code."""

from __future__ import annotations

import argparse
import os
import sys

from shardyard.cli import cluster_commands, job_commands, run_commands
from shardyard.platform.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardyard", description="Train MoE, byte and low-rank models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    job_commands.add_commands(sub)
    cluster_commands.add_commands(sub)
    run_commands.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
        if args.command == "run" and argv is None:
            _exit_now(code)
        return code
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _exit_now(code: int) -> None:
    """After a Ray driver session the interpreter's teardown can crash inside Ray's C++ threads
    (seen as SIGSEGV after a finished run, under load): everything is written and flushed, so skip it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
