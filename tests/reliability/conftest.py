"""The reliability tests' own Ray cluster: they kill and add nodes, so not the session's shared one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Head and one worker node of 2 CPUs each, node deaths detected within ~3 s, this process connected
    as a driver; one per module, down before the next module starts (a cluster left up holds Ray's
    default dashboard and agent ports, which the embedded cluster of test_saves then cannot take)."""
    from shardyard.cluster.auth import ensure_token

    ensure_token(generate=True)
    import ray
    from ray.cluster_utils import Cluster

    fast_health = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "object_store_memory": 120 * 1024**2,
            "include_dashboard": False,  # nothing here reads it; its start costs seconds of CPU
            "_system_config": fast_health,
        },
    )
    cluster.add_node(num_cpus=2, object_store_memory=120 * 1024**2)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
