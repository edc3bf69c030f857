"""How much can centroid compression keep on this model at all? LSH against a k-means oracle.

LSH-MoE sends one centroid per bucket of similar rows and gives each row E(c) + (x - c). LSH is a
cheap stand-in for clustering; the best a centroid scheme with residual compensation can do at a
given number of centroids is (close to) k-means within each expert's rows. This loads a trained MoE
byte LM, swaps every MoE layer's experts for

- `exact`: the experts as trained;
- `kmeans r`: per micro-batch and expert, k-means (k = rows / r, 15 Lloyd steps, seeded) and
  E(c) + (x - c) per row: the oracle at r x fewer rows;
- `lsh h`: shardyard's LSH dispatch with h hash functions (`parallel.dispatch.lsh`, one worker),

and scores the same held-out windows with each (drop-in at evaluation: the model was not trained
with the compression). It prints rows sent per copy, the relative error of the expert outputs and
held-out bits per byte with the paired difference to `exact` (window by window, with its error).

    python benchmarks/lsh_limit.py RUN_DIR [--eval-bytes 65536] [--ratios 2 4] [--hashes 8 10 12 14]
    python benchmarks/lsh_limit.py --smoke    # trains a tiny MoE run in a temp dir first (seconds)
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardyard.comm.dispatch_metrics import dispatch_metrics  # noqa: E402
from shardyard.data.training_data import load_training_data  # noqa: E402
from shardyard.data.validation import all_batches  # noqa: E402
from shardyard.models.moe.layer import MoELayer  # noqa: E402
from shardyard.runtime.evaluation import per_window_bits  # noqa: E402
from shardyard.runtime.export import load_for_inference  # noqa: E402
from shardyard.runtime.parallel.parallelize import place_experts  # noqa: E402


def kmeans(x: torch.Tensor, k: int, iters: int = 15, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k', width], assignment [rows]) with empty clusters dropped; seeded random init."""
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        count = torch.bincount(assign, minlength=len(centres))
        centres[count > 0] = sums[count > 0] / count[count > 0, None]
    assign = torch.cdist(x, centres).argmin(dim=1)
    used, assign = torch.unique(assign, return_inverse=True)
    sums = torch.zeros(len(used), x.shape[1], dtype=x.dtype).index_add_(0, assign, x)
    return sums / torch.bincount(assign)[:, None].to(x.dtype), assign


class KMeansExperts(nn.Module):
    """The experts behind a k-means centroid dispatch: rows / ratio centroids per expert, residual added."""

    def __init__(self, experts: nn.Module, ratio: float, stats: dict[str, float]) -> None:
        super().__init__()
        self.experts, self.ratio, self.stats = experts, ratio, stats

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ends = offsets.to(torch.int64).tolist()
        starts = [0] + ends[:-1]
        cents, assigns, counts = [], [], []
        for lo, hi in zip(starts, ends):
            rows = x_sorted[lo:hi]
            if len(rows) == 0:
                counts.append(0)
                continue
            c, a = kmeans(rows, max(1, math.ceil(len(rows) / self.ratio)))
            cents.append(c)
            assigns.append(a + sum(counts))
            counts.append(len(c))
        centroids = torch.cat(cents)
        assign = torch.cat(assigns)
        out_c = self.experts(centroids, torch.cumsum(torch.tensor(counts), 0).to(torch.int32))
        out = out_c[assign] + (x_sorted - centroids[assign])
        exact = self.experts(x_sorted, offsets)
        self.stats["err_sq"] += float((out - exact).double().square().sum())
        self.stats["ref_sq"] += float(exact.double().square().sum())
        self.stats["rows"] += float(len(x_sorted))
        self.stats["sent"] += float(len(centroids))
        return out


def score(model: nn.Module, batches: list) -> np.ndarray:
    return per_window_bits(model, batches, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--eval-bytes", type=int, default=None, help="held-out bytes scored (default 65536)")
    parser.add_argument("--ratios", type=float, nargs="*", default=None, help="k-means ratios (default 2 4)")
    parser.add_argument("--hashes", type=int, nargs="+", default=None, help="LSH hash counts (default 8 10 12 14)")
    parser.add_argument(
        "--dispatch",
        nargs="*",
        default=[],
        help="more parallel.dispatch settings as YAML flow mappings, e.g. '{lsh: {hashes: 20}, payload: fp8}'",
    )
    parser.add_argument("--smoke", action="store_true", help="train a tiny MoE run in a temp dir and use it (seconds)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        from benchmarks.smoke import smoke_dir, tiny_run_dir

        args.run_dir = args.run_dir or tiny_run_dir(smoke_dir("lsh_limit"))
        args.eval_bytes = args.eval_bytes or 4096
        args.ratios = [2.0] if args.ratios is None else args.ratios
        args.hashes = args.hashes or [8]
        args.dispatch = args.dispatch or ["{lsh: {hashes: 8}, payload: bf16}"]
    if args.run_dir is None:
        parser.error("RUN_DIR is required (or --smoke)")
    args.eval_bytes = args.eval_bytes or 65536
    args.ratios = [2.0, 4.0] if args.ratios is None else args.ratios
    args.hashes = args.hashes or [8, 10, 12, 14]

    spec, model = load_for_inference(args.run_dir)
    data = load_training_data(spec.data)
    batches = all_batches(data.held_out, spec.data.seq_len, args.eval_bytes, 8, 1)
    moe = spec.model.moe
    print(
        f"# {args.run_dir}: {moe.num_experts} experts top-{moe.top_k}, width {spec.model.width}; "
        f"{sum(len(b[0]) for b in batches)} held-out windows of {spec.data.seq_len} bytes; load "
        f"{os.getloadavg()[0]:.1f}"
    )
    exact = score(model, batches)
    n = len(exact)
    print(
        "\n| dispatch | rows sent / copies | bytes vs fp32 | expert-output rel. error | error / output spread | "
        "held-out bpb | minus exact (paired s.e.) | relative |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| exact | 1.000 | 1.000 | 0 | 0 | {exact.mean():.4f} | - | - |")

    def row(
        name: str,
        sent: float,
        err: float,
        bits: np.ndarray,
        byte_ratio: float | None = None,
        spread: float = float("nan"),
    ) -> None:
        diff = bits - exact
        ratio = sent if byte_ratio is None else byte_ratio
        print(
            f"| {name} | {sent:.3f} | {ratio:.3f} | {err:.3f} | {spread:.3f} | {bits.mean():.4f} | "
            f"{diff.mean():+.4f} ({diff.std(ddof=1) / math.sqrt(n):.4f}) "
            f"| {100 * diff.mean() / exact.mean():+.2f} % |",
            flush=True,
        )

    for ratio in args.ratios:
        oracle = copy.deepcopy(model)
        stats = {"err_sq": 0.0, "ref_sq": 0.0, "rows": 0.0, "sent": 0.0}
        for layer in (m for m in oracle.modules() if isinstance(m, MoELayer)):
            layer.experts = KMeansExperts(layer.experts, ratio, stats)
        bits = score(oracle, batches)
        row(f"kmeans {ratio:g}x", stats["sent"] / stats["rows"], math.sqrt(stats["err_sq"] / stats["ref_sq"]), bits)
    settings = [{"lsh": {"hashes": h}} for h in args.hashes] + [yaml.safe_load(text) for text in args.dispatch]
    for setting in settings:
        dispatch = type(spec.parallel.dispatch)(**setting)
        if dispatch.lsh is not None:
            dispatch.lsh.error_every = 0
        compressed = copy.deepcopy(model)
        place_experts(compressed, None, spec.parallel.model_copy(update={"dispatch": dispatch}))
        bits = score(compressed, batches)
        metrics = dispatch_metrics(compressed)
        sent = sum(v for k, v in metrics.items() if k.endswith("/rows_sent"))
        copies = sum(v for k, v in metrics.items() if k.endswith("/tokens_in"))
        err, spread = (
            output_error(copy.deepcopy(model), spec, setting, batches[:8])
            if dispatch.lsh is not None
            else (float("nan"), float("nan"))
        )
        name = (
            f"lsh {dispatch.lsh.hashes}"
            if setting == {"lsh": {"hashes": dispatch.lsh.hashes if dispatch.lsh else 0}}
            else str(setting)
        )
        row(name, sent / copies, err, bits, metrics.get("comm/compression_ratio"), spread)


def output_error(model: nn.Module, spec, setting: dict, batches: list) -> tuple[float, float]:
    """Error of the LSH expert outputs relative to them and to their spread (minus each expert's mean),
    on a few batches (training-mode forwards, no step)."""
    dispatch = type(spec.parallel.dispatch)(**setting)
    dispatch.lsh.error_every = 1
    place_experts(model, None, spec.parallel.model_copy(update={"dispatch": dispatch}))
    model.train()
    for inputs, targets in batches:
        model(inputs, targets)
    metrics = dispatch_metrics(model)
    return float(metrics.get("comm/lsh_rel_error", float("nan"))), float(
        metrics.get("comm/lsh_spread_error", float("nan"))
    )


if __name__ == "__main__":
    main()
