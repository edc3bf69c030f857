"""Data pipeline figures: prepare throughput, loader vs step time, bytes vs BPE at equal wall clock.

1. prepare MB/s on the same corpus (stdlib sources, first --mb MB) for the byte tokenizer and
   bpe:<vocab>: a plain single-process loop, Ray Data on a 1-node and on a 2-node
   `ray.cluster_utils.Cluster` (2 logical CPUs per node). BPE's merge learning runs once on the
   driver and is timed on its own.
2. loader throughput: seconds per batch of the resumable loader over prepared shards (bytes, BPE)
   against one training step of each preset (tiny, small, base; forward + backward + AdamW, one
   process), i.e. the data wait share of a step if the loader were not overlapped at all.
3. a tiny MoE trained for the same wall-clock time on bytes and on bpe:<vocab> tokens of the same
   training split, then scored in bits per byte on the same held-out documents.

    python benchmarks/data.py --mb 8 --seconds 60 --out benchmarks/results/data-2026-11-25.md
    python benchmarks/data.py --smoke   # 0.3 MB, bpe:512, 1 s, the tiny preset; report to a temp dir
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shardyard.data.prepare import prepare
from shardyard.data.training_data import build_data_loader, load_training_data
from shardyard.platform.schema import DataSpec
from shardyard.platform.spec import load_spec_text

THREADS = 2  # torch threads of the loader and training parts (--smoke: 1, robust on a busy machine)


def prep_dir(root: Path, tag: str) -> Path:
    return root / tag.replace(":", "")


def data_spec(root: Path, tokenizer: str, mb: int, tag: str, seq_len: int = 256) -> DataSpec:
    return DataSpec(
        sources=[{"path": "stdlib", "format": "text"}],
        tokenizer=tokenizer,
        seq_len=seq_len,
        max_bytes=int(mb * 1_000_000),
        prepared_dir=str(prep_dir(root, tag)),
        cache_dir=str(root / "cache"),
    )


def bench_prepare(root: Path, mb: float, vocab: int) -> list[dict]:
    import ray

    from shardyard.data.prepare import build_tokenizer
    from shardyard.data.sources import resolve_units
    from tests.helpers import two_node_ray_cluster

    rows = []
    bpe = f"bpe:{vocab}"
    start = time.perf_counter()
    build_tokenizer(data_spec(root, bpe, mb, "x"), resolve_units(data_spec(root, bpe, mb, "x")))
    bpe_train_s = time.perf_counter() - start
    for tok in ("bytes", bpe):
        report = prepare(data_spec(root, tok, mb, f"loop-{tok}"), parallel="local")
        rows.append(
            {
                "how": "one process",
                "tokenizer": tok,
                "mb_per_s": report.mb_per_s,
                "s": report.seconds,
                "nodes": 1,
                "input_mb": report.input_bytes / 1e6,
            }
        )
    ray.init(
        address="local", num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False, logging_level="WARNING"
    )
    try:
        for tok in ("bytes", bpe):
            report = prepare(data_spec(root, tok, mb, f"ray1-{tok}"), parallel="ray")
            rows.append(
                {
                    "how": "Ray Data, 1 node x 2 CPUs",
                    "tokenizer": tok,
                    "mb_per_s": report.mb_per_s,
                    "s": report.seconds,
                    "nodes": len(report.units_per_node),
                    "input_mb": report.input_bytes / 1e6,
                }
            )
    finally:
        ray.shutdown()
    with two_node_ray_cluster():
        for tok in ("bytes", bpe):
            report = prepare(data_spec(root, tok, mb, f"ray2-{tok}"), parallel="ray")
            rows.append(
                {
                    "how": "Ray Data, 2 nodes x 2 CPUs",
                    "tokenizer": tok,
                    "mb_per_s": report.mb_per_s,
                    "s": report.seconds,
                    "nodes": len(report.units_per_node),
                    "input_mb": report.input_bytes / 1e6,
                }
            )
    for row in rows:
        row["bpe_train_s"] = bpe_train_s if row["tokenizer"] != "bytes" else 0.0
    return rows


def model_spec(preset: str, vocab_tokenizer: str, root: Path, mb: float) -> object:
    return load_spec_text(f"""name: bench
model: {{kind: moe, preset: {preset}, moe: {{num_experts: 4, top_k: 2}}}}
data: {{sources: [{{path: stdlib, format: text}}], tokenizer: '{vocab_tokenizer}', seq_len: 256, max_bytes: {int(mb * 1_000_000)},
        prepared_dir: {prep_dir(root, "local-" + vocab_tokenizer)}, cache_dir: {root / "cache"}}}
training: {{steps: 100, batch_size: 8, eval_every: 0}}
optim: {{schedule: {{warmup: 1}}}}
resources: {{workers: 1, cpus_per_worker: 2}}
tracking: {{mode: disabled}}
""")


def bench_loader(root: Path, mb: float, vocab: int, presets: list[str], n: int = 200) -> list[dict]:
    from shardyard.models import build_model

    torch.set_num_threads(THREADS)
    rows = []
    loader_s = {}
    for tok in ("bytes", f"bpe:{vocab}"):
        spec = model_spec("tiny", tok, root, mb)
        data = load_training_data(spec.data)
        loader = build_data_loader(data, 256, 8, 0, 1, 0)
        loader.next_batch()
        start = time.perf_counter()
        for _ in range(n):
            loader.next_batch()
        loader_s[tok] = (time.perf_counter() - start) / n
    for preset in presets:
        spec = model_spec(preset, "bytes", root, mb)
        model = build_model(spec.model, 256)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, 256, (8, 256))
        times = []
        for _i in range(3 if preset != "base" else 2):
            start = time.perf_counter()
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        step = statistics.median(times[1:]) if len(times) > 2 else times[-1]
        for tok, per_batch in loader_s.items():
            rows.append(
                {
                    "preset": preset,
                    "tokenizer": tok,
                    "step_s": step,
                    "loader_s": per_batch,
                    "wait_share": per_batch / (step + per_batch),
                }
            )
    return rows


def bench_equal_wall_clock(root: Path, mb: float, vocab: int, seconds: float) -> list[dict]:
    from shardyard.data.validation import rank_batches
    from shardyard.models import build_model
    from shardyard.runtime.evaluation import evaluate

    torch.set_num_threads(THREADS)
    rows = []
    for tok in ("bytes", f"bpe:{vocab}"):
        spec = load_spec_text(f"""name: bench
model: {{kind: moe, width: 128, depth: 4, heads: 4, ffn: {{hidden: 384}}, moe: {{num_experts: 4, top_k: 2}}}}
data: {{sources: [{{path: stdlib, format: text}}], tokenizer: '{tok}', seq_len: 128, max_bytes: {int(mb * 1_000_000)},
        prepared_dir: {prep_dir(root, "local-" + tok)}, cache_dir: {root / "cache"}}}
training: {{eval_bytes: 65536}}
tracking: {{mode: disabled}}
""")
        data = load_training_data(spec.data)
        torch.manual_seed(0)
        model = build_model(spec.model, 128, data.vocab_size)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
        loader = build_data_loader(data, 128, 16, 0, 1, 0)
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            x, y = loader.next_batch()
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            steps += 1
        trained = time.perf_counter() - start
        batches = rank_batches(data.held_out, 128, 65536, 16, 0, 1)
        token_bytes = None if data.token_bytes is None else torch.from_numpy(data.token_bytes)
        result = evaluate(model, batches, torch.device("cpu"), token_bytes=token_bytes)
        rows.append(
            {
                "tokenizer": tok,
                "steps": steps,
                "train_s": trained,
                "train_mb": steps * 16 * 128 * data.bytes_per_token / 1e6,
                "val_bpb": result.bpb,
                "stderr": result.stderr,
                "val_windows": result.windows,
                "val_bytes": result.bytes,
                "bytes_per_token": data.bytes_per_token,
            }
        )
    return rows


def markdown(
    prep: list[dict], loader: list[dict], equal: list[dict], args: argparse.Namespace, load: tuple[str, str]
) -> str:
    lines = [
        f"# Data pipeline, {time.strftime('%Y-%m-%d')} (CPU, this 2-core machine)",
        "",
        f"Command: `python benchmarks/data.py --mb {args.mb} --vocab {args.vocab} --seconds {args.seconds} "
        f"--presets {' '.join(args.presets)}`",
        "",
        f"Machine load (uptime) before: `{load[0]}`; after: `{load[1]}`. Other engineers' jobs shared the two "
        "cores: absolute figures are noisy, compare rows of one table only.",
        "",
        "## Prepare throughput (stdlib sources, MB of input per second, end to end incl. writing shards)",
        "",
        "| how | tokenizer | input MB | seconds | MB/s | nodes that tokenized | BPE merge learning (s, included) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in prep:
        lines.append(
            f"| {r['how']} | {r['tokenizer']} | {r['input_mb']:.1f} | {r['s']:.1f} | {r['mb_per_s']:.2f} | "
            f"{r['nodes']} | {r['bpe_train_s']:.1f} |"
        )
    lines += [
        "",
        "## Loader vs training step (batch 8 x 256 tokens, one process, 2 threads)",
        "",
        "| preset | tokenizer | step (s) | loader per batch (ms) | data wait share if not overlapped |",
        "|---|---|---|---|---|",
    ]
    for r in loader:
        lines.append(
            f"| {r['preset']} | {r['tokenizer']} | {r['step_s']:.3f} | {r['loader_s'] * 1e3:.3f} | "
            f"{100 * r['wait_share']:.3f}% |"
        )
    lines += [
        "",
        f"## Tiny MoE (width 128, 4 layers, 4 experts top-2), {args.seconds:.0f} s of training each, "
        "seq 128 tokens, batch 16",
        "",
        "| tokenizer | steps | training MB seen | bytes/token | val bits/byte +- stderr | windows | bytes scored |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in equal:
        lines.append(
            f"| {r['tokenizer']} | {r['steps']} | {r['train_mb']:.2f} | {r['bytes_per_token']:.2f} | "
            f"{r['val_bpb']:.3f} +- {r['stderr']:.3f} | {r['val_windows']} | {r['val_bytes']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip", nargs="*", default=[], choices=["prepare", "loader", "equal"])
    parser.add_argument(
        "--smoke", action="store_true", help="0.3 MB, bpe:512, 1 s, the tiny preset, report to a temp dir (Ray)"
    )
    args = parser.parse_args()
    if args.smoke:
        from benchmarks.smoke import hermetic_ray, smoke_dir

        global THREADS
        args.mb, args.vocab, args.seconds, args.presets, THREADS = 0.3, 512, 1.0, ["tiny"], 1
        args.out = smoke_dir("data") / "data.md"
        hermetic_ray(args.out.parent)
    load_before = os.popen("uptime").read().strip()
    with tempfile.TemporaryDirectory(prefix="shardyard-bench-data-") as tmp:
        root = Path(tmp)
        for tok in ("bytes", f"bpe:{args.vocab}"):  # the loader and equal-time parts read these
            prepare(data_spec(root, tok, args.mb, f"local-{tok}"), parallel="local")
        prep = [] if "prepare" in args.skip else bench_prepare(root, args.mb, args.vocab)
        print(json.dumps(prep, indent=1), flush=True)
        n = 20 if args.smoke else 200
        loader = [] if "loader" in args.skip else bench_loader(root, args.mb, args.vocab, args.presets, n)
        print(json.dumps(loader, indent=1), flush=True)
        equal = [] if "equal" in args.skip else bench_equal_wall_clock(root, args.mb, args.vocab, args.seconds)
        print(json.dumps(equal, indent=1), flush=True)
    text = markdown(prep, loader, equal, args, (load_before, os.popen("uptime").read().strip()))
    print(text)
    if args.out:
        args.out.write_text(text)
        print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
