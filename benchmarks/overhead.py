"""The platform tax: `shardyard run` against a bare two-process gloo DDP loop of the same model, batch
and optimizer, back to back, interleaved (bare, trainer, run, bare, trainer, run, ...).

- bare:    torch.multiprocessing + gloo, DDP(model) (the model alone for one worker), the job's AdamW and LR schedule, torch's
           clip_grad_norm_, random windows of the job's training bytes; nothing else.
- trainer: the workers' Trainer (runtime.worker) on the same two spawned gloo ranks, no Ray: the
           platform's own loop (timers, MoE statistics, the stop agreement, logging, checkpoints).
- run:     `shardyard run SPEC`: its embedded Ray cluster, Ray Train workers, the driver's live view,
           wandb offline; what a user gets.

Each variant's figure is its steady-state bytes/s: the median over logging windows of log_every steps,
after the first two windows (warm-up), the pauses for evaluation and checkpoints left out as the
Trainer's own `bytes_per_s` does (the logging between windows counted, as the bare loop's is).
Ratios are per round (variant / bare of the same round).

    python benchmarks/overhead.py [--spec jobs/moe-tiny.yaml] [--rounds 3]
    python benchmarks/overhead.py --smoke        # 12 steps, one round, no Ray (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardyard.comm.launch import spawn  # noqa: E402
from shardyard.platform.schema import JobSpec  # noqa: E402
from shardyard.platform.spec import load_spec, spec_from_json  # noqa: E402
from shardyard.tracking.logger import read_metrics  # noqa: E402

WARMUP_WINDOWS = 2


def steady(rates: list[float]) -> float:
    return statistics.median(rates[WARMUP_WINDOWS:] or rates)


# ------------------------------------------------------------------------------ bare loop
def _bare(topology, spec_json: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from shardyard.data.training_data import load_training_data
    from shardyard.models import build_model
    from shardyard.optim import build_optimizer, build_scheduler

    spec = spec_from_json(spec_json)
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    torch.manual_seed(spec.seed)
    data = load_training_data(spec.data)
    model = build_model(spec.model, spec.data.seq_len, data.vocab_size)
    # DDP where there is something to reduce: the Trainer skips it for one worker, and so does this loop
    module = DistributedDataParallel(model, forward_sync_buffers=False) if topology.world_size > 1 else model
    optimizer = build_optimizer(spec.optim, model)
    scheduler = build_scheduler(spec.optim, optimizer, spec.training.steps)
    tokens = np.asarray(data.train)
    rng = np.random.default_rng(spec.seed + topology.rank)
    batch, seq, every = spec.training.batch_size, spec.data.seq_len, spec.training.log_every
    rates, start = [], time.perf_counter()
    for step in range(1, spec.training.steps + 1):
        starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
        window = torch.from_numpy(np.stack([tokens[s : s + seq + 1] for s in starts]).astype(np.int64))
        _, loss = module(window[:, :-1], window[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % every == 0:
            now = time.perf_counter()
            rates.append(every * batch * seq * topology.world_size * data.bytes_per_token / (now - start))
            start = now
    dist.barrier()
    if topology.rank == 0:
        Path(out).write_text(json.dumps(rates))


def bare(spec: JobSpec, root: Path) -> float:
    out = root / "bare.json"
    spawn(_bare, spec.resources.workers, spec.resources.workers, spec.model_dump_json(), str(out))
    return steady(json.loads(out.read_text()))


# ------------------------------------------------------------------------------ the Trainer, no Ray
def _trainer(topology, spec_json: str, run_dir: str) -> None:
    from shardyard.runtime.worker import LocalReporter, Trainer

    spec = spec_from_json(spec_json)
    Trainer(spec, Path(run_dir), LocalReporter(Path(run_dir), spec.checkpoint.keep)).fit()


def logged_rate(run_dir: Path) -> float:
    return steady([r["bytes_per_s"] for r in read_metrics(run_dir) if r.get("kind") == "train"])


def trainer(spec: JobSpec, root: Path, name: str) -> float:
    spec = spec.model_copy(update={"name": name})
    run_dir = root / name
    spawn(_trainer, spec.resources.workers, spec.resources.workers, spec.model_dump_json(), str(run_dir))
    return logged_rate(run_dir)


# ------------------------------------------------------------------------------ shardyard run
def shardyard_run(spec_path: str, overrides: list[str], root: Path, name: str) -> float:
    """`shardyard run SPEC` as the README runs it: its own embedded Ray cluster (dashboard, agents,
    Ray Train's controller actors), started and stopped by the run; its start-up is outside the windows."""
    sets = [*overrides, f"name={name}", f"checkpoint.dir={root}"]
    cmd = [sys.executable, "-m", "shardyard.cli", "run", spec_path]
    for o in sets:
        cmd += ["--set", o]
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"shardyard run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return logged_rate(root / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="jobs/moe-tiny.yaml")
    parser.add_argument("--set", action="append", default=[], help="spec override, for every variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true", help="bare and trainer only")
    parser.add_argument("--smoke", action="store_true", help="12 steps, one round, no Ray (seconds)")
    args = parser.parse_args()
    overrides = ["training.eval_bytes=4096", *args.set]  # eval runs once, at the end, outside the windows
    if args.smoke:
        overrides += ["training.steps=12", "training.log_every=2", "data.max_bytes=300000", "checkpoint.every=6"]
        args.rounds, args.no_ray = 1, True
    spec = load_spec(args.spec, overrides)
    print(f"# Platform tax: {args.spec} ({' '.join(overrides)})")
    print(f"torch {torch.__version__}, {spec.resources.workers} workers x {spec.resources.cpus_per_worker} CPU")
    print(f"load before: {os.getloadavg()}", flush=True)
    variants = ["bare", "trainer"] + ([] if args.no_ray else ["run"])
    rates: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="shardyard-overhead-") as tmp:
        root = Path(tmp)
        spec = spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(update={"dir": str(root)})})
        for r in range(args.rounds):
            rates["bare"].append(bare(spec, root))
            rates["trainer"].append(trainer(spec, root, f"trainer-{r}"))
            if not args.no_ray:
                rates["run"].append(shardyard_run(args.spec, overrides, root, f"run-{r}"))
            line = ", ".join(f"{v} {rates[v][-1]:,.0f}" for v in variants)
            print(f"round {r + 1}: bytes/s {line}; load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"load after: {os.getloadavg()}")
    print("\n| variant | median bytes/s | min..max | x bare (median of per-round ratios) | per-round ratios |")
    print("|---|---:|---:|---:|---|")
    for v in variants:
        ratios = [a / b for a, b in zip(rates[v], rates["bare"])]
        print(
            f"| {v} | {statistics.median(rates[v]):,.0f} | {min(rates[v]):,.0f}..{max(rates[v]):,.0f} | "
            f"{statistics.median(ratios):.3f} | {' '.join(f'{x:.3f}' for x in ratios)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
