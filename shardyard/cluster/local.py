"""The embedded local Ray cluster `shardyard run` starts for a job and stops afterwards (or, if the
driver is killed, its watcher ends: cluster/orphans.py)."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import uuid
from collections.abc import Iterator

from shardyard import envvars
from shardyard.cluster.auth import ensure_token
from shardyard.cluster.listening import descendants, describe, listeners_of
from shardyard.cluster.orphans import start_watcher
from shardyard.platform.errors import ClusterError
from shardyard.platform.schema import JobSpec


def cpus_needed(spec: JobSpec) -> int:
    """Logical CPUs for the workers plus one for the Ray Train controller (never fewer than 2)."""
    return max(2, math.ceil(spec.resources.max_workers * spec.resources.cpus_per_worker) + 1)


@contextlib.contextmanager
def local_cluster(
    num_cpus: int, num_gpus: int | None = None, object_store_mb: int = 256, secret_env: dict[str, str] | None = None
) -> Iterator[None]:
    """An embedded cluster on loopback (node address, dashboard, agents); `secret_env` reaches every
    worker through the runtime env only. Prints what listens where, read from the socket table."""
    ensure_token(generate=True)  # before Ray reads its config
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray's runtime env agent logs every runtime env, env_vars values included, at INFO: the secrets of
    # a spec's `env` would land in the session logs. WARNING keeps them out (and Ray's daemons quieter).
    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
    # Every process of this cluster inherits the mark; the watcher ends them all if the driver dies.
    os.environ[envvars.CLUSTER_ID] = uuid.uuid4().hex
    # The dashboard serves the state API Ray Train's placement-group cleaner polls. address="local":
    # always a new embedded cluster, never one that happens to run on this machine already. SHARDYARD_*
    # variables (test hooks such as FAULT_STEP) reach every worker through the runtime_env.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        object_store_memory=object_store_mb * 1024**2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=None,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        logging_level="WARNING",
        runtime_env={"env_vars": {**envvars.forwarded(), **(secret_env or {})}},
    )
    watcher = start_watcher(os.environ[envvars.CLUSTER_ID])
    print(
        f"embedded Ray cluster (token authentication on):\n{describe(listeners_of(descendants(os.getpid())))}",
        flush=True,
    )
    try:
        yield
    finally:
        ray.shutdown()
        watcher.kill()
        watcher.wait()
        os.environ.pop(envvars.CLUSTER_ID, None)


@contextlib.contextmanager
def existing_cluster(address: str, secret_env: dict[str, str] | None = None) -> Iterator[None]:
    """Connect to a running cluster (`auto`, or host:port of its GCS) with its token."""
    try:
        ensure_token(generate=False)
    except FileNotFoundError as err:
        raise ClusterError(str(err)) from None
    if address != "auto":
        host, _, port = address.removeprefix("ray://").partition(":")
        try:
            socket.create_connection((host, int(port or 6379)), timeout=5).close()
        except (OSError, ValueError) as err:
            raise ClusterError(f"cannot reach the Ray cluster's GCS at {address}: {err}") from None
    import ray

    try:
        ray.init(
            address=address,
            log_to_driver=True,
            logging_level="WARNING",
            runtime_env={"env_vars": {**envvars.forwarded(), **(secret_env or {})}},
        )
    except Exception as err:  # ConnectionError, auth failure
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {err}") from None
    try:
        yield
    finally:
        ray.shutdown()
