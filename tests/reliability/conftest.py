"""The reliability tests' own Ray cluster: they kill and add nodes, so not the session's shared one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="package")
def _fault_cluster() -> Iterator[Any]:
    """Head and one worker node of 2 CPUs each; node deaths detected within ~3 s. Started once for the
    package: a test that kills the worker node leaves a fresh one in its place (the elastic test adds
    one; the faults test, the last to use it, removes its dead node)."""
    from shardyard.cluster.auth import ensure_token

    ensure_token(generate=True)
    from ray.cluster_utils import Cluster

    fast_health = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 120 * 1024**2, "_system_config": fast_health},
    )
    cluster.add_node(num_cpus=2, object_store_memory=120 * 1024**2)
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(_fault_cluster: Any) -> Iterator[Any]:
    """The package's fault cluster with this process connected as a driver for one module."""
    import ray

    ray.init(address=_fault_cluster.address, logging_level="WARNING")
    try:
        yield _fault_cluster
    finally:
        ray.shutdown()
