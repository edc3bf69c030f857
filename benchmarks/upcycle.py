"""Sparse upcycling against continued dense training, at equal active compute.

Per seed: a dense model trains BASE steps and is exported to HF (llama). Two continuations then train
CONT steps each from those weights with a fresh optimizer and the same schedule and data order:
  dense     model.init_from: the export            (ffn 3 x width)
  upcycled  model.upcycle_from: the same export    (8 experts of the same MLP, top-1 renormalised:
                                                   the same active FFN compute per token, + router)
Held-out bits per byte (+- standard error over windows) for both, and the paired difference per seed.

    PYTHONPATH=. python benchmarks/upcycle.py [--seeds 0,1] [--base 150] [--cont 150] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import tempfile
import time
from pathlib import Path

MODEL = "width: 128, depth: 4, heads: 4, ffn: {hidden: 384}"
ROUTERS = {
    "top1": "{num_experts: 8, top_k: 1, router: softmax_topk}",
    "switch8": "{num_experts: 8, top_k: 1, router: switch, routed_scale: 8.0}",
}


def spec_text(name: str, seed: int, steps: int, storage: Path, model: str) -> str:
    return (
        f"name: {name}\nseed: {seed}\nmodel: {model}\n"
        "data: {paths: [stdlib], seq_len: 256, max_bytes: 3000000}\n"
        "optim: {lr: 2.0e-3, schedule: {warmup: 20}}\n"
        f"training: {{steps: {steps}, batch_size: 8, eval_every: 0, eval_bytes: 131072, log_every: 10}}\n"
        "resources: {workers: 1, cpus_per_worker: 1, max_failures: 0}\n"
        f"checkpoint: {{dir: {storage}, every: {steps}, keep: 2}}\n"
        "tracking: {mode: disabled}\n"
    )


def train(text: str, run_dir: Path) -> float:
    from shardyard.platform.spec import load_spec_text
    from shardyard.runtime.worker import LocalReporter, Trainer

    start = time.perf_counter()
    Trainer(load_spec_text(text), run_dir, LocalReporter(run_dir, 2)).fit()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--base", type=int, default=150)
    ap.add_argument("--cont", type=int, default=150)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--router",
        choices=list(ROUTERS),
        default="top1",
        help="top1: softmax top-1 renormalised (exact start; the weight is always 1, so the router learns only from "
        "the aux loss) | switch8: switch top-1 with routed_scale 8 (~exact start; the router gets gradients)",
    )
    ap.add_argument("--smoke", action="store_true", help="one seed, 4 + 4 steps: the same path, nothing written")
    args = ap.parse_args()
    if args.smoke:
        args.seeds, args.base, args.cont, args.out = "0", 4, 4, None
    from shardyard.runtime.evaluation import evaluate_run
    from shardyard.runtime.export import export_hf

    rows = []
    with tempfile.TemporaryDirectory(prefix="upcycle-") as tmp:
        for seed in map(int, args.seeds.split(",")):
            work = Path(tmp) / f"s{seed}"
            base_s = train(spec_text("base", seed, args.base, work, f"{{kind: dense, {MODEL}}}"), work / "base")
            export_hf(work / "base", work / "hf")
            dense = f"{{kind: dense, {MODEL}, init_from: '{work / 'hf'}'}}"
            moe = f"{{kind: moe, {MODEL}, upcycle_from: '{work / 'hf'}', moe: {ROUTERS[args.router]}}}"
            dense_s = train(spec_text("dense", seed, args.cont, work, dense), work / "dense")
            moe_s = train(spec_text("upcycled", seed, args.cont, work, moe), work / "upcycled")
            _, base_r = evaluate_run(work / "base")
            _, dense_r = evaluate_run(work / "dense")
            _, moe_r = evaluate_run(work / "upcycled")
            row = {
                "seed": seed,
                "base_bpb": base_r.bpb,
                "dense_bpb": dense_r.bpb,
                "dense_se": dense_r.stderr,
                "upcycled_bpb": moe_r.bpb,
                "upcycled_se": moe_r.stderr,
                "upcycled_minus_dense": moe_r.bpb - dense_r.bpb,
                "seconds": {"base": base_s, "dense": dense_s, "upcycled": moe_s},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    diffs = [r["upcycled_minus_dense"] for r in rows]
    mean = sum(diffs) / len(diffs)
    se = (
        math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
        if len(diffs) > 1
        else float("nan")
    )
    lines = [
        f"# Sparse upcycling vs continued dense training ({datetime.date.today()})",
        "",
        f"Command: `PYTHONPATH=. python benchmarks/upcycle.py --seeds {args.seeds} --base {args.base} --cont {args.cont} "
        f"--router {args.router}`;"
        f" model {{{MODEL}}}, seq 256, batch 8, lr 2e-3 (warm-up 20, cosine), one CPU worker. Dense base trained "
        f"{args.base} steps and exported to HF; both continuations train {args.cont} steps from it with a fresh "
        "optimizer and the same data order: dense via `model.init_from`, upcycled via `model.upcycle_from` (8 "
        f"copies of the MLP, moe {ROUTERS[args.router]}: equal active FFN compute). Held-out bpb over 131072 "
        "bytes (+- standard error over windows).",
        "",
        "| seed | base bpb | dense continued | upcycled continued | upcycled - dense |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['base_bpb']:.4f} | {r['dense_bpb']:.4f} +- {r['dense_se']:.4f} | "
            f"{r['upcycled_bpb']:.4f} +- {r['upcycled_se']:.4f} | {r['upcycled_minus_dense']:+.4f} |"
        )
    lines += ["", f"Mean difference over seeds: {mean:+.4f} +- {se:.4f} (standard error over {len(diffs)} seeds)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
