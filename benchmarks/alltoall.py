"""Measure flat, hierarchical and leader all-to-all on the netns testbed (benchmarks/netbed.py).

    sudo .venv/bin/python benchmarks/alltoall.py                      # full grid (~4 min on 2 cores)
    sudo .venv/bin/python benchmarks/alltoall.py --nodes 2 --rates 200 --rows 16 1024 --reps 3
    sudo .venv/bin/python benchmarks/alltoall.py --smoke   # 2 nodes x 2, 1 rep, temp dir; skips without netns

For each (nodes, link rate) it builds the testbed, starts nodes x ranks_per_node gloo workers with
`ip netns exec`, and each worker times `dispatch` (count exchange + rows) for every algorithm and
message size, algorithms interleaved round-robin so drift hits all equally. A sample is the slowest
rank's time (all_reduce MAX). Rows are width 256 fp32 (1 KiB); routing is a seeded multinomial
over all ranks, so splits are uneven. Rank 0 appends JSON lines to --out; the driver prints medians,
spreads and ratios, then fits the cost model (benchmarks/alltoall_fit.py, constants for
shardyard.comm.cost_model) unless --no-fit.
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
WIDTH = 256


# -------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from shardyard.comm.alltoall import ALGORITHMS, build_all_to_all, run_route
    from shardyard.comm.topology import Topology
    from shardyard.runtime.parallel.dims import replicated_dims

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{args.master}:{args.port}",
        rank=args.rank,
        world_size=args.world,
        timeout=timedelta(seconds=90),
    )
    topo = Topology.from_rank(args.rank, args.world, args.rpn)
    groups = replicated_dims(topo, ep=args.world).expert_groups
    algos = {name: build_all_to_all(name, groups) for name in ALGORITHMS}
    records = []
    for rows in args.rows:
        gen = torch.Generator().manual_seed(rows * 7919 + args.rank)
        dest = torch.randint(0, args.world, (rows,), generator=gen)
        splits = torch.bincount(dest, minlength=args.world)
        x = torch.randn(rows, WIDTH, generator=gen)
        samples: dict[str, list[list[float]]] = {n: [] for n in ALGORITHMS}
        for rep in range(args.reps + 1):  # first round is warm-up
            order = ALGORITHMS[rep % 3 :] + ALGORITHMS[: rep % 3]
            for name in order:
                dist.barrier()
                t0 = time.perf_counter()
                route = algos[name].route(splits.view(-1, 1))
                t1 = time.perf_counter()
                run_route(x, route)
                t2 = time.perf_counter()
                t = torch.tensor([t1 - t0, t2 - t0], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                if rep:
                    samples[name].append(t.tolist())
        for name, s in samples.items():
            records.append(
                {
                    "algo": name,
                    "nodes": args.world // args.rpn,
                    "rpn": args.rpn,
                    "rate_mbit": args.rate,
                    "rows": rows,
                    "bytes_per_rank": rows * WIDTH * 4,
                    "cpu_count": os.cpu_count(),
                    "plan_s": [p for p, _ in s],
                    "total_s": [t for _, t in s],
                }
            )
    if args.rank == 0:
        with open(args.out, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    dist.barrier()
    dist.destroy_process_group()


# -------------------------------------------------------------------------------------------- driver
def run_config(nodes: int, rpn: int, rate: float, rows: list[int], reps: int, out: Path, timeout: float) -> None:
    from netbed import NetBed  # beside this script (sys.path[0] when run as one)

    world = nodes * rpn
    with NetBed(nodes, rate_mbit=rate) as bed:
        env = {
            "GLOO_SOCKET_IFNAME": "eth0",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            "TORCH_CPP_LOG_LEVEL": "ERROR",
        }  # (c10d warns that namespaces have no hostname)
        procs = []
        for rank in range(world):
            argv = [
                sys.executable,
                str(Path(__file__).resolve()),
                "worker",
                "--rank",
                str(rank),
                "--world",
                str(world),
                "--rpn",
                str(rpn),
                "--master",
                bed.addr(0),
                "--port",
                "29500",
                "--rate",
                str(rate),
                "--reps",
                str(reps),
                "--out",
                str(out),
                "--rows",
                *map(str, rows),
            ]
            procs.append(bed.popen(rank // rpn, argv, env))
        deadline = time.time() + timeout
        for p in procs:
            rc = p.wait(timeout=max(1.0, deadline - time.time()))
            if rc:
                raise RuntimeError(f"worker exited with {rc} (nodes={nodes}, rate={rate})")


def summarize(path: Path) -> str:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [
        "| nodes x rpn | link Mbit/s | KiB/rank | flat ms (IQR) | hier ms (IQR) | leader ms (IQR) | hier/flat | "
        "leader/flat |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def key(r):
        return (r["nodes"], r["rpn"], r["rate_mbit"], r["rows"])

    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in recs:
        groups.setdefault(key(r), {})[r["algo"]] = r["total_s"]
    for k in sorted(groups):
        g = groups[k]
        med = {a: statistics.median(v) for a, v in g.items()}

        def cell(a: str) -> str:
            q = statistics.quantiles(g[a], n=4) if len(g[a]) > 1 else [g[a][0]] * 3
            return f"{1e3 * med[a]:.2f} ({1e3 * q[0]:.2f}-{1e3 * q[2]:.2f})"

        lines.append(
            f"| {k[0]}x{k[1]} | {k[2]:g} | {k[3] * WIDTH * 4 // 1024} | {cell('flat')} | "
            f"{cell('hierarchical')} | {cell('leader')} | {med['hierarchical'] / med['flat']:.2f} | "
            f"{med['leader'] / med['flat']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    for name, typ in [
        ("rank", int),
        ("world", int),
        ("rpn", int),
        ("master", str),
        ("port", int),
        ("rate", float),
        ("reps", int),
        ("out", str),
    ]:
        w.add_argument(f"--{name}", type=typ, required=True)
    w.add_argument("--rows", type=int, nargs="+", required=True)
    ap.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rpn", type=int, default=2, help="ranks per node")
    ap.add_argument("--rates", type=float, nargs="+", default=[200, 1000], help="inter-node link Mbit/s")
    ap.add_argument(
        "--rows", type=int, nargs="+", default=[16, 128, 1024, 4096], help="rows (1 KiB each) each rank sends in total"
    )
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS / "alltoall-netns.jsonl")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--append", action="store_true", help="add to --out instead of starting afresh")
    ap.add_argument("--no-fit", action="store_true")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="2 nodes x 2 ranks, 200 Mbit/s, 2 sizes, 1 rep, all output in a temp dir; skips without netns",
    )
    args = ap.parse_args(argv)
    if args.cmd == "worker":
        worker(args)
        return
    results = RESULTS
    if args.smoke:
        sys.path.insert(0, str(ROOT))
        from benchmarks.smoke import netns_available, smoke_dir

        if not netns_available():
            print("alltoall smoke: skipped, network namespaces unavailable (needs root with ip netns and tc)")
            return
        results = smoke_dir("alltoall")
        args.nodes, args.rpn, args.rates, args.rows, args.reps = [2], 2, [200.0], [16, 256], 1
        args.out, args.append, args.timeout = results / "alltoall-netns.jsonl", False, 120
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.append:
        args.out.unlink(missing_ok=True)
    t0 = time.time()
    for nodes in args.nodes:
        for rate in args.rates:
            t = time.time()
            run_config(nodes, args.rpn, rate, args.rows, args.reps, args.out, args.timeout)
            print(f"nodes={nodes} rpn={args.rpn} rate={rate:g} Mbit/s: {time.time() - t:.0f} s", flush=True)
    print(summarize(args.out))
    print(f"total {time.time() - t0:.0f} s; raw samples in {args.out}")
    if not args.no_fit:
        from alltoall_fit import fit_report  # beside this script

        from shardyard.comm.cost_model import CONSTANTS_PATH

        constants = results / CONSTANTS_PATH.name if args.smoke else CONSTANTS_PATH  # smoke: not the package's
        print(fit_report(args.out, results, constants_out=constants))


if __name__ == "__main__":
    main()
