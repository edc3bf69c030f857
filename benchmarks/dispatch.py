"""Bytes on the wire and time per MoE layer step of the dispatch stack (issue 11).

    PYTHONPATH=$PWD python benchmarks/dispatch.py                    # loopback: 4 gloo ranks, 2 fake nodes
    sudo PYTHONPATH=$PWD python benchmarks/dispatch.py --netbed 200  # netns testbed, 2 nodes x 2, 200 Mbit/s links

One MoE layer's experts (8 experts of width 256 / hidden 512, SwiGLU, top-2 softmax routing by a
seeded random router) behind `ExpertParallelExperts` on an EP group of 4, for each configuration:
flat fp32 (today), +dedup, +dedup+bf16, +bf16, +fp8, +LSH at 2, 4, 6, 8 hashes (and 8 with bf16).
A step is forward + backward of dispatch -> experts -> weighted combine (`forward_tokens`);
configurations are interleaved round-robin, a sample is the slowest rank's time (all_reduce MAX),
and bytes come from `dispatch_metrics` summed over ranks (`bytes_remote`: rows that leave a rank).
Tokens are clustered (--clusters centres, N(0,1), plus N(0, spread^2) noise): LSH's ratio depends on
how the hidden states cluster, so its bytes here are those of this synthetic stand-in, stated as such.
Rank 0 appends JSON lines to --out; the driver prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WIDTH, HIDDEN, EXPERTS, TOP_K = 256, 512, 8, 2

CONFIGS: dict[str, dict] = {
    "flat fp32": {},
    "+dedup": {"dedup": True},
    "+dedup +bf16": {"dedup": True, "payload": "bf16"},
    "+bf16": {"payload": "bf16"},
    "+fp8": {"payload": "fp8"},
    **{f"+LSH {h}": {"lsh": {"hashes": h, "error_every": 1}} for h in (2, 4, 6, 8)},
    "+LSH 8 +bf16": {"payload": "bf16", "lsh": {"hashes": 8, "error_every": 1}},
}


def _tokens(rank: int, n: int, clusters: int, spread: float):
    import torch

    g = torch.Generator().manual_seed(11)
    centres = torch.randn(clusters, WIDTH, generator=g)  # the same centres on every rank
    router = torch.randn(WIDTH, EXPERTS, generator=g) / WIDTH ** 0.5
    g = torch.Generator().manual_seed(100 + rank)
    x = centres[torch.randint(0, clusters, (n,), generator=g)] + spread * torch.randn(n, WIDTH, generator=g)
    probs = (x @ router).softmax(-1)
    weights, experts = probs.topk(TOP_K, dim=1)
    weights = weights / weights.sum(1, keepdim=True)
    expert_ids, token_ids = experts.reshape(-1), torch.arange(n).repeat_interleave(TOP_K)
    order = torch.argsort(expert_ids, stable=True)
    offsets = torch.cumsum(torch.bincount(expert_ids, minlength=EXPERTS), 0).to(torch.int32)
    return x, token_ids[order], weights.reshape(-1)[order], offsets


def measure(topo, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from shardyard.comm.dispatch import dispatch_metrics
    from shardyard.comm.expert_parallel import ExpertParallelExperts
    from shardyard.comm.groups import build_groups
    from shardyard.models.moe.experts import GroupedExperts
    from shardyard.platform.schema import DispatchSpec

    groups = build_groups(topo, ep=topo.world_size)
    torch.manual_seed(0)
    full = GroupedExperts(EXPERTS, WIDTH, HIDDEN, "swiglu", "auto")
    modules = {name: ExpertParallelExperts(full, groups, args.a2a, DispatchSpec(**cfg), slots=TOP_K)
               for name, cfg in CONFIGS.items()}
    x, token_of, weight_of, offsets = _tokens(topo.rank, args.tokens, args.clusters, args.spread)
    samples: dict[str, list[float]] = {n: [] for n in CONFIGS}
    names = list(CONFIGS)
    for rep in range(args.reps + 1):  # first round is warm-up
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            m = modules[name]
            xi = x.clone().requires_grad_(True)
            dist.barrier()
            t0 = time.perf_counter()
            out = m.forward_tokens(xi, token_of, weight_of, offsets, args.tokens)
            out.sum().backward()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if rep:
                samples[name].append(float(t))
            else:
                dispatch_metrics(m)  # drop the warm-up's counters
    records = []
    for name in names:
        met = dispatch_metrics(modules[name], steps=args.reps)
        keys = ("comm/bytes_sent", "comm/bytes_remote", "comm/a2a_ms", "comm/layer0/rows_sent",
                "comm/layer0/tokens_in")
        vals = torch.tensor([met[k] for k in keys] + [met.get("comm/lsh_rel_error", 0.0)], dtype=torch.float64)
        summed = vals.clone()
        dist.all_reduce(summed)
        rec = {k.split("/")[-1]: float(v) for k, v in zip(keys, summed)}
        rec["lsh_rel_error"] = float(summed[-1]) / topo.world_size
        rec.update(config=name, step_ms=[1e3 * s for s in samples[name]], nodes=topo.num_nodes,
                   rpn=topo.ranks_per_node, rate_mbit=args.rate, tokens=args.tokens, width=WIDTH,
                   clusters=args.clusters, spread=args.spread, a2a=args.a2a, cpu_count=os.cpu_count())
        records.append(rec)
    if topo.rank == 0:
        with open(args.out, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    dist.barrier()


def worker(args: argparse.Namespace) -> None:
    """One rank on the netns testbed (tcp rendezvous through node 0's address)."""
    import torch
    import torch.distributed as dist
    from datetime import timedelta

    from shardyard.cluster.topology import Topology

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=args.rank,
                            world_size=args.world, timeout=timedelta(seconds=300))
    try:
        measure(Topology.from_rank(args.rank, args.world, args.rpn), args)
    finally:
        dist.destroy_process_group()


def run_netbed(args: argparse.Namespace) -> None:
    import subprocess  # noqa: F401  (the testbed's popen)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from netbed import NetBed

    nodes, rpn = 2, 2
    with NetBed(nodes, rate_mbit=args.rate) as bed:
        env = {"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
               "TORCH_CPP_LOG_LEVEL": "ERROR"}
        procs = []
        for rank in range(nodes * rpn):
            argv = [sys.executable, str(Path(__file__).resolve()), "worker", "--rank", str(rank),
                    "--world", str(nodes * rpn), "--rpn", str(rpn), "--master", bed.addr(0), "--port", "29511",
                    "--rate", str(args.rate), "--reps", str(args.reps), "--out", str(args.out),
                    "--tokens", str(args.tokens), "--clusters", str(args.clusters), "--spread", str(args.spread),
                    "--a2a", args.a2a]
            procs.append(bed.popen(rank // rpn, argv, env))
        for p in procs:
            if p.wait(timeout=1800):
                raise RuntimeError("a worker failed")


def summarize(path: Path) -> str:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| link | config | rows sent / copies | bytes between ranks (MB) | x fewer than flat | "
             "step ms median (IQR) | LSH rel. error |", "|---|---|---|---|---|---|---|"]
    base: dict[str, float] = {}
    for r in recs:
        link = "loopback" if r["rate_mbit"] == 0 else f"{r['rate_mbit']:g} Mbit/s"
        if r["config"] == "flat fp32":
            base[link] = r["bytes_remote"]
    for r in recs:
        link = "loopback" if r["rate_mbit"] == 0 else f"{r['rate_mbit']:g} Mbit/s"
        ms = r["step_ms"]
        q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
        err = f"{r['lsh_rel_error']:.3f}" if "LSH" in r["config"] else "-"
        lines.append(f"| {link} | {r['config']} | {r['rows_sent'] / r['tokens_in']:.3f} | "
                     f"{r['bytes_remote'] / 1e6:.2f} | {base.get(link, float('nan')) / r['bytes_remote']:.2f} | "
                     f"{statistics.median(ms):.1f} ({q[0]:.1f}-{q[2]:.1f}) | {err} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="run", choices=["run", "worker"])
    p.add_argument("--netbed", dest="rate", type=float, default=0.0, help="link Mbit/s on the netns testbed (0 = loopback)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    p.add_argument("--clusters", type=int, default=256)
    p.add_argument("--spread", type=float, default=0.3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--a2a", default="flat", choices=["flat", "hierarchical", "leader"])
    p.add_argument("--out", type=Path, default=Path("/tmp/dispatch-bench.jsonl"))
    p.add_argument("--rank", type=int)
    p.add_argument("--world", type=int)
    p.add_argument("--rpn", type=int)
    p.add_argument("--master")
    p.add_argument("--port")
    args = p.parse_args()
    if args.mode == "worker":
        worker(args)
        return
    if args.rate > 0:
        run_netbed(args)
    else:
        from shardyard.comm.launch import spawn

        spawn(measure, 4, 2, args)
    print(summarize(args.out))


if __name__ == "__main__":
    main()
