"""Per-rank training state, peak memory, checkpoint cost and step time of every parallelism mode at
1, 2, 4 ranks.

For each (mode, world) it spawns real gloo ranks running the Trainer on the same model (the MoE, or
with --model dense a dense one) and measures, on every rank, from the real tensors: bytes of
parameters + gradients + optimizer state; the peak resident memory the training steps added to the
process (ru_maxrss after the steps minus the resident size before the model was built); the time to
save a sharded checkpoint and the bytes this rank wrote; the time to load it back (into the same
layout); the median step time. From bytes per parameter it states the largest model whose state
fits a per-rank budget under each mode. Beside the measured state of rank 0 it prints the state
`shardyard validate` predicts for that rank (runtime.worker_memory: the job's model placed, pruned to
rank 0's pipeline stages and stepped on the meta device), as predicted / measured.

    python benchmarks/scale.py --worlds 1 2 4 --steps 6 --out benchmarks/results/scale-<date>.md
    python benchmarks/scale.py --worlds 4 --modes ddp fsdp ep+fsdp tp2 tp2+fsdp tp4 --out ...  # with TP
    python benchmarks/scale.py --worlds 4 --modes pp2 pp2+tp2 pp2+ep2+fsdp pp4 --out ...       # with PP
    python benchmarks/scale.py --smoke   # 2 ranks, zero2, ep2+fsdp, tp2 and pp2, a small model, 2 steps, temp dir
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shardyard import envvars
from shardyard.comm.launch import spawn
from shardyard.platform.spec import load_spec_text

MODES = {  # name -> (expert_parallel(world), shard, zero, tensor_parallel, pipeline_parallel)
    "ddp": (lambda w: 1, "none", 0, 1, 1),
    "ep": (lambda w: w, "none", 0, 1, 1),
    "zero2": (lambda w: 1, "none", 2, 1, 1),
    "fsdp": (lambda w: 1, "full", 0, 1, 1),
    "ep+fsdp": (lambda w: w, "full", 0, 1, 1),  # the composed mode: experts over all ranks, the rest sharded
    "ep2+fsdp": (lambda w: min(w, 2), "full", 0, 1, 1),  # EP 2 x shard (the tested layout)
    "tp2": (lambda w: 1, "none", 0, 2, 1),  # tensor parallel pairs, replicated over the pairs
    "tp2+fsdp": (lambda w: 1, "full", 0, 2, 1),  # 2-D: FSDP over the pairs x TP 2
    "tp2+ep2": (lambda w: 2, "none", 0, 2, 1),  # MoE: experts over each TP pair's ranks, tokens split
    "tp4": (lambda w: 1, "none", 0, 4, 1),
    "pp2": (lambda w: 1, "none", 0, 1, 2),  # two-stage pipelines (1F1B), replicated
    "pp2+tp2": (lambda w: 1, "none", 0, 2, 2),  # each stage tensor parallel over a pair
    "pp2+ep2+fsdp": (lambda w: 2, "full", 0, 1, 2),  # each stage: experts over 2 ranks, the rest sharded
    "pp4": (lambda w: 1, "none", 0, 1, 4),
}
MOE_ONLY = ("ep", "ep+fsdp", "ep2+fsdp", "tp2+ep2", "pp2+ep2+fsdp")


SMOKE_MODES = ["zero2", "ep2+fsdp", "tp2", "pp2"]  # DeepSpeed, EP composed with FSDP (DTensor state), TP, PP


def spec_text(
    name: str, storage: Path, world: int, mode: str, width: int, experts: int, steps: int, kind: str = "moe"
) -> str:
    ep_of, shard, zero, tp, pp = MODES[mode]  # pipelines: the batch of 4 in pp micro-batches (1F1B's least)
    moe = f", moe: {{num_experts: {experts}, top_k: 2}}" if kind == "moe" else ""
    return f"""name: {name}
seed: 0
model: {{kind: {kind}, width: {width}, depth: 4, heads: 4, ffn: {{hidden: {3 * width}}}{moe}}}
data: {{paths: [stdlib], seq_len: 128, max_bytes: 3000000}}
optim: {{lr: 1.0e-3, schedule: {{warmup: 1}}}}
training: {{steps: {steps}, batch_size: 4, eval_every: 0, eval_bytes: 2048}}
parallel: {{expert_parallel: {ep_of(world)}, shard: {shard}, zero: {zero}, tensor_parallel: {tp},
  pipeline_parallel: {pp}, pipeline: {{microbatches: {pp}}}}}
resources: {{workers: {world}, cpus_per_worker: 1, max_failures: 0}}
checkpoint: {{dir: {storage}, every: 0, keep: 2}}
tracking: {{mode: disabled}}
"""


def _rank(topology, text: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from shardyard.runtime import checkpoint as ckpt
    from shardyard.runtime.worker import Trainer

    os.environ.update(
        RANK=str(topology.rank),
        WORLD_SIZE=str(topology.world_size),
        LOCAL_RANK=str(topology.local_rank),
        **{envvars.FAKE_RANKS_PER_NODE: str(topology.ranks_per_node)},
    )
    spec = load_spec_text(text)
    resident_before = _resident_bytes()
    trainer = Trainer(spec, Path(out), lambda metrics, directory: None)

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    times = []
    for _ in range(spec.training.steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    peak_added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - resident_before
    inputs, targets = trainer.loader.next_batch()
    if trainer.pipeline is not None:  # this rank's stages, forward and backward of every micro-batch
        trainer.pipeline.forward_backward(inputs, targets, scale=1.0)
    else:
        _, ce = trainer.module(inputs, targets)
        trainer.grad_step.backward(ce)
    engine = getattr(trainer.grad_step, "engine", None)
    if engine is not None:  # DeepSpeed keeps partitions in its own flat buffers
        opt = engine.optimizer
        state = sum(local_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        state += sum(local_bytes(t) for t in getattr(opt, "single_partition_of_fp32_groups", []))
        grads = sum(
            local_bytes(t)
            for g in getattr(opt, "averaged_gradients", {}).values()
            for t in (g if isinstance(g, list) else [g])
            if t is not None
        )
    else:
        state = sum(
            local_bytes(v)
            for s in trainer.optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        )
        grads = sum(local_bytes(p.grad) for p in trainer.model.parameters() if p.grad is not None)
    params = sum(local_bytes(p) for p in trainer.model.parameters())
    total_params = sum(
        p.numel()
        for p in __import__("shardyard.models", fromlist=["build_model"])
        .build_model(spec.model, spec.data.seq_len)
        .parameters()
    )
    trainer.optimizer.zero_grad(set_to_none=True)

    rank = topology.rank
    predicted = None
    if rank == 0:  # what validate predicts for this rank (rank 0: under pp, the first stage's)
        from shardyard.runtime.worker_memory import predict_worker_memory

        prediction = predict_worker_memory(spec)
        predicted = {"state": prediction.state, "peak": prediction.state + prediction.activations}
    with tempfile.TemporaryDirectory(prefix=f"scale-r{rank}-") as tmp:
        directory = Path(tmp) / "ckpt"
        meta = {
            "step": 0,
            "name": spec.name,
            "layout": trainer.layout(),
            "scheduler": trainer.scheduler.state_dict(),
            "data_position": trainer.loader.position(),
        }
        dist.barrier()
        start = time.perf_counter()
        ckpt.save_checkpoint(trainer.train_state, directory, meta)
        save_s = time.perf_counter() - start
        written = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        # Load back from a merged copy (every rank's files, as Ray Train merges them), same layout.
        merged = Path(out) / "merged"
        if rank == 0:
            merged.mkdir(parents=True, exist_ok=True)
        for turn in range(topology.world_size):  # one rank at a time: ranks share sub-directory names
            dist.barrier()
            if turn == rank:
                shutil.copytree(directory, merged, dirs_exist_ok=True)
        dist.barrier()
        start = time.perf_counter()
        ckpt.load_checkpoint(trainer.train_state, merged)
        load_s = time.perf_counter() - start
    record = {
        "rank": rank,
        "params": params,
        "grads": grads,
        "optim": state,
        "total_params": total_params,
        "peak_added": peak_added,
        "save_s": save_s,
        "load_s": load_s,
        "ckpt_bytes": written,
        "step_s": statistics.median(times[1:] or times),
        "predicted": predicted,  # rank 0 only
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


def _resident_bytes() -> int:
    """This process's resident set size now (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(mode: str, world: int, width: int, experts: int, steps: int, kind: str = "moe") -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        name = f"scale-{mode.replace('+', '-')}-{world}"
        text = spec_text(name, Path(tmp), world, mode, width, experts, steps, kind)
        spawn(_rank, world, min(world, 2), text, tmp)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--model", choices=["moe", "dense"], default="moe", help="the MoE, or a dense model")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--budget-gb", type=float, default=80.0, help="per-rank state budget for the 'largest model' column"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="2 ranks, zero2, ep2+fsdp, tp2 and pp2, width 64, 4 experts, 2 steps, temp dir",
    )
    args = parser.parse_args()
    if args.smoke:
        import importlib.util
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks.smoke import smoke_dir

        modes = [m for m in SMOKE_MODES if MODES[m][2] == 0 or importlib.util.find_spec("deepspeed") is not None]
        args.worlds, args.modes, args.width, args.experts, args.steps = [2], modes, 64, 4, 2
        args.out = smoke_dir("scale") / "scale.md"
    load = os.getloadavg()[0]
    rows = []
    for mode in args.modes:
        for world in args.worlds:
            ep_of, _, _, tp, pp = MODES[mode]
            if (
                (world == 1 and mode.startswith("ep"))
                or world % (tp * pp)
                or (mode in MOE_ONLY and args.model != "moe")
            ):
                continue
            ranks = measure(mode, world, args.width, args.experts, args.steps, args.model)
            state = [r["params"] + r["grads"] + r["optim"] for r in ranks]
            total = ranks[0]["total_params"]
            per_param = max(state) / total
            rows.append(
                {
                    "mode": mode,
                    "world": world,
                    "params": total,
                    "state_max_mb": max(state) / 1e6,
                    "state_mean_mb": statistics.mean(state) / 1e6,
                    "peak_added_mb": max(r["peak_added"] for r in ranks) / 1e6,
                    "bytes_per_param": per_param,
                    "ckpt_mb_per_rank": max(r["ckpt_bytes"] for r in ranks) / 1e6,
                    "save_s": max(r["save_s"] for r in ranks),
                    "load_s": max(r["load_s"] for r in ranks),
                    "step_s": statistics.median(r["step_s"] for r in ranks),
                    "fits_b_params": args.budget_gb * 1e9 / per_param / 1e9,
                    "rank0_state_predicted_over_measured": ranks[0]["predicted"]["state"] / state[0],
                    "rank0_peak_predicted_mb": ranks[0]["predicted"]["peak"] / 1e6,
                    "rank0_peak_added_mb": ranks[0]["peak_added"] / 1e6,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    header = (
        "| mode | ranks | state/rank max (MB) | mean | peak added/rank (MB) | bytes/param | ckpt MB/rank | save s | "
        f"load s | step s | largest model in {args.budget_gb:g} GB/rank (B params) | rank 0 state: predicted / measured "
        "| rank 0 peak MB: predicted (state + activations) / added |"
    )
    lines = [header, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['world']} | {r['state_max_mb']:.2f} | {r['state_mean_mb']:.2f} | "
            f"{r['peak_added_mb']:.1f} | "
            f"{r['bytes_per_param']:.2f} | {r['ckpt_mb_per_rank']:.2f} | {r['save_s']:.3f} | {r['load_s']:.3f} | "
            f"{r['step_s']:.3f} | {r['fits_b_params']:.1f} | {r['rank0_state_predicted_over_measured']:.3f} | "
            f"{r['rank0_peak_predicted_mb']:.1f} / {r['rank0_peak_added_mb']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    print(f"model {args.model}, {rows[0]['params'] / 1e6:.1f}M parameters" if rows else "no rows")
    print(f"load average at start {load:.1f}, at end {os.getloadavg()[0]:.1f}")
    if args.out:
        args.out.write_text(table + "\n")
        print(f"table written to {args.out}")


if __name__ == "__main__":
    main()
