"""User-facing errors: the CLI prints them without a traceback and exits with their code."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an impossible request; `str(err)` is the whole message for the user."""

    exit_code = 2


class SpecError(UserError):
    """A job spec that does not load or validate; the message names file, line and field."""


class ClusterError(UserError):
    """The Ray cluster cannot be reached, started or asked about a job."""

    exit_code = 3
