"""Environment variables for the workers, secrets included, that never land anywhere but the
workers' environment.

A spec's `env` maps names to plain values (stored with the spec, shown by `validate`) or to
`{from_env: VAR, secret: true}`: the value of $VAR where `shardyard run|submit` runs. Only the
variable's *name* is in the spec, so the resolved spec (spec.yaml, spec-history/, checkpoints,
the wandb config, the submitted job's SHARDYARD_SPEC_JSON) never holds the value. `WANDB_API_KEY`
is forwarded the same way when it is set. Values travel in the Ray runtime env's env_vars (the
embedded cluster's, or the submitted job's), which only token holders can read back from the
cluster; shardyard prints, logs and stores none of them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from shardyard import envvars
from shardyard.platform.errors import SpecError
from shardyard.platform.schema import EnvVarSpec, JobSpec

FORWARDED_SECRETS = ("WANDB_API_KEY",)


def worker_env(spec: JobSpec, environ: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(plain, secret) variables for the workers' runtime env; SpecError naming the entry when a
    `from_env` variable is not set here."""
    environ = dict(os.environ) if environ is None else environ
    plain: dict[str, str] = {}
    secret: dict[str, str] = {}
    for name, entry in spec.env.items():
        if isinstance(entry, str):
            plain[name] = entry
            continue
        assert isinstance(entry, EnvVarSpec)
        if entry.from_env not in environ:
            raise SpecError(
                f"env.{name}.from_env: ${entry.from_env} is not set in this shell; export it before "
                f"`shardyard run|submit` (its value is passed to the workers, never stored)"
            )
        (secret if entry.secret else plain)[name] = environ[entry.from_env]
    for name in FORWARDED_SECRETS:
        if environ.get(name) and name not in spec.env:
            secret[name] = environ[name]
    return plain, secret


def runtime_env_vars(spec: JobSpec, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Every variable `spec` gives its workers (plain and secret together, for the runtime env)."""
    plain, secret = worker_env(spec, environ)
    return {**plain, **secret}


def record_secret_probe(run_dir: Path, rank: int) -> None:
    """Test hook ($SHARDYARD_SECRET_PROBE=NAME,...): write the sha256 of each named variable's value
    as this worker sees it, so a test can check a secret arrived without the value being written."""
    names = [n for n in os.environ.get(envvars.SECRET_PROBE, "").split(",") if n]
    if not names:
        return
    digests = {n: hashlib.sha256(os.environ.get(n, "").encode()).hexdigest() for n in names}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / f"secret-probe-rank{rank}.txt").write_text(
        "".join(f"{n} {d}\n" for n, d in sorted(digests.items()))
    )
