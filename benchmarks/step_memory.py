"""validate's per-worker memory against a real step's peak: the tensor bytes `shardyard validate`
predicts for rank 0 (parameters, gradients, optimizer state, activations; the fixed process
allowance left out) beside the peak of live tensor bytes the CPU allocator reports for a real step
on rank 0 of real gloo ranks (torch.profiler's allocation events: the model built, parallelized and
stepped three times, the peak over the third), per data-parallel layout and model depth.

    python benchmarks/step_memory.py [--spec jobs/moe-tiny.yaml] [--world 4] [--depths 2,4,8] [--shards none,full,zero2]
    python benchmarks/step_memory.py --smoke     # 2 ranks, depth 2, DDP and FSDP full (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardyard.platform.spec import load_spec  # noqa: E402
from shardyard.runtime.worker_memory import predict_worker_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARKER = "step 2"


def live_peak_from(prof, marker: str | None = None) -> int:
    """Peak of the CPU allocator's live bytes (counted from the profile's start) from the start of
    the `marker` region on (None: over the whole profile)."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    begins: list[int] = []

    def walk(e) -> None:
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        elif e.name == marker:
            begins.append(e.start_time_ns)
        for child in e.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    start = begins[0] if marker is not None else 0
    live, peak = 0, None
    for time_ns, size in sorted(events):
        live += size
        if time_ns >= start:
            peak = live if peak is None else max(peak, live)
    assert peak is not None, f"no allocation after {marker!r}"
    return peak


def _rank_peak(topology, spec_path: str, overrides: list[str], out: str) -> None:
    """On each gloo rank: the job's model built, parallelized and stepped three times, all profiled
    (the allocator reports no size for freeing what it saw allocated before the profile, and FSDP2
    frees the whole parameters it shards). Rank 0 writes the third step's peak of live tensor bytes."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    from shardyard.data.tokenize import vocab_size_for
    from shardyard.models import build_model
    from shardyard.runtime.parallel import build_training, dims_for

    torch.set_num_threads(1)
    spec = load_spec(spec_path, overrides)
    dims = dims_for(spec, topology).build("cpu")
    vocab = vocab_size_for(spec.data)
    x = torch.randint(0, vocab, (spec.training.batch_size, spec.data.seq_len))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        model = build_model(spec.model, spec.data.seq_len, vocab)
        training = build_training(spec, model, dims, torch.device("cpu"))
        for step in range(3):  # DDP rebuilds its buckets after the first step; FSDP2 initialises lazily
            with record_function(f"step {step}"), training.step.micro_batch(True):
                training.step.backward(training.module(x, x)[1])
            with record_function(f"step {step} optimizer"):
                training.step.step()
    if topology.rank == 0:
        Path(out).write_text(json.dumps({"peak": live_peak_from(prof, MARKER)}))


def measure(spec_path: str, overrides: list[str], world: int) -> tuple[int, int]:
    """(rank 0's measured peak tensor bytes, validate's predicted tensor bytes) for the job at `world`
    gloo ranks (2 per node)."""
    from shardyard.comm.launch import spawn

    overrides = [f"resources.workers={world}", *overrides]
    with tempfile.TemporaryDirectory(prefix="shardyard-step-memory-") as tmp:
        out = Path(tmp) / "peak.json"
        spawn(_rank_peak, world, min(world, 2), str(spec_path), overrides, str(out))
        measured = json.loads(out.read_text())["peak"]
    predicted = predict_worker_memory(load_spec(spec_path, overrides))
    return measured, predicted.total - predicted.process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "jobs" / "moe-tiny.yaml"))
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--depths", default="2,4,8")
    parser.add_argument("--shards", default="none,full,zero2")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.world, args.depths, args.shards = 2, "2", "none,full"
    print(f"# validate's tensor bytes vs a real step's peak: {args.spec}, rank 0 of {args.world} gloo ranks")
    print(f"torch {torch.__version__}; load {os.getloadavg()[0]:.1f}\n")
    print("| parallel.shard | depth | measured peak MB | predicted MB | predicted / measured |")
    print("|---|---:|---:|---:|---:|")
    for depth in args.depths.split(","):
        for shard in args.shards.split(","):
            measured, predicted = measure(args.spec, [f"parallel.shard={shard}", f"model.depth={depth}"], args.world)
            row = f"| {shard} | {depth} | {measured / 1e6:.1f} | {predicted / 1e6:.1f} | {predicted / measured:.3f} |"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
