"""Grouped GEMM kernels alone vs one dense matmul of the same FLOPs, balanced and Zipf-skewed loads.

    python benchmarks/grouped_gemm.py            # M=8192 K=256 N=2048 E=8 and M=32768 K=512 N=4096 E=16
    python benchmarks/grouped_gemm.py --quick    # one small shape, 3 rounds
    python benchmarks/grouped_gemm.py --smoke    # a tiny shape, 1 round: checks the code path runs (seconds)
    python benchmarks/grouped_gemm.py --device cuda --bf16   # on a GPU: torch, triton, megablocks vs cuBLAS

For each shape and load we time, in interleaved rounds, the forward product (y = x_e @ w[e]) and the
forward plus both backward products (dX, dW) of every available backend, and the same for a single
dense [M, K] @ [K, N] matmul. Reported: median wall ms, min..max, median CPU ms (process time, which
other jobs on a shared machine disturb less than wall time) and the ratio to dense.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from shardyard.kernels import available_backends, grouped_mm  # noqa: E402

SHAPES = [(8192, 256, 2048, 8), (32768, 512, 4096, 16)]
QUICK_SHAPES = [(2048, 128, 512, 8)]
SMOKE_SHAPES = [(256, 32, 64, 4)]


def group_sizes(m: int, experts: int, skew: float) -> torch.Tensor:
    """Row counts per expert summing to m: equal, or proportional to 1 / rank^skew (Zipf)."""
    if skew == 0:
        p = torch.ones(experts)
    else:
        p = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** skew
    sizes = torch.floor(p / p.sum() * m).long()
    sizes[0] += m - sizes.sum()
    return sizes


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0


def run(
    shape: tuple[int, int, int, int], skew: float, rounds: int, backward: bool, dtype: torch.dtype, device: torch.device
) -> None:
    m, k, n, e = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = (torch.randn(e, k, n, generator=gen) / k**0.5).to(device, dtype)
    w_dense = w[0].clone()
    sizes = group_sizes(m, e, skew)
    offsets = sizes.cumsum(0).to(device, torch.int32)
    grad = torch.randn(m, n, generator=gen).to(device, dtype)

    def dense() -> None:
        if backward:
            xi, wi = x.detach().requires_grad_(), w_dense.detach().requires_grad_()
            (xi @ wi).backward(grad)
        else:
            x @ w_dense

    def grouped(backend: str) -> Callable[[], None]:
        def fn() -> None:
            if backward:
                xi, wi = x.detach().requires_grad_(), w.detach().requires_grad_()
                grouped_mm(xi, wi, offsets, backend).backward(grad)
            else:
                grouped_mm(x, w, offsets, backend)

        return fn

    # On CPU triton runs only in its interpreter (a correctness tool): timed on GPUs only.
    backends = [b for b in available_backends(x.device) if device.type == "cuda" or b != "triton"]
    cases = {"dense matmul": dense} | {f"grouped [{b}]": grouped(b) for b in backends}
    wall: dict[str, list[float]] = {c: [] for c in cases}
    cpu: dict[str, list[float]] = {c: [] for c in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in cases.items():
            w_s, c_s = timed(fn, device)
            wall[name].append(w_s)
            cpu[name].append(c_s)
    what = "fwd+bwd" if backward else "fwd"
    load = "balanced" if skew == 0 else f"Zipf s={skew} (max/mean {sizes.max().item() * e / m:.2f})"
    print(f"\n### M={m} K={k} N={n} E={e}, {load}, {what}, {str(dtype).removeprefix('torch.')}, {rounds} rounds\n")
    flops = 2 * m * k * n * (3 if backward else 1)
    print("| case | median wall ms | min..max | median CPU ms | TFLOP/s | wall x dense | CPU x dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    dw, dc = statistics.median(wall["dense matmul"]), statistics.median(cpu["dense matmul"])
    for name in cases:
        mw, mc = statistics.median(wall[name]), statistics.median(cpu[name])
        print(
            f"| {name} | {mw * 1e3:.1f} | {min(wall[name]) * 1e3:.1f}..{max(wall[name]) * 1e3:.1f} | "
            f"{mc * 1e3:.1f} | {flops / mw / 1e12:.3f} | {mw / dw:.2f} | {mc / dc:.2f} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small shape, 3 rounds")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape, 1 round: does the code path run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--skew", type=float, default=1.2, help="Zipf exponent of the skewed load")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SMOKE_SHAPES if args.smoke else QUICK_SHAPES if args.quick else SHAPES
    rounds = args.rounds or (1 if args.smoke else 3 if args.quick else 5)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {name}")
    for shape in shapes:
        for skew in (0.0, args.skew):
            for backward in (False, True):
                run(shape, skew, rounds, backward, dtype, device)


if __name__ == "__main__":
    main()
