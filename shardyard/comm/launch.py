"""Start real gloo process groups on one machine (tests, small benchmarks).

`spawn(fn, world_size, ranks_per_node, *args)` starts `world_size` processes, initialises gloo through
a file store (no ports to race for), fakes `ranks_per_node` ranks per node and calls
`fn(topology, *args)` on each rank. An exception on any rank fails the whole call with its traceback.

The ranks are forked from a fork server that imported torch and the Trainer once (multiprocessing's
"forkserver" start method): a fresh interpreter per rank spent ~2.5 s of CPU importing them again, which
on a small machine was most of a short distributed test. A fork server is a clean process (exec'd,
not a fork of the caller), so no caller threads or locks are copied; each rank still gets the caller's
environment, working directory and module search path as they are at the call (the server's own were
fixed when it started).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardyard.comm.topology import Topology

# Imported once by the fork server: what every rank's function needs (the Trainer pulls in the rest).
PRELOAD = ["torch", "torch.distributed", "shardyard.runtime.worker"]


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    ranks_per_node: int,
    store: str,
    args: tuple[Any, ...],
    caller: tuple[dict[str, str], str],
) -> None:
    environment, cwd = caller  # the caller's, as spawn() was called (not the fork server's)
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(cwd)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    topology = Topology.from_rank(rank, world_size, ranks_per_node)
    # The variables torchrun and Ray Train set: what Topology.from_env (and so every Trainer) reads.
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(topology.local_rank),
        LOCAL_WORLD_SIZE=str(topology.ranks_per_node),
        NODE_RANK=str(topology.node_rank),
    )
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    try:
        fn(topology, *args)
        # Tear down together: a rank that destroys its gloo pairs while a peer still reads from them
        # can abort the peer ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done and torn down: end the rank as a forked child ends, without interpreter finalization and
    # C++ static destructors. A DistributedDataParallel model keeps its process group alive past
    # destroy_process_group (torch 2.13 holds it from C++), so gloo's native threads (its TCP loop and
    # work threads) are still running when a spawned child finalizes; tearing the runtime down beside
    # them aborted a rank now and then (SIGABRT, no Python traceback) once its peer had exited. A rank
    # that raised still leaves through multiprocessing, which reports its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def caller_context() -> tuple[dict[str, str], str]:
    """This process's environment and working directory, as `_entry` applies them in a rank."""
    return dict(os.environ), os.getcwd()


def start_ranks(
    fn: Callable[..., Any], world_size: int, ranks_per_node: int, store: str, args: tuple[Any, ...], join: bool
) -> Any:
    """Start the ranks from the fork server (gloo through the file `store`); join=False returns the
    processes' context for a caller that waits on them itself."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)  # read when the server starts
    return mp.start_processes(
        _entry,
        args=(fn, world_size, ranks_per_node, store, args, caller_context()),
        nprocs=world_size,
        join=join,
        start_method="forkserver",
    )


def spawn(fn: Callable[..., Any], world_size: int, ranks_per_node: int, *args: Any) -> None:
    """Run `fn(topology, *args)` on `world_size` gloo ranks; `fn` must be importable (module level)."""
    with tempfile.TemporaryDirectory(prefix="shardyard-pg-") as tmp:
        start_ranks(fn, world_size, ranks_per_node, os.path.join(tmp, "store"), args, join=True)
