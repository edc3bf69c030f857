"""Arguments several commands share."""

from __future__ import annotations

import argparse

from shardyard import envvars


def add_spec(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec YAML file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field, e.g. --set training.steps=50 (repeatable)",
    )


def add_jobs_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help=f"Ray Jobs address (default ${envvars.ADDRESS}, $RAY_ADDRESS or http://127.0.0.1:8265)",
    )


def add_fault_step(p: argparse.ArgumentParser) -> None:
    """`--fault-step N` (hidden, tests only): see job_commands.set_test_hooks."""
    p.add_argument("--fault-step", type=int, default=None, help=argparse.SUPPRESS)
