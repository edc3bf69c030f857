"""Every environment variable shardyard reads or sets, by name, in one place (a leaf module).

Test hooks are read where they act (the worker reads FAULT_STEP itself); they reach Ray workers
because the driver forwards every `SHARDYARD_*` variable through the Ray runtime environment.
"""

from __future__ import annotations

import os

PREFIX = "SHARDYARD_"
SPEC_JSON = "SHARDYARD_SPEC_JSON"  # the resolved spec a submitted job's entrypoint runs
RUN_DIR = "SHARDYARD_RUN_DIR"  # overrides <checkpoint.dir>/<name> for a submitted job
ADDRESS = "SHARDYARD_ADDRESS"  # the Ray Jobs address clients use
FAKE_RANKS_PER_NODE = "SHARDYARD_FAKE_RANKS_PER_NODE"  # tests: pretend each node holds this many ranks
FAULT_STEP = "SHARDYARD_FAULT_STEP"  # tests: "<step>[:kill]": rank 0 raises (or is SIGKILLed) once at that step
KILL_IN_SAVE = "SHARDYARD_KILL_IN_SAVE"  # tests: "<step>:<marker>": the last rank dies mid-save once
STALL_IN_SAVE = "SHARDYARD_STALL_IN_SAVE"  # tests: "<step>:<seconds>": that save's writes hang (a stalled filesystem)
SECRET_PROBE = "SHARDYARD_SECRET_PROBE"  # tests: "NAME,...": each worker records the sha256 of those variables
SAMPLE_LEDGER = "SHARDYARD_SAMPLE_LEDGER"  # tests: every rank appends the global window ids it trains on
CLUSTER_ID = "SHARDYARD_CLUSTER_ID"  # marks every process of an embedded cluster (cluster/orphans.py)
PAUSE_AT = "SHARDYARD_PAUSE_AT"  # tests: "<step>:<marker>[,...]": every rank waits after that step until marker exists
HANG_AT = (
    "SHARDYARD_HANG_AT"  # tests: "<step>:<rank>": that rank sleeps once instead of joining the step-boundary all_reduce
)


def forwarded() -> dict[str, str]:
    """The SHARDYARD_* variables of this process, for a Ray runtime_env's env_vars."""
    return {k: v for k, v in os.environ.items() if k.startswith(PREFIX) and k != SPEC_JSON}
