"""Hierarchical byte models on CPU: our MEGABYTE vs MEGABYTE-pytorch, vs a flat transformer, cached
generation, and the longest trainable context with and without stage checkpointing.

    python benchmarks/byte_models.py --quick          # ~5 minutes
    python benchmarks/byte_models.py                  # ~15 minutes
    python benchmarks/byte_models.py --smoke          # seconds: tiny models, every section once, in-process

Every measurement runs in its own subprocess (clean peak-RSS accounting; no allocator carry-over);
throughput rounds alternate between the implementations. MEGABYTE-pytorch (`pip install
MEGABYTE-pytorch`) is a benchmark-only dependency. Prints a Markdown report; `--out FILE` writes it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 2**20
# ours; MEGABYTE-pytorch as shipped (flash_attn=False: einsum attention); and with flash_attn=True (SDPA)
IMPLS = ("ours", "ref_default", "ref_sdpa")


# ------------------------------------------------------------------------------------- helpers
def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage(width: int, depth: int, heads: int, patch: int, **extra: Any) -> dict[str, Any]:
    return {"width": width, "depth": depth, "heads": heads, "patch_size": patch, **extra}


def ours_megabyte(cfg: dict[str, Any], seq: int, chunks: tuple[int, int] = (0, 0)) -> torch.nn.Module:
    from shardyard.models import build_model
    from shardyard.platform.schema import ModelSpec

    p = cfg["patch"]
    spec = ModelSpec(
        kind="megabyte",
        ffn={"kind": "gelu"},
        stages=[
            stage(
                cfg["gw"],
                cfg["gd"],
                cfg["gw"] // cfg["dim_head"],
                seq // p,
                ffn_hidden=4 * cfg["gw"],
                checkpoint_chunks=chunks[0],
            ),
            stage(
                cfg["lw"],
                cfg["ld"],
                cfg["lw"] // cfg["dim_head"],
                p,
                ffn_hidden=4 * cfg["lw"],
                checkpoint_chunks=chunks[1],
            ),
        ],
    )
    return build_model(spec, seq)


def reference_megabyte(cfg: dict[str, Any], seq: int, flash: bool = True) -> torch.nn.Module:
    from MEGABYTE_pytorch import MEGABYTE

    # One (heads, dim_head) for all stages: attention inner width = local width (global gets less).
    return MEGABYTE(
        num_tokens=256,
        dim=(cfg["gw"], cfg["lw"]),
        depth=(cfg["gd"], cfg["ld"]),
        max_seq_len=(seq // cfg["patch"], cfg["patch"]),
        dim_head=cfg["dim_head"],
        heads=cfg["lw"] // cfg["dim_head"],
        ff_mult=4,
        rel_pos=True,
        flash_attn=flash,
    )


def flat_model(cfg: dict[str, Any], seq: int) -> torch.nn.Module:
    from shardyard.models import build_model
    from shardyard.platform.schema import ModelSpec

    spec = ModelSpec(
        kind="dense",
        width=cfg["gw"],
        depth=cfg["gd"],
        heads=cfg["gw"] // cfg["dim_head"],
        ffn={"kind": "gelu", "hidden": 4 * cfg["gw"]},
    )
    return build_model(spec, seq)


def three_stage(context: int, chunks: bool) -> torch.nn.Module:
    from shardyard.models import build_model
    from shardyard.platform.schema import ModelSpec

    spec = ModelSpec(
        kind="multiscale",
        stages=[
            stage(128, 2, 4, context // 512, ffn_hidden=384),
            stage(96, 2, 2, 16, ffn_hidden=256, checkpoint_chunks=8 if chunks else 0),
            stage(64, 2, 2, 32, ffn_hidden=192, checkpoint_chunks=32 if chunks else 0),
        ],
    )
    return build_model(spec, context)


def corpus(seq: int) -> tuple[np.ndarray, np.ndarray]:
    from shardyard.data.corpus import load_corpus
    from shardyard.platform.schema import DataSpec

    max_bytes = int(os.environ.get("BYTE_MODELS_CORPUS_BYTES", "24000000"))  # --smoke: less
    c = load_corpus(DataSpec(paths=["stdlib"], seq_len=seq, val_fraction=0.05, max_bytes=max_bytes))
    return c.train, c.val


def loss_of(impl: str, model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    if impl.startswith("ref"):
        return model(window[:, 1:], return_loss=True)  # it predicts every byte of its input
    return model(window[:, :-1], window[:, 1:])[1]


# ------------------------------------------------------------------------------------- workers
def worker_train(a: dict[str, Any]) -> dict[str, Any]:
    """Steps of AdamW training on random bytes; time per step and peak RSS above the start."""
    torch.manual_seed(0)
    seq, batch = a["seq"], a["batch"]
    if a["impl"].startswith("ref"):
        model = reference_megabyte(a["cfg"], seq, flash=a["impl"] == "ref_sdpa")
    elif a["impl"] == "three_stage":
        model = three_stage(seq, a["chunks"])
    else:
        model = ours_megabyte(a["cfg"], seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 256, (batch, seq + 1))
    base = rss_mib()
    times, cpu = [], []
    for _i in range(a["warmup"] + a["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_of(a["impl"], model, data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "step_s": statistics.median(times[a["warmup"] :]),
        "cpu_s": statistics.median(cpu[a["warmup"] :]),
        "peak_mib": peak_rss_mib() - base,
        "params": sum(p.numel() for p in model.parameters()),
        "loss": float(loss.detach()),
    }


def worker_quality(a: dict[str, Any]) -> dict[str, Any]:
    """Train for a fixed wall-clock budget on stdlib bytes, then validation bits per byte."""
    torch.manual_seed(0)
    seq = a["seq"]
    model = ours_megabyte(a["cfg"], seq) if a["impl"] == "megabyte" else flat_model(a["cfg"], seq)
    train, val = corpus(seq)
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=a["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a["budget_s"]:
        for g in opt.param_groups:
            g["lr"] = a["lr"] * min(1.0, (steps + 1) / 10)
        starts = rng.integers(0, len(train) - seq - 1, a["batch"])
        window = torch.from_numpy(np.stack([train[s : s + seq + 1] for s in starts]).astype(np.int64))
        _, loss = model(window[:, :-1], window[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps += 1
    train_s = time.perf_counter() - t0
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, min(len(val) - seq - 1, a["val_windows"] * seq), seq):
            window = torch.from_numpy(val[s : s + seq + 1].astype(np.int64)).view(1, -1)
            _, loss = model(window[:, :-1], window[:, 1:])
            total, count = total + loss.item() * seq, count + seq
    return {
        "steps": steps,
        "train_s": train_s,
        "bytes_per_s": steps * a["batch"] * seq / train_s,
        "val_bpb": total / count / math.log(2),
        "val_bytes": count,
        "params": sum(p.numel() for p in model.parameters()),
    }


def worker_generate(a: dict[str, Any]) -> dict[str, Any]:
    from shardyard.models.bytes import generate

    torch.manual_seed(0)
    model = ours_megabyte(a["cfg"], a["seq"])
    _, val = corpus(a["seq"])
    prompt = bytes(val[: a["prompt"]])
    out = {}
    for use_cache, n in ((True, a["n_cache"]), (False, a["n_nocache"])):
        t0 = time.perf_counter()
        generate(model, prompt, n, temperature=1.0, top_k=20, use_cache=use_cache, seed=0)
        out["cache" if use_cache else "nocache"] = n / (time.perf_counter() - t0)
    return out


WORKERS = {"train": worker_train, "quality": worker_quality, "generate": worker_generate}


SMOKE = False  # --smoke: workers run in this process (each subprocess would cost a torch import)


def run_worker(kind: str, args: dict[str, Any], threads: int, timeout: float) -> dict[str, Any] | None:
    if SMOKE:
        return json.loads(json.dumps(WORKERS[kind](json.loads(json.dumps(args)))))
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(args), "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny models and contexts, every section once, workers in this process (seconds; figures meaningless)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per measurement")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(WORKERS[args.worker[0]](json.loads(args.worker[1]))))
        return

    global SMOKE
    SMOKE = smoke = args.smoke
    q, th = args.quick or smoke, args.threads
    cfg = {"gw": 256, "gd": 4, "lw": 128, "ld": 2, "patch": 8, "dim_head": 32}
    impls = IMPLS
    if smoke:
        cfg = {"gw": 32, "gd": 1, "lw": 32, "ld": 1, "patch": 4, "dim_head": 16}
        if importlib.util.find_spec("MEGABYTE_pytorch") is None:
            impls = ("ours",)
            print("smoke: MEGABYTE-pytorch not installed, comparing ours only")
        sys.path.insert(0, str(ROOT))
        from benchmarks.smoke import smoke_dir

        args.out = smoke_dir("byte_models") / "report.md"  # the report is written, never to --out
        os.environ["BYTE_MODELS_CORPUS_BYTES"] = "3000000"
    lines = [
        f"Command: `python benchmarks/byte_models.py{' --smoke' if smoke else ' --quick' if q else ''} --threads {th}`",
        f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{th} intra-op thread(s) per measurement",
        "",
        f"Model (both implementations): global width {cfg['gw']} x {cfg['gd']} blocks, local width "
        f"{cfg['lw']} x {cfg['ld']} blocks, patch {cfg['patch']}, head size {cfg['dim_head']}, GELU FFN 4x, "
        "rotary positions, fp32, AdamW step included.",
        "",
    ]

    # 1. training throughput and memory vs MEGABYTE-pytorch (alternating rounds)
    lines += [
        "## 1. Training: ours vs MEGABYTE-pytorch 0.3.6",
        "",
        "Step time is the median over rounds of each round's median step; `CPU s` is the process's CPU",
        "time per step (with one thread it is the wall time minus time stolen by other tenants).",
        "ref_default = MEGABYTE-pytorch as shipped (flash_attn=False); ref_sdpa = flash_attn=True. Its heads",
        f"and head size are shared by all stages: {cfg['lw'] // cfg['dim_head']} x {cfg['dim_head']}, so its "
        f"global attention is "
        f"{cfg['lw']} wide where ours is {cfg['gw']} (its global stage does less attention work).",
        "",
        "| seq | batch | impl | params | wall s/step | CPU s/step | bytes/s (CPU) | peak RSS over start (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    train_sizes = [(64, 1)] if smoke else [(2048, 2), (8192, 1)] if q else [(2048, 4), (4096, 2), (8192, 2)]
    for seq, batch in train_sizes:
        res: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
        for _ in range(1 if smoke else 2 if q else 3):
            for impl in impls:
                r = run_worker(
                    "train",
                    {
                        "impl": impl,
                        "cfg": cfg,
                        "seq": seq,
                        "batch": batch,
                        "steps": 1 if smoke else 3 if q else 5,
                        "warmup": 0 if smoke else 1,
                    },
                    th,
                    600,
                )
                if r:
                    res[impl].append(r)
        best = {}
        for impl in impls:
            if not res[impl]:
                lines.append(f"| {seq} | {batch} | {impl} | failed | | | | |")
                continue
            step = statistics.median(r["step_s"] for r in res[impl])
            cpu = statistics.median(r["cpu_s"] for r in res[impl])
            peak = statistics.median(r["peak_mib"] for r in res[impl])
            best[impl] = (seq * batch / cpu, peak, seq * batch / step)
            lines.append(
                f"| {seq} | {batch} | {impl} | {res[impl][0]['params']:,} | {step:.3f} | {cpu:.3f} | "
                f"{seq * batch / cpu:,.0f} | {peak:,.0f} |"
            )
        for ref in impls[1:]:
            if "ours" in best and ref in best:
                ratios.append(
                    (
                        seq,
                        ref,
                        best["ours"][0] / best[ref][0],
                        best["ours"][1] / max(best[ref][1], 1),
                        best["ours"][2] / best[ref][2],
                    )
                )
    lines.append("")
    for seq, ref, speed, mem, wall in ratios:
        ok = "met" if speed >= 1.3 and mem <= 1.0 else "MISSED"
        lines.append(
            f"- seq {seq} vs {ref}: ours at **{speed:.2f}x** its bytes/s by CPU time ({wall:.2f}x by wall "
            f"time) with **{mem:.2f}x** its peak memory (goal >= 1.3x at <= 1.0x: {ok})"
        )
    lines.append("")
    print("\n".join(lines), flush=True)

    # 2. quality at equal wall clock: MEGABYTE vs flat transformer, 8K context
    seq, budget = (256, 1) if smoke else (8192, (90 if q else 240))
    lines += [
        f"## 2. Equal wall clock ({budget} s each), {seq:,}-byte context, stdlib .py bytes",
        "",
        "| model | params | steps | train bytes/s | val bpb (bytes) |",
        "|---|---|---|---|---|",
    ]
    qual = {}
    for impl in ("megabyte", "flat"):
        r = run_worker(
            "quality",
            {
                "impl": impl,
                "cfg": cfg,
                "seq": seq,
                "batch": 1,
                "lr": 2e-3,
                "budget_s": budget,
                "val_windows": 1 if smoke else 4 if q else 8,
            },
            th,
            budget + 600,
        )
        if r:
            qual[impl] = r
            lines.append(
                f"| {impl} | {r['params']:,} | {r['steps']} | {r['bytes_per_s']:,.0f} | "
                f"{r['val_bpb']:.3f} ({r['val_bytes']:,}) |"
            )
    if len(qual) == 2:
        better = qual["megabyte"]["val_bpb"] <= qual["flat"]["val_bpb"]
        speed = qual["megabyte"]["bytes_per_s"] / qual["flat"]["bytes_per_s"]
        lines += [
            "",
            f"- MEGABYTE val bpb {qual['megabyte']['val_bpb']:.3f} vs flat {qual['flat']['val_bpb']:.3f} "
            f"({'no worse: met' if better else 'worse: MISSED'}); training {speed:.1f}x faster per byte "
            f"({'met' if speed > 1 else 'MISSED'})",
        ]
    lines.append("")
    print("\n".join(lines[-6:]), flush=True)

    # 3. generation with and without caches
    gen = (
        {"seq": 256, "prompt": 200, "n_cache": 8, "n_nocache": 2}
        if smoke
        else {"seq": 8192, "prompt": 8000, "n_cache": 512 if q else 1024, "n_nocache": 8 if q else 24}
    )
    r = run_worker("generate", {"cfg": cfg, **gen}, th, 900)
    lines += [
        f"## 3. Generation at {gen['seq']:,}-byte context (prompt {gen['prompt']} bytes, sampling top-k 20)",
        "",
    ]
    if r:
        x = r["cache"] / r["nocache"]
        lines += [
            "| path | bytes/s |",
            "|---|---|",
            f"| KV caches, global once per patch | {r['cache']:,.1f} |",
            f"| whole model per byte (reference behaviour) | {r['nocache']:,.2f} |",
            "",
            f"- speed-up **{x:,.0f}x** (goal >= 5x: {'met' if x >= 5 else 'MISSED'})",
            "",
        ]
    else:
        lines += ["generation benchmark failed", ""]
    print("\n".join(lines[-8:]), flush=True)

    # 4. longest context that trains, with and without stage checkpointing
    budget_mib, cap = 2048, (60 if q else 120)
    lines += [
        f"## 4. Longest context that trains: 3-stage model (128/96/64 wide, patches N x 16 x 32), "
        f"batch 1, one AdamW step; fits = done in {cap} s with peak RSS <= {budget_mib} MiB",
        "",
        "| context (bytes) | checkpointing | step (s) | peak RSS over start (MiB) | fits |",
        "|---|---|---|---|---|",
    ]
    longest = {}
    for chunks in (False, True):
        contexts = [1024] if smoke else [16384, 65536, 262144] if q else [16384, 65536, 262144, 1048576]
        for context in contexts:
            r = run_worker(
                "train",
                {
                    "impl": "three_stage",
                    "seq": context,
                    "batch": 1,
                    "chunks": chunks,
                    "steps": 1,
                    "warmup": 0,
                    "cfg": cfg,
                },
                th,
                cap,
            )
            fits = bool(r) and r["peak_mib"] <= budget_mib
            step = f"{r['step_s']:.1f}" if r else f"> {cap}"
            peak = f"{r['peak_mib']:,.0f}" if r else "-"
            lines.append(
                f"| {context:,} | {'per-stage chunks' if chunks else 'off'} | {step} | {peak} | {'yes' if fits else 'no'} |"
            )
            if not fits:
                break
            longest[chunks] = context
    lines += [
        "",
        f"- longest: {longest.get(False, 0):,} bytes without checkpointing, "
        f"{longest.get(True, 0):,} bytes with per-stage chunked checkpointing",
        "",
    ]
    print("\n".join(lines[-8:]), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
        print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
