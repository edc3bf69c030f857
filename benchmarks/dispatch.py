"""Bytes on the wire and time per MoE layer step of the dispatch stack (issue 11).

    PYTHONPATH=$PWD python benchmarks/dispatch.py                    # loopback: 4 gloo ranks, 2 fake nodes
    sudo PYTHONPATH=$PWD python benchmarks/dispatch.py --netbed 200  # netns testbed, 2 nodes x 2, 200 Mbit/s links

One MoE layer's experts (8 experts by default, --experts; width 256 / hidden 512, SwiGLU, top-2 softmax routing by a
seeded random router) behind a `TransportDispatcher` on an EP group of 4, for each configuration:
flat fp32 (today), +dedup (per rank), +dedup+bf16, +dedup node (per node across the inter-node
link), +dedup node+bf16, +bf16, +fp8, +LSH at 2, 4, 6, 8 hashes (and 8 with bf16); `--only` picks some.
A step is forward + backward of dispatch -> experts -> weighted combine (`forward_tokens`);
configurations are interleaved round-robin, a sample is the slowest rank's time (all_reduce MAX),
and bytes come from `dispatch_metrics` summed over ranks (`bytes_remote`: rows that leave a rank;
`bytes_internode`: the part that crosses between the two nodes, what a shaped inter-node link carries).
Tokens are clustered (--clusters centres, N(0,1), plus N(0, spread^2) noise): LSH's ratio depends on
how the hidden states cluster, so its bytes here are those of this synthetic stand-in, stated as such.
Experts get unit-gain weights (std 1/sqrt(fan-in)) so the LSH error is against outputs of the
inputs' scale. Rank 0 appends JSON lines to --out; the driver prints a markdown table.

    python benchmarks/dispatch.py quality RUN_DIR...   # val bpb of finished runs: table + plot
    python benchmarks/dispatch.py --smoke [--netbed 200]  # seconds: tiny run, then probe and quality on a tiny
                                                          # run trained in a temp dir

reads each run's metrics.jsonl and prints val bits per byte side by side (and writes --plot).
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
WIDTH, HIDDEN, TOP_K = 256, 512, 2

CONFIGS: dict[str, dict] = {
    "flat fp32": {},
    "+dedup": {"dedup": True},
    "+dedup +bf16": {"dedup": True, "payload": "bf16"},
    "+dedup node": {"dedup": "node"},
    "+dedup node +bf16": {"dedup": "node", "payload": "bf16"},
    "+bf16": {"payload": "bf16"},
    "+fp8": {"payload": "fp8"},
    **{f"+LSH {h}": {"lsh": {"hashes": h, "error_every": 1}} for h in (2, 4, 6, 8)},
    "+LSH 8 +bf16": {"payload": "bf16", "lsh": {"hashes": 8, "error_every": 1}},
}


def _tokens(rank: int, n: int, clusters: int, spread: float, num_experts: int):
    import torch

    g = torch.Generator().manual_seed(11)
    centres = torch.randn(clusters, WIDTH, generator=g)  # the same centres on every rank
    router = torch.randn(WIDTH, num_experts, generator=g) / WIDTH**0.5
    g = torch.Generator().manual_seed(100 + rank)
    x = centres[torch.randint(0, clusters, (n,), generator=g)] + spread * torch.randn(n, WIDTH, generator=g)
    probs = (x @ router).softmax(-1)
    weights, experts = probs.topk(TOP_K, dim=1)
    weights = weights / weights.sum(1, keepdim=True)
    expert_ids, token_ids = experts.reshape(-1), torch.arange(n).repeat_interleave(TOP_K)
    order = torch.argsort(expert_ids, stable=True)
    offsets = torch.cumsum(torch.bincount(expert_ids, minlength=num_experts), 0).to(torch.int32)
    return x, token_ids[order], weights.reshape(-1)[order], offsets


def measure(topo, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from shardyard.comm.dispatch_metrics import dispatch_metrics
    from shardyard.comm.token_dispatch import TransportDispatcher
    from shardyard.models.moe.experts import GroupedExperts
    from shardyard.platform.schema import DispatchSpec
    from shardyard.runtime.parallel.dims import replicated_dims
    from shardyard.runtime.parallel.parallelize import keep_expert_slice_

    groups = replicated_dims(topo, ep=topo.world_size).expert_groups
    torch.manual_seed(0)
    full = GroupedExperts(args.experts, WIDTH, HIDDEN, "swiglu", "auto")
    with torch.no_grad():  # unit-gain weights: outputs of the inputs' scale, so the LSH error means something
        full.w_up.normal_(std=WIDTH**-0.5)
        full.w_down.normal_(std=HIDDEN**-0.5)
    names = [n for n in CONFIGS if not args.only or n in args.only]
    modules = {
        name: TransportDispatcher(args.experts, WIDTH, groups, args.a2a, DispatchSpec(**CONFIGS[name]), slots=TOP_K)
        for name in names
    }
    first = groups.ep_rank * (args.experts // topo.world_size)
    keep_expert_slice_(full, first, first + args.experts // topo.world_size)  # this rank's experts
    x, token_of, weight_of, offsets = _tokens(topo.rank, args.tokens, args.clusters, args.spread, args.experts)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps + 1):  # first round is warm-up
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            m = modules[name]
            xi = x.clone().requires_grad_(True)
            dist.barrier()
            t0 = time.perf_counter()
            out = m(xi, token_of, weight_of, offsets, args.tokens, full)
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
        keys = (
            "comm/bytes_sent",
            "comm/bytes_remote",
            "comm/bytes_internode",
            "comm/a2a_ms",
            "comm/layer0/rows_sent",
            "comm/layer0/tokens_in",
        )
        vals = torch.tensor([met[k] for k in keys] + [met.get("comm/lsh_rel_error", 0.0)], dtype=torch.float64)
        summed = vals.clone()
        dist.all_reduce(summed)
        rec = {k.split("/")[-1]: float(v) for k, v in zip(keys, summed)}
        rec["lsh_rel_error"] = float(summed[-1]) / topo.world_size
        rec.update(
            config=name,
            step_ms=[1e3 * s for s in samples[name]],
            nodes=topo.num_nodes,
            rpn=topo.ranks_per_node,
            rate_mbit=args.rate,
            tokens=args.tokens,
            width=WIDTH,
            clusters=args.clusters,
            spread=args.spread,
            a2a=args.a2a,
            cpu_count=os.cpu_count(),
            experts=args.experts,
        )
        records.append(rec)
    if topo.rank == 0:
        with open(args.out, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    dist.barrier()


def worker(args: argparse.Namespace) -> None:
    """One rank on the netns testbed (tcp rendezvous through node 0's address)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from shardyard.comm.topology import Topology

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{args.master}:{args.port}",
        rank=args.rank,
        world_size=args.world,
        timeout=timedelta(seconds=300),
    )
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
        env = {
            "GLOO_SOCKET_IFNAME": "eth0",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            "TORCH_CPP_LOG_LEVEL": "ERROR",
        }
        procs = []
        for rank in range(nodes * rpn):
            argv = [
                sys.executable,
                str(Path(__file__).resolve()),
                "worker",
                "--rank",
                str(rank),
                "--world",
                str(nodes * rpn),
                "--rpn",
                str(rpn),
                "--master",
                bed.addr(0),
                "--port",
                "29511",
                "--netbed",
                str(args.rate),
                "--reps",
                str(args.reps),
                "--out",
                str(args.out),
                "--tokens",
                str(args.tokens),
                "--clusters",
                str(args.clusters),
                "--spread",
                str(args.spread),
                "--a2a",
                args.a2a,
                "--experts",
                str(args.experts),
                *(["--only", *args.only] if args.only else []),
            ]
            procs.append(bed.popen(rank // rpn, argv, env))
        for p in procs:
            if p.wait(timeout=1800):
                raise RuntimeError("a worker failed")


def summarize(path: Path) -> str:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [
        "| link | config | rows sent / copies | bytes between ranks (MB) | x fewer than flat | "
        "bytes between nodes (MB) | x fewer than flat | step ms median (IQR) | LSH rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base: dict[str, float] = {}
    base_nodes: dict[str, float] = {}
    for r in recs:
        link = ("loopback" if r["rate_mbit"] == 0 else f"{r['rate_mbit']:g} Mbit/s") + f", E={r.get('experts', 8)}"
        if r["config"] == "flat fp32":
            base[link] = r["bytes_remote"]
            base_nodes[link] = r.get("bytes_internode", float("nan"))
    for r in recs:
        link = ("loopback" if r["rate_mbit"] == 0 else f"{r['rate_mbit']:g} Mbit/s") + f", E={r.get('experts', 8)}"
        ms = r["step_ms"]
        q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
        err = f"{r['lsh_rel_error']:.3f}" if "LSH" in r["config"] else "-"
        lines.append(
            f"| {link} | {r['config']} | {r['rows_sent'] / r['tokens_in']:.3f} | "
            f"{r['bytes_remote'] / 1e6:.2f} | {base.get(link, float('nan')) / r['bytes_remote']:.2f} | "
            f"{r.get('bytes_internode', float('nan')) / 1e6:.2f} | "
            f"{base_nodes.get(link, float('nan')) / r.get('bytes_internode', float('nan')):.2f} | "
            f"{statistics.median(ms):.1f} ({q[0]:.1f}-{q[2]:.1f}) | {err} |"
        )
    return "\n".join(lines)


def quality(run_dirs: list[Path], plot: Path | None) -> str:
    """Val bpb per eval step of each run (metrics.jsonl), side by side; final-step ratio to the first,
    final standard error, dispatch bytes against fp32 (mean of comm/compression_ratio over the run)."""
    curves: dict[str, dict[int, float]] = {}
    stderr: dict[str, float] = {}
    ratio: dict[str, float] = {}
    for d in run_dirs:
        recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        evals = [r for r in recs if r.get("val_bpb") is not None and r.get("kind", "eval") == "eval"]
        curves[d.name] = {r["step"]: r["val_bpb"] for r in evals}
        stderr[d.name] = evals[-1].get("val_bpb_stderr", float("nan")) if evals else float("nan")
        ratios = [r["comm/compression_ratio"] for r in recs if "comm/compression_ratio" in r]
        ratio[d.name] = statistics.mean(ratios) if ratios else 1.0
    names = list(curves)
    steps = sorted(set().union(*[set(c) for c in curves.values()]))
    lines = ["| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for st in steps:
        lines.append(f"| {st} | " + " | ".join(f"{curves[n].get(st, float('nan')):.4f}" for n in names) + " |")
    last = steps[-1]
    ref = curves[names[0]].get(last, float("nan"))
    lines.append(
        "| vs "
        + names[0]
        + " at "
        + str(last)
        + " | "
        + " | ".join(f"{100 * (curves[n].get(last, float('nan')) / ref - 1):+.2f} %" for n in names)
        + " |"
    )
    lines.append("| final s.e. | " + " | ".join(f"{stderr[n]:.4f}" for n in names) + " |")
    lines.append(
        "| bytes vs fp32 (mean over run) | "
        + " | ".join(f"{ratio[n]:.3f} ({1 / ratio[n]:.2f}x fewer)" for n in names)
        + " |"
    )
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n in names:
            xs = sorted(curves[n])
            ax.plot(xs, [curves[n][x] for x in xs], marker="o", label=n)
        ax.set_xlabel("step")
        ax.set_ylabel("validation bits per byte")
        ax.set_title("tiny MoE byte LM, 1 worker: flat vs compressed dispatch")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
    return "\n".join(lines)


def probe(run_dir: Path, dispatches: list[str], batches: int) -> str:
    """Bytes and LSH error of dispatch configurations on a trained model's real hidden states.

    Loads the run's spec and newest checkpoint on one worker, wraps its MoE layers with each
    `parallel.dispatch` setting (YAML/JSON mappings), runs `batches` training-mode forwards (no
    optimizer step) on validation windows with the error measured on every one, and reports
    `dispatch_metrics`: rows sent per (token, expert) copy, bytes ratio, LSH relative error.
    """
    import copy

    import numpy as np
    import torch
    import yaml

    from shardyard.comm.dispatch_metrics import dispatch_metrics
    from shardyard.data.corpus import load_corpus
    from shardyard.data.validation import batch_windows
    from shardyard.runtime.export import load_for_inference
    from shardyard.runtime.parallel.parallelize import place_experts

    spec, trained = load_for_inference(run_dir)  # the newest complete checkpoint, single-worker names
    corpus = load_corpus(spec.data)
    seq_len, batch_size = spec.data.seq_len, spec.training.batch_size
    windows = min((len(corpus.val) - 1) // seq_len, batches * batch_size)  # the first ones, back to back
    val = batch_windows(corpus.val, np.arange(windows, dtype=np.int64) * seq_len, seq_len, batch_size)
    lines = [
        "| dispatch | rows sent / copies | bytes vs flat fp32 | LSH rel. error | hashes in use |",
        "|---|---|---|---|---|",
    ]
    for text in dispatches:
        torch.manual_seed(spec.seed)
        model = copy.deepcopy(trained)
        parallel = spec.parallel.model_copy(update={"dispatch": type(spec.parallel.dispatch)(**yaml.safe_load(text))})
        if parallel.dispatch.lsh is not None:
            parallel.dispatch.lsh.error_every = 1
        place_experts(model, None, parallel)  # this configuration's own (fresh) LSH schedule
        model.train()
        for inputs, targets in val:
            model(inputs, targets)
        m = dispatch_metrics(model, steps=len(val))
        rows = sum(v for k, v in m.items() if k.endswith("/rows_sent"))
        copies = sum(v for k, v in m.items() if k.endswith("/tokens_in"))
        hashes = [v for k, v in m.items() if k.endswith("/lsh_hashes")]
        err = m.get("comm/lsh_rel_error")
        err_cell = "-" if err is None else f"{err:.3f}"
        hash_cell = "-" if not hashes else f"{sum(hashes) / len(hashes):g}"
        lines.append(
            # flat fp32 at EP 1 leaves the layers unwrapped: no counters, every copy sent as is
            f"| `{text}` | {rows / copies if copies else 1.0:.3f} | {m.get('comm/compression_ratio', 1.0):.3f} | "
            f"{err_cell} | {hash_cell} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        q = argparse.ArgumentParser()
        q.add_argument("mode")
        q.add_argument("run", type=Path)
        q.add_argument("dispatch", nargs="+", help="parallel.dispatch settings as YAML flow mappings")
        q.add_argument("--batches", type=int, default=8)
        qa = q.parse_args()
        print(probe(qa.run, qa.dispatch, qa.batches))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "quality":
        q = argparse.ArgumentParser()
        q.add_argument("mode")
        q.add_argument("runs", nargs="+", type=Path)
        q.add_argument("--plot", type=Path)
        qa = q.parse_args()
        print(quality(qa.runs, qa.plot))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="run", choices=["run", "worker"])
    p.add_argument(
        "--netbed", dest="rate", type=float, default=0.0, help="link Mbit/s on the netns testbed (0 = loopback)"
    )
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    p.add_argument("--clusters", type=int, default=256)
    p.add_argument("--spread", type=float, default=0.3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--a2a", default="flat", choices=["flat", "hierarchical", "leader"])
    p.add_argument("--experts", type=int, default=8, help="experts of the MoE layer (a multiple of 4)")
    p.add_argument("--only", nargs="+", default=[], help="configurations to run (names of CONFIGS)")
    p.add_argument("--out", type=Path, default=Path("/tmp/dispatch-bench.jsonl"))
    p.add_argument("--rank", type=int)
    p.add_argument("--world", type=int)
    p.add_argument("--rpn", type=int)
    p.add_argument("--master")
    p.add_argument("--port")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, 1 rep, output in a temp dir; then `probe` and `quality` on a tiny trained run (seconds)",
    )
    args = p.parse_args()
    if args.mode == "worker":
        worker(args)
        return
    scratch = None
    if args.smoke:
        sys.path.insert(0, str(ROOT))
        from benchmarks.smoke import netns_available, smoke_dir

        if args.rate > 0 and not netns_available():
            print("dispatch smoke: skipped, network namespaces unavailable (needs root with ip netns and tc)")
            return
        scratch = smoke_dir("dispatch")
        args.out, args.tokens, args.clusters, args.reps = scratch / "dispatch.jsonl", 64, 8, 1
    if args.rate > 0:
        run_netbed(args)
    else:
        from shardyard.comm.launch import spawn

        spawn(measure, 4, 2, args)
    print(summarize(args.out))
    if scratch is not None:
        from benchmarks.smoke import tiny_run_dir

        run_dir = tiny_run_dir(scratch)
        print(probe(run_dir, ["{}", "{lsh: {hashes: 4}, payload: bf16}"], 2))
        print(quality([run_dir], scratch / "quality.png"))


if __name__ == "__main__":
    main()
