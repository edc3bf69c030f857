"""MoE layer forward+backward: our dropless layer (each grouped GEMM backend) vs DeepSpeed-MoE, a naive
per-expert loop, and the dense reference (one dense FFN over the same routed tokens = the same FLOPs).

    python benchmarks/moe_layer.py            # both sizes, balanced and Zipf-skewed routing
    python benchmarks/moe_layer.py --quick    # small size, few rounds
    python benchmarks/moe_layer.py --smoke    # a tiny size, 1 round: checks every variant runs (seconds)

Rounds are interleaved (every variant once per round) so machine noise hits all variants alike;
we report the median wall time and its spread (min..max), the median CPU (process) time, which
other jobs on a shared machine disturb less than wall time, tokens/s, ratios to dense and to
DeepSpeed-MoE, the realised load skew and the peak memory allocated during one fwd+bwd
(torch.distributed._tools.mem_tracker, CPU allocations made inside the step).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from shardyard.kernels import available_backends  # noqa: E402
from shardyard.models.moe import MoELayer  # noqa: E402
from shardyard.models.moe.experts import swiglu  # noqa: E402
from shardyard.models.transformer import SwiGLU  # noqa: E402


@dataclass(frozen=True)
class Size:
    width: int
    hidden: int
    experts: int
    top_k: int
    tokens: int

    def __str__(self) -> str:
        return f"d={self.width} ffn={self.hidden} E={self.experts} top-{self.top_k} T={self.tokens}"


SIZES = [Size(256, 1024, 8, 2, 4096), Size(512, 2048, 16, 2, 16384)]
QUICK_SIZES = [Size(128, 512, 8, 2, 1024)]
SMOKE_SIZES = [Size(32, 64, 4, 2, 128)]


def zipf_logit_bias(experts: int, exponent: float) -> torch.Tensor:
    p = 1.0 / torch.arange(1, experts + 1, dtype=torch.float32) ** exponent
    return torch.log(p / p.sum())


def make_gate_weight(size: Size, skew: float, gen: torch.Generator) -> torch.Tensor:
    """Gate [E, d]; feature 0 of every token is the constant 1, its gate column is the Zipf log-prior."""
    w = torch.randn(size.experts, size.width, generator=gen) * (1.0 / math.sqrt(size.width))
    w[:, 0] = zipf_logit_bias(size.experts, skew) if skew > 0 else 0.0
    return w


def make_tokens(size: Size, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(size.tokens, size.width, generator=gen)
    x[:, 0] = 1.0
    return x


# ---------------------------------------------------------------- variants


class NaiveLoopMoE(nn.Module):
    """The textbook per-expert loop: for each expert, find its tokens, run its MLP, add the result back."""

    def __init__(self, size: Size) -> None:
        super().__init__()
        self.top_k = size.top_k
        self.gate = nn.Linear(size.width, size.experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(size.width, size.hidden) for _ in range(size.experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x).float(), dim=-1)
        top_p, top_e = probs.topk(self.top_k, dim=-1)
        top_p = (top_p / top_p.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(top_e == e)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * top_p[token, slot, None])
        return out


class DeepSpeedMoE(nn.Module):
    def __init__(self, size: Size, drop_tokens: bool) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(
            size.width,
            SwiGLU(size.width, size.hidden),
            num_experts=size.experts,
            ep_size=1,
            k=size.top_k,
            capacity_factor=1.25,
            eval_capacity_factor=1.25,
            min_capacity=4,
            drop_tokens=drop_tokens,
            use_rts=False,
        )
        self.gate = self.moe.deepspeed_moe.gate.wg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.aux, self.counts = self.moe(x)
        return out


class Dense(nn.Module):
    """One dense SwiGLU over the routed tokens (each token repeated top_k times): the same FLOPs."""

    def __init__(self, size: Size) -> None:
        super().__init__()
        self.ffn = SwiGLU(size.width, size.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)


class DenseFusedAct(Dense):
    """The dense reference with our layer's fused, cache-chunked SwiGLU activation (like for like)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn.down(swiglu(self.ffn.gate_up(x)))


class GemmFloor(nn.Module):
    """The limit: only the expert MLP's matrix products, per expert over its realised row count (forward
    x @ W_up and a @ W_down, and their four backward products), no routing, activation, permutation or
    combine. Any dropless layer runs at least these FLOPs with the same GEMM library; on a CPU no
    variant can beat this row by more than what it saves outside the products."""

    def __init__(self, size: Size, rows_per_expert: list[int]) -> None:
        super().__init__()
        self.rows = rows_per_expert
        self.w_up = nn.Parameter(torch.randn(size.experts, size.width, 2 * size.hidden) * 0.02)
        self.w_down = nn.Parameter(torch.randn(size.experts, size.hidden, size.width) * 0.02)
        self.hidden = size.hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for e, part in enumerate(x.split(self.rows)):
            h = part @ self.w_up[e]
            outs.append(h[:, : self.hidden] @ self.w_down[e])
        return torch.cat(outs)


def init_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("deepspeed not installed: skipping DeepSpeed-MoE (pip install deepspeed==0.19.8)")
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # a free port: several benchmark runs may coexist
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
        dist.init_process_group("gloo", rank=0, world_size=1)
    return True


def build_variants(
    size: Size, skew: float, with_ds: bool, backends: list[str], seed: int, load: torch.Tensor | None = None
) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    gate_w = make_gate_weight(size, skew, gen)
    x = make_tokens(size, gen)
    variants: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    dense_in = x.repeat_interleave(size.top_k, dim=0)
    variants["dense"] = (Dense(size), dense_in)
    variants["dense fused-act"] = (DenseFusedAct(size), dense_in)
    for b in backends:
        layer = MoELayer(size.width, size.hidden, size.experts, size.top_k, backend=b)
        variants[f"ours[{b}]"] = (layer, x)
    variants["ours[torch] cf=1.25"] = (
        MoELayer(size.width, size.hidden, size.experts, size.top_k, capacity_factor=1.25, backend="torch"),
        x,
    )
    variants["naive loop"] = (NaiveLoopMoE(size), x)
    if load is not None:  # the realised rows per expert of this routing
        rows = [int(n) for n in load.tolist()]
        variants["GEMM floor"] = (GemmFloor(size, rows), torch.randn(sum(rows), size.width, generator=gen))
    if with_ds:
        variants["deepspeed cf=1.25"] = (DeepSpeedMoE(size, drop_tokens=True), x)
        variants["deepspeed no-drop"] = (DeepSpeedMoE(size, drop_tokens=False), x)
    for _name, (module, _) in variants.items():
        gate = getattr(module, "gate", None) or getattr(getattr(module, "router", None), "gate", None)
        if gate is not None:
            with torch.no_grad():
                gate.weight.copy_(gate_w)
    return variants


def step(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    inp = x.detach().requires_grad_()
    out = module(inp)
    aux = getattr(module, "aux_loss", None)
    loss = out.square().mean() if aux is None else out.square().mean() + aux
    loss.backward()


def peak_memory(module: nn.Module, x: torch.Tensor) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        step(module, x)
    snap = tracker.get_tracker_snapshot("peak")
    return int(snap.get(torch.device("cpu"), {}).get("Total", 0))


def realised_load(size: Size, skew: float, seed: int) -> torch.Tensor:
    variants = build_variants(size, skew, False, ["torch"], seed)
    layer, x = variants["ours[torch]"]
    with torch.no_grad():
        layer(x)
    return layer.take_step_stats()["tokens_per_expert"]


DS_MAX_DISPATCH_ELEMENTS = 700_000_000  # DeepSpeed builds dense [T, E, capacity] tensors; cap their size
# (measured: 1.9 GiB peak at T=16384, E=16, C=2560 = 0.67 G elements; raise with --ds-max-gelements)


def bench(size: Size, skew: float, rounds: int, with_ds: bool, backends: list[str], seed: int = 0) -> None:
    load = realised_load(size, skew, seed)
    skipped: list[str] = []
    if with_ds:  # drop_tokens=False makes capacity = the busiest expert's load
        for name, cap in (
            ("deepspeed cf=1.25", math.ceil(1.25 * size.tokens * size.top_k / size.experts)),
            ("deepspeed no-drop", int(load.max())),
        ):
            cap = max(cap, math.ceil(1.25 * size.tokens * size.top_k / size.experts))
            elements = size.tokens * size.experts * cap
            if elements > DS_MAX_DISPATCH_ELEMENTS:
                skipped.append(
                    f"{name}: skipped, its dense [T, E, C] dispatch/combine tensors would hold "
                    f"{elements / 1e9:.1f} G elements ({elements * 4 / 2**30:.0f} GiB each in fp32)"
                )
    variants = build_variants(size, skew, with_ds, backends, seed, load)
    for line in skipped:
        variants.pop(line.split(":")[0], None)
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for module, x in variants.values():  # warm-up (DeepSpeed's first call builds state)
        step(module, x)
    for _ in range(rounds):
        for name, (module, x) in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step(module, x)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    mem = {name: peak_memory(module, x) for name, (module, x) in variants.items()}
    label = "balanced" if skew == 0 else f"Zipf s={skew}"
    print(
        f"\n### {size}, {label} routing  (expert load max/mean = "
        f"{load.max().item() / load.float().mean().item():.2f}; {rounds} interleaved rounds, fwd+bwd, fp32)\n"
    )
    med = {name: statistics.median(t) for name, t in wall.items()}
    cmed = {name: statistics.median(t) for name, t in cpu.items()}
    ds = "deepspeed cf=1.25"
    print(
        "| variant | median wall ms | wall min..max | median CPU ms | tokens/s (wall) | wall x dense "
        "| CPU x dense | CPU x DS cf=1.25 | peak MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        ratio_ds = f"{cmed[name] / cmed[ds]:.2f}" if ds in cmed else "n/a"
        print(
            f"| {name} | {med[name] * 1e3:.0f} | {min(wall[name]) * 1e3:.0f}..{max(wall[name]) * 1e3:.0f} | "
            f"{cmed[name] * 1e3:.0f} | {size.tokens / med[name]:,.0f} | {med[name] / med['dense']:.2f} | "
            f"{cmed[name] / cmed['dense']:.2f} | {ratio_ds} | {mem[name] / 2**20:.0f} |"
        )
    for line in skipped:
        print(f"\n- {line}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small size, 3 rounds")
    parser.add_argument("--smoke", action="store_true", help="a tiny size, 1 round: does every variant run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--skew", type=float, default=1.2, help="Zipf exponent of the skewed routing")
    parser.add_argument("--sizes", type=str, default=None, help="comma-separated indices into SIZES")
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only-skewed", action="store_true", help="run the skewed routing only")
    parser.add_argument(
        "--ds-max-gelements",
        type=float,
        default=None,
        help="run DeepSpeed only when its [T, E, C] tensors hold at most this many G elements",
    )
    args = parser.parse_args(argv)
    global DS_MAX_DISPATCH_ELEMENTS
    if args.ds_max_gelements is not None:
        DS_MAX_DISPATCH_ELEMENTS = int(args.ds_max_gelements * 1e9)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = SMOKE_SIZES if args.smoke else QUICK_SIZES if args.quick else SIZES
    if args.sizes:
        sizes = [SIZES[int(i)] for i in args.sizes.split(",")]
    rounds = args.rounds or (1 if args.smoke else 3 if args.quick else 5)
    with_ds = not args.no_deepspeed and init_deepspeed()
    backends = [b for b in available_backends("cpu") if b != "triton"]  # interpreter: correctness only
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, backends {backends}, "
        f"deepspeed {'yes' if with_ds else 'no'}"
    )
    for size in sizes:
        for skew in (args.skew,) if args.only_skewed else (0.0, args.skew):
            bench(size, skew, rounds, with_ds, backends)


if __name__ == "__main__":
    main()
