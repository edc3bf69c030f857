"""Low-rank training benchmark: AdamW vs GaLore (reference galore-torch, ours exact / randomized),
Q-GaLore and a low-rank FFN, on a byte-level dense transformer and an MoE model trained on Python
standard-library sources; plus randomized vs exact SVD time at 1024x4096.

    python benchmarks/lowrank.py            # 200 steps per run
    python benchmarks/lowrank.py --quick    # 30 steps, smoke test
    python benchmarks/lowrank.py --state --steps 60   # training-state matrix (below)
    python benchmarks/lowrank.py --smoke    # seconds: a small SVD, 3 steps of every run on a small model, then
                                            # --state (1 worker, 1 run) and --cpu-time

Per run: measured optimizer-state bytes (every tensor in optimizer.state), the model-level training
state (parameters + gradients + optimizer state, activations excluded), mean step time (forward +
backward + step, projection refreshes included), and validation bits per byte after equal steps.

`--state`: the training-state matrix of issue 14. AdamW, GaLore (fp32 moments, whole-model step,
DDP with 2 workers), GaLore layer-wise (LayerwiseStepper) and Q-GaLore with INT8 weights
(prepare_model_for_optimizer), int8 moments and layer-wise updates, on the dense byte model
(width 128, depth 12) and the MoE byte model (width 128, depth 4, 4 experts top-2), each with 1
worker and with 2 gloo workers (data parallel). Every run is its own process(es), so peak RSS is
that run's. Training state is measured from the tensors: weights = distinct storages of the
model's parameters and buffers; gradients = the peak bytes of live gradients (all of them after
backward for whole-model steps, the hooks' peak for layer-wise); optimizer state = every tensor in
optimizer.state. Batch 4 x 128 per worker. Step time: mean over the steps after the first 2. Val bpb
on rank 0 after equal steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from shardyard.data.corpus import load_corpus
from shardyard.models import build_model
from shardyard.models.lowrank import set_lowrank_progress
from shardyard.optim import build_optimizer, build_scheduler, prepare_model_for_optimizer
from shardyard.optim.galore import galore_param_groups
from shardyard.optim.layerwise import LayerwiseStepper
from shardyard.optim.memory import measured_state_bytes, model_tensor_bytes, optimizer_memory_report
from shardyard.optim.projection import exact_basis, randomized_basis, subspace_overlap
from shardyard.platform.schema import DataSpec, ModelSpec, OptimSpec

SEQ, BATCH, LR, RANK, GAP, SCALE = 128, 8, 3e-3, 32, 50, 1.0
VAL_BATCHES, WIDTH, DEPTH = 16, 128, 4  # --smoke: set_smoke_sizes()
CORPUS_BYTES = 20_000_000


def set_smoke_sizes() -> None:
    """--smoke: a small model, short sequences, few batches (figures meaningless, code paths the same)."""
    global SEQ, BATCH, RANK, VAL_BATCHES, WIDTH, DEPTH, CORPUS_BYTES
    SEQ, BATCH, RANK, VAL_BATCHES, WIDTH, DEPTH, CORPUS_BYTES = 32, 4, 8, 2, 64, 1, 3_000_000


if os.environ.get("LOWRANK_SMOKE") == "1":
    set_smoke_sizes()


@dataclass
class Result:
    model: str
    run: str
    state_bytes: int
    train_state_bytes: int
    step_ms: float
    median_ms: float
    bpb: float
    int8_bytes: int = 0


def model_spec(kind: str, lowrank: bool) -> ModelSpec:
    ffn: dict[str, Any] = {"hidden": 3 * WIDTH}
    if lowrank:
        ffn.update(kind="lowrank", rank=RANK)
    extra = {"moe": {"num_experts": 4, "top_k": 2}} if kind == "moe" else {}
    return ModelSpec(kind=kind, width=WIDTH, depth=DEPTH, heads=4, ffn=ffn, **extra)


def optim_spec(kind: str, projection: str = "svd") -> OptimSpec:
    if kind == "adamw":
        return OptimSpec(kind="adamw", lr=LR, schedule={"warmup": 10})
    return OptimSpec(
        kind=kind,
        lr=LR,
        schedule={"warmup": 10},
        galore={"rank": RANK, "update_gap": GAP, "scale": SCALE, "projection": projection},
    )


def reference_optimizer(model: nn.Module) -> torch.optim.Optimizer | None:
    try:
        from galore_torch import GaLoreAdamW as RefGaLore
    except ImportError:
        return None
    groups = galore_param_groups(model, ["attn", "ffn"], RANK, 0.1, experts="dense")  # 2-D only
    groups[0].pop("galore")
    groups[0].update(rank=RANK, update_proj_gap=GAP, scale=SCALE, proj_type="std")
    return RefGaLore(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8, no_deprecation_warning=True)


def batch_at(data: np.ndarray, gen: np.random.Generator) -> torch.Tensor:
    starts = gen.integers(0, len(data) - SEQ - 1, BATCH)
    return torch.from_numpy(np.stack([data[s : s + SEQ + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def val_bpb(model: nn.Module, val: np.ndarray, batches: int | None = None) -> float:
    batches = batches or VAL_BATCHES
    model.eval()
    gen = np.random.default_rng(1234)
    losses = []
    for _ in range(batches):
        x = batch_at(val, gen)
        _, loss = model(x[:, :-1], x[:, 1:])
        losses.append(loss.item())
    model.train()
    return statistics.fmean(losses) / math.log(2)


def train_run(model_kind: str, run: str, steps: int, train: np.ndarray, val: np.ndarray) -> Result | None:
    torch.manual_seed(0)
    lowrank = run == "lowrank_ffn"
    if lowrank and model_kind == "moe":
        return None  # every block of this MoE model is MoE: no dense FFN to factorise
    model = build_model(model_spec(model_kind, lowrank), SEQ)
    kind = {
        "galore_ref": "galore_adamw",
        "galore_svd": "galore_adamw",
        "galore_rand": "galore_adamw",
        "q_galore": "q_galore_adamw",
    }.get(run, "adamw")
    spec = optim_spec(kind, "randomized" if run in ("galore_rand", "q_galore") else "svd")
    if run == "galore_ref":
        opt = reference_optimizer(model)
        if opt is None:
            return None
    else:
        opt = build_optimizer(spec, model)
    sched = build_scheduler(spec, opt, steps)
    gen = np.random.default_rng(0)
    times = []
    for step in range(steps):
        x = batch_at(train, gen)
        t0 = time.perf_counter()
        set_lowrank_progress(model, step / steps)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()  # MoE aux losses ride along in backward
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        times.append(time.perf_counter() - t0)
    report = optimizer_memory_report(spec if run != "galore_ref" else optim_spec("galore_adamw"), model)
    state = measured_state_bytes(opt)
    if run == "galore_ref":  # its projectors are Python objects: add their matrices by hand
        state += sum(st["projector"].ortho_matrix.numel() * 4 for st in opt.state.values() if "projector" in st)
    int8 = report["int8_weight_bytes"]  # Q-GaLore's INT8 master weights, reported apart
    params = report["param_bytes"]
    return Result(
        model_kind,
        run,
        state - int8,
        2 * params + state,
        1000 * statistics.fmean(times),
        1000 * statistics.median(times),
        val_bpb(model, val),
        int8,
    )


def svd_timing(repeats: int = 3, rows: int = 1024, cols: int = 4096, rank: int = 128) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    # a gradient-like matrix: decaying spectrum plus noise
    g = torch.randn(rows, rank // 2, generator=gen) @ torch.randn(rank // 2, cols, generator=gen) + 0.1 * torch.randn(
        rows, cols, generator=gen
    )

    def best(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
        ts, out = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
        return min(ts), out

    t_exact, b_exact = best(lambda: exact_basis(g, rank, "left"))
    t_rand, b_rand = best(lambda: randomized_basis(g, rank, "left", 8, 2, torch.Generator().manual_seed(1)))
    t_rand1, _ = best(lambda: randomized_basis(g, rank, "left", 8, 1, torch.Generator().manual_seed(1)))
    # energy of G captured by the randomized basis relative to the optimal (exact) one; the subspace
    # overlap is also given, but past the 64 signal directions the spectrum is a flat noise floor
    # where any high-energy subspace is as good as the exact one
    energy = float((b_rand.T @ g).pow(2).sum() / (b_exact.T @ g).pow(2).sum())
    return {
        "shape": f"{rows}x{cols}, rank {rank}",
        "exact_s": t_exact,
        "randomized_s": t_rand,
        "randomized_q1_s": t_rand1,
        "speedup": t_exact / t_rand,
        "overlap": subspace_overlap(b_exact, b_rand),
        "energy": energy,
    }


# --------------------------------------------------------------------- training-state matrix
STATE_RUNS = ("adamw", "galore", "galore_lw", "q_galore_int8_lw")
BUCKET_BYTES = 128 << 10
STATE_BATCH = 4  # sequences per worker per step in the state matrix (memory does not depend on it)
WARMUP = 2  # steps left out of the step-time mean


def state_model_spec(kind: str) -> ModelSpec:
    extra = {"moe": {"num_experts": 4, "top_k": 2}} if kind == "moe" else {}
    moe_depth = int(os.environ.get("LOWRANK_MOE_DEPTH", "4"))  # --moe-depth (an env var: spawned ranks read it)
    return ModelSpec(
        kind=kind, width=WIDTH, depth=12 if kind == "dense" else moe_depth, heads=4, ffn={"hidden": 3 * WIDTH}, **extra
    )


def state_optim_spec(run: str) -> OptimSpec:
    if run == "adamw":
        return OptimSpec(kind="adamw", lr=LR, schedule={"warmup": 10})
    galore: dict[str, Any] = {"rank": RANK, "update_gap": GAP, "scale": SCALE, "layerwise": run.endswith("_lw")}
    if run.startswith("q_galore"):
        galore.update(moments="int8", projection="randomized")
        return OptimSpec(kind="q_galore_adamw", lr=LR, schedule={"warmup": 10}, galore=galore)
    return OptimSpec(kind="galore_adamw", lr=LR, schedule={"warmup": 10}, galore=galore)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _state_rank(topo: Any, model_kind: str, run: str, steps: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    world, rank = topo.world_size, topo.rank
    corpus = load_corpus(DataSpec(paths=["stdlib"], seq_len=SEQ, max_bytes=CORPUS_BYTES, val_fraction=0.05))
    rss_before = _rss_bytes()
    torch.manual_seed(0)
    spec = state_optim_spec(run)
    model = prepare_model_for_optimizer(build_model(state_model_spec(model_kind), SEQ), spec)
    opt = build_optimizer(spec, model)
    sched = build_scheduler(spec, opt, steps)
    layerwise = spec.galore is not None and spec.galore.layerwise
    stepper = (
        LayerwiseStepper(model, opt, None, None, world, BUCKET_BYTES, spec.grad_clip).attach() if layerwise else None
    )
    forward = DDP(model) if world > 1 and not layerwise else model
    gen = np.random.default_rng(100 + rank)
    times, grad_peak = [], 0
    for _step in range(steps):
        x = batch_at(corpus.train, gen)[:STATE_BATCH]
        t0 = time.perf_counter()
        _, loss = forward(x[:, :-1], x[:, 1:])  # MoE aux losses ride on the backward (AttachAuxLoss)
        loss.backward()
        if stepper is not None:
            stepper.finish()
        else:
            grad_peak = max(
                grad_peak, sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
            )
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sched.step()
        times.append(time.perf_counter() - t0)
    if stepper is not None:
        grad_peak = stepper.peak_grad_bytes
    result = {
        "model": model_kind,
        "run": run,
        "world": world,
        "weights": model_tensor_bytes(model),
        "grads": grad_peak,
        "state": measured_state_bytes(opt),
        "step_ms": 1000 * statistics.fmean(times[WARMUP:]),
        "median_ms": 1000 * statistics.median(times[WARMUP:]),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before": rss_before,
        "params": sum(p.numel() for p in model.parameters()),
    }
    result["bpb"] = val_bpb(model, corpus.val) if rank == 0 else float("nan")
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.barrier()


def state_matrix(steps: int, models: list[str], runs: list[str], worlds: list[int]) -> list[dict[str, Any]]:
    from shardyard.comm.launch import spawn

    rows = []
    for model_kind in models:
        for world in worlds:
            for run in runs:
                with tempfile.TemporaryDirectory() as out:
                    spawn(_state_rank, world, world, model_kind, run, steps, out)
                    ranks = [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(world)]
                row = ranks[0]
                row["peak_rss"] = max(r["peak_rss"] for r in ranks)
                row["grads"] = max(r["grads"] for r in ranks)
                row["total"] = row["weights"] + row["grads"] + row["state"]
                rows.append(row)
                mib = 2**20
                print(
                    f"{model_kind:5s} w{world} {run:17s} weights {row['weights'] / mib:6.2f} grads {row['grads'] / mib:6.2f} "
                    f"state {row['state'] / mib:6.2f} total {row['total'] / mib:6.2f} MiB  peak RSS "
                    f"{row['peak_rss'] / mib:6.0f} MiB "
                    f"step {row['step_ms']:7.1f} ms  bpb {row['bpb']:.4f}",
                    flush=True,
                )
    return rows


def cpu_step_times(model_kind: str, runs: list[str], steps: int, batch: int = STATE_BATCH) -> dict[str, float]:
    """Median CPU time (time.process_time, one thread) per training step of each run, the runs
    interleaved step by step in one process: on a shared machine, wall time measures the other
    tenants; the CPU time a step consumes, measured in alternation, mostly does not."""
    torch.set_num_threads(1)
    corpus = load_corpus(DataSpec(paths=["stdlib"], seq_len=SEQ, max_bytes=CORPUS_BYTES, val_fraction=0.05))
    setups = {}
    for run in runs:
        torch.manual_seed(0)
        spec = state_optim_spec(run)
        model = prepare_model_for_optimizer(build_model(state_model_spec(model_kind), SEQ), spec)
        opt = build_optimizer(spec, model)
        stepper = LayerwiseStepper(model, opt, max_norm=spec.grad_clip).attach() if run.endswith("_lw") else None
        setups[run] = (model, opt, stepper, spec)
    gen = np.random.default_rng(0)
    times: dict[str, list[float]] = {run: [] for run in runs}
    for _ in range(steps):
        x = torch.cat([batch_at(corpus.train, gen) for _ in range(math.ceil(batch / BATCH))])[:batch]
        for run, (model, opt, stepper, spec) in setups.items():
            t0 = time.process_time()
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            if stepper is not None:
                stepper.finish()
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            times[run].append(time.process_time() - t0)
    return {run: 1000 * statistics.median(ts[WARMUP:]) for run, ts in times.items()}


def print_state_table(rows: list[dict[str, Any]]) -> None:
    mib = 2**20
    print(
        "\n| model | workers | run | weights | grads (peak) | optimizer state | total (MiB) | vs AdamW "
        "| grads vs GaLore | peak RSS (MiB) | step ms (mean / median) | vs AdamW | val bpb | vs GaLore |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        same = [b for b in rows if b["model"] == r["model"] and b["world"] == r["world"]]
        adamw = next((b for b in same if b["run"] == "adamw"), r)
        galore = next((b for b in same if b["run"] == "galore"), r)
        print(
            f"| {r['model']} | {r['world']} | {r['run']} | {r['weights'] / mib:.2f} | {r['grads'] / mib:.2f} | "
            f"{r['state'] / mib:.2f} | {r['total'] / mib:.2f} | {r['total'] / adamw['total']:.1%} | "
            f"{r['grads'] / galore['grads']:.1%} | {r['peak_rss'] / mib:.0f} | {r['step_ms']:.1f} / "
            f"{r['median_ms']:.1f} | "
            f"{r['step_ms'] / adamw['step_ms']:.2f}x | {r['bpb']:.4f} | {r['bpb'] / galore['bpb'] - 1:+.2%} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 steps per run")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--models", default="dense,moe", help="comma list of dense, moe")
    parser.add_argument("--svd-only", action="store_true", help="only the 1024x4096 SVD timing")
    parser.add_argument(
        "--runs", default="adamw,galore_ref,galore_svd,galore_rand,q_galore,lowrank_ffn", help="comma list of runs"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine multi-threaded LAPACK "
        "stalls for seconds when another process holds a core)",
    )
    parser.add_argument("--state", action="store_true", help="the training-state matrix (see the docstring)")
    parser.add_argument("--state-runs", default=",".join(STATE_RUNS), help="--state: comma list of runs")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="median CPU time per step of the --state runs, interleaved in one process",
    )
    parser.add_argument("--batch", type=int, default=STATE_BATCH, help="--cpu-time: sequences per step")
    parser.add_argument("--workers", default="1,2", help="--state: comma list of data-parallel worker counts")
    parser.add_argument(
        "--moe-depth", type=int, default=4, help="--state: depth of the MoE byte model (the dense one has 12)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: small SVD, 3 steps of every run, then a tiny --state (1 worker) and --cpu-time",
    )
    args = parser.parse_args()
    if args.smoke:
        os.environ["LOWRANK_SMOKE"] = "1"  # spawned ranks re-import this module
        set_smoke_sizes()
        args.moe_depth, args.steps = 1, 3
    os.environ["LOWRANK_MOE_DEPTH"] = str(args.moe_depth)
    torch.set_num_threads(args.threads)
    if args.smoke:
        s = svd_timing(1, 128, 512, 16)
        print(f"SVD {s['shape']}: exact {s['exact_s'] * 1000:.0f} ms, randomized {s['randomized_s'] * 1000:.0f} ms")
        run_training(args.models.split(","), args.runs.split(","), args.steps)
        rows = state_matrix(args.steps, ["moe"], ["q_galore_int8_lw"], [1])  # one spawned rank
        print_state_table(rows)
        ms = cpu_step_times("moe", ["adamw", "galore_lw"], args.steps, 2)
        print("moe cpu-time smoke: median CPU ms per step " + ", ".join(f"{r} {t:.0f}" for r, t in ms.items()))
        return
    if args.cpu_time:
        for model_kind in args.models.split(","):
            ms = cpu_step_times(model_kind, args.state_runs.split(","), args.steps or 12, args.batch)
            print(
                f"{model_kind} batch {args.batch}x{SEQ}: median CPU ms per step "
                + ", ".join(
                    f"{run} {t:.0f} ({t / ms['adamw']:.2f}x)" if "adamw" in ms else f"{run} {t:.0f}"
                    for run, t in ms.items()
                ),
                flush=True,
            )
        return
    if args.state:
        runs = args.state_runs.split(",")
        rows = state_matrix(args.steps or 60, args.models.split(","), runs, [int(w) for w in args.workers.split(",")])
        print_state_table(rows)
        return
    s = svd_timing()
    print(
        f"SVD {s['shape']}: exact {s['exact_s'] * 1000:.0f} ms, randomized (p=8, q=2) "
        f"{s['randomized_s'] * 1000:.0f} ms ({s['speedup']:.1f}x), q=1 {s['randomized_q1_s'] * 1000:.0f} ms; "
        f"captured energy vs exact {s['energy']:.4f}, subspace overlap {s['overlap']:.4f}",
        flush=True,
    )
    if args.svd_only:
        return
    run_training(args.models.split(","), args.runs.split(","), args.steps or (30 if args.quick else 200))


def run_training(models: list[str], runs: list[str], steps: int) -> None:
    corpus = load_corpus(DataSpec(paths=["stdlib"], seq_len=SEQ, max_bytes=CORPUS_BYTES, val_fraction=0.05))
    print(
        f"corpus: {len(corpus.train):,} train / {len(corpus.val):,} val bytes; {steps} steps, "
        f"batch {BATCH}x{SEQ}, lr {LR}, rank {RANK}, gap {GAP}, scale {SCALE}, threads {torch.get_num_threads()}"
    )
    results: list[Result] = []
    for model_kind in models:
        for run in runs:
            r = train_run(model_kind, run, steps, corpus.train, corpus.val)
            if r is None:
                print(f"{model_kind:5s} {run:12s} skipped")
                continue
            results.append(r)
            print(
                f"{model_kind:5s} {run:12s} state {r.state_bytes / 2**20:6.2f} MiB  train-state "
                f"{r.train_state_bytes / 2**20:6.2f} MiB  step {r.step_ms:7.1f} ms (median {r.median_ms:.1f})"
                f"  bpb {r.bpb:.4f}",
                flush=True,
            )
    print(
        "\n| model | run | optimizer state (MiB) | vs AdamW | INT8 weights (MiB) | params+grads+state (MiB) "
        "| step mean / median (ms) | mean vs AdamW | val bpb | vs AdamW |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        base = next((b for b in results if b.model == r.model and b.run == "adamw"), r)
        print(
            f"| {r.model} | {r.run} | {r.state_bytes / 2**20:.2f} | {r.state_bytes / base.state_bytes:.1%} | "
            f"{r.int8_bytes / 2**20:.2f} | {r.train_state_bytes / 2**20:.2f} | {r.step_ms:.1f} / {r.median_ms:.1f} | "
            f"{r.step_ms / base.step_ms:.2f}x | "
            f"{r.bpb:.4f} | {r.bpb / base.bpb - 1:+.1%} |"
        )


if __name__ == "__main__":
    main()
