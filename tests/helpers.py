"""Helpers shared by tests: tiny job specs and running the CLI as a subprocess."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The `shardyard` command as this interpreter runs it (what the console script calls; a shared editable
# install's generated script may name another checkout's entry point)
SHARDYARD = [sys.executable, "-m", "shardyard.cli"]


def tiny_spec_yaml(name: str, storage: Path, **sections: str) -> str:
    """A tiny MoE job spec that trains in seconds on CPU; keyword sections replace defaults."""
    parts = {
        "model": "{kind: moe, width: 64, depth: 2, heads: 2, ffn: {hidden: 128}, moe: {num_experts: 4, top_k: 2}}",
        "data": "{paths: [stdlib], seq_len: 64, max_bytes: 3000000}",
        "optim": "{lr: 3.0e-3, schedule: {warmup: 4}}",
        "training": "{steps: 24, batch_size: 8, eval_every: 12, eval_bytes: 2048, log_every: 1}",
        "resources": "{workers: 2, cpus_per_worker: 1, max_failures: 1}",
        "checkpoint": f"{{dir: {storage}, every: 8, keep: 2}}",
        "tracking": "{mode: offline}",
    }
    parts.update(sections)
    return f"name: {name}\nseed: 0\n" + "".join(f"{k}: {v}\n" for k, v in parts.items())


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run(
        [*SHARDYARD, *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd or ROOT,
    )


def world_of_one():
    """This process as a one-rank process group (what a job's dims make for a world of one)."""
    import torch.distributed as dist

    from shardyard.runtime.parallel.dims import ensure_process_group

    ensure_process_group()
    return dist.group.WORLD


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl (a restarted step keeps its last record)."""
    from shardyard.tracking.logger import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r.get("kind") == "train"}


def train_grad_norms(run_dir: Path) -> dict[int, float]:
    """step -> global gradient norm before clipping (`grad_norm` of the "train" records)."""
    from shardyard.tracking.logger import read_metrics

    return {r["step"]: r["grad_norm"] for r in read_metrics(run_dir) if r.get("kind") == "train"}


def assert_same_series(got: dict[int, float], want: dict[int, float], rel: float, what: str) -> None:
    """Per-step equality of a logged series (losses, grad norms) within `rel`: the same steps, and
    every value within a relative tolerance (a constant scale of 1 + 10 * rel or more fails)."""
    assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
    for step in sorted(want):
        assert abs(got[step] - want[step]) <= rel * abs(want[step]) + 1e-7, (what, step, got[step], want[step])


def adam_update_bound(
    grads: list[Any],
    ref_grads: list[Any],
    weight_gap: Any,
    weights: Any,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> Any:
    """The largest difference, per element, that one AdamW step (the t-th, t = len(grads)) can show
    between two runs whose gradients at steps 1..t were `grads` and `ref_grads` and whose weights
    before the step differ by `weight_gap` (|a - b|; `weights`: the reference's).

    With bias-corrected moments m = sum_s a_s g_s and v = sum_s b_s g_s^2 (sum a_s = sum b_s = 1),
    the direction m / (sqrt(v) + eps) moves by at most (1 + C) max_s |dg_s| / (min(sqrt(v), sqrt(v'))
    + eps), where C = sqrt(sum_s a_s^2 / b_s) bounds |m| / sqrt(v) (Cauchy-Schwarz), |dm| <= max_s
    |dg_s|, and sqrt(v), a weighted 2-norm of the gradients, moves by at most max_s |dg_s| too. So an
    element whose gradient is near Adam's eps may move by up to lr when its last bits differ, while a
    well-conditioned element (|g| much larger than its difference) is held to ~1e-6 relative: a wrong
    lr, weight decay or optimizer state shows there. Plus decoupled weight decay on the weights' own
    gap, and the fp32 rounding of an update read as after - before."""
    import torch

    beta1, beta2 = betas
    t = len(grads)
    a = [(1 - beta1) * beta1 ** (t - 1 - s) / (1 - beta1**t) for s in range(t)]
    b = [(1 - beta2) * beta2 ** (t - 1 - s) / (1 - beta2**t) for s in range(t)]
    c = sum(x * x / y for x, y in zip(a, b)) ** 0.5
    got = [g.double() for g in grads]
    want = [g.double() for g in ref_grads]
    dg = torch.stack([(x - y).abs() for x, y in zip(got, want)]).amax(0)
    root = torch.minimum(sum(w * g * g for w, g in zip(b, got)).sqrt(), sum(w * g * g for w, g in zip(b, want)).sqrt())
    rounding = 4 * torch.finfo(torch.float32).eps * (weights.double().abs() + lr) + 1e-6 * lr
    return lr * ((1 + c) * dg / (root + eps) + weight_decay * weight_gap.double()) + rounding


_shared_ray: dict[str, Any] = {}


def shared_ray_cluster() -> Any:
    """One real 2-node Ray cluster (two raylets of 2 logical CPUs each) shared by the test session.

    Starting a cluster costs 10-15 s, an embedded one per `shardyard run` as much again: jobs that do
    not test the embedded cluster itself (`run_job`) and the multi-node tests (`two_node_ray_cluster`)
    all run here. Each job is its own Ray driver, so jobs stay isolated: their actors, placement groups
    and runtime env end with them. Tests that kill a node start their own cluster. Stopped by
    `stop_shared_ray` at the end of the session (tests/conftest.py)."""
    if "cluster" not in _shared_ray:
        from shardyard.cluster.auth import ensure_token

        ensure_token(generate=True)
        from ray.cluster_utils import Cluster

        # 2 + 2 logical CPUs: a 2-worker job packs onto one node, a 4-worker job spans both (Ray
        # Train's controller takes no CPU). No dashboard: each job's driver cleans up its own groups.
        store = 150 * 1024**2
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 2, "object_store_memory": store, "include_dashboard": False},
        )
        cluster.add_node(num_cpus=2, object_store_memory=store)
        _shared_ray["cluster"] = cluster
    return _shared_ray["cluster"]


def shared_ray_address() -> str:
    """GCS address of the session's shared cluster (`shardyard run --address`)."""
    return shared_ray_cluster().address


def stop_shared_ray() -> None:
    cluster = _shared_ray.pop("cluster", None)
    if cluster is not None:
        cluster.shutdown()


@contextlib.contextmanager
def two_node_ray_cluster(env_vars: dict[str, str] | None = None) -> Iterator[Any]:
    """The session's 2-node cluster with this process connected as a driver, disconnected after.
    `env_vars` go into the driver's runtime env: every task and actor of its jobs sees them (Ray
    Train's workers included), whatever the environment the raylets started with."""
    import ray

    cluster = shared_ray_cluster()
    ray.init(address=cluster.address, logging_level="WARNING", runtime_env={"env_vars": env_vars or {}})
    try:
        yield cluster
    finally:
        ray.shutdown()


def _fit_rank(topology: Any, spec_json: str, run_dir: str, resume: bool) -> None:
    from shardyard.platform.spec import spec_from_json
    from shardyard.runtime import checkpoint as ckpt
    from shardyard.runtime.worker import LocalReporter, Trainer

    spec = spec_from_json(spec_json)
    trainer = Trainer(spec, Path(run_dir), LocalReporter(Path(run_dir), spec.checkpoint.keep))
    if resume:
        trainer.resume(ckpt.find_latest_checkpoint(Path(run_dir)))
    trainer.fit()


def train_on_gloo(
    spec: Any, run_dir: Path, world: int, ranks_per_node: int | None = None, resume: bool = False
) -> None:
    """Train the job spec `spec` to its end into `run_dir` on `world` gloo ranks (`ranks_per_node` per
    faked node): the Trainer a Ray Train worker runs, on the same kind of process group, without a
    worker group to start. For tests whose subject is the training, not Ray. `resume`: from the run's
    newest complete checkpoint, as a worker does when Ray Train hands it none."""
    from shardyard.comm.launch import spawn

    spawn(_fit_rank, world, ranks_per_node or world, spec.model_dump_json(), str(run_dir), resume)


def run_job(spec: Path | str, *args: str, **kwargs: Any):
    """`shardyard run SPEC ARGS` on the session's shared Ray cluster (see shared_ray_address)."""
    return run_cli("run", str(spec), *args, "--address", shared_ray_address(), **kwargs)
