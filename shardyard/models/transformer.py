"""Decoder-only transformer over bytes: RMSNorm, rotary positions, causal SDPA attention.

The feed-forward sub-layer is pluggable (`ffn_factory`), so the same block serves the dense model,
the MoE model and the byte models' stages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shardyard.models.moe.accounting import checkpointed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's rotary frequency scaling (HF rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        low_wavelen = self.original_context / self.low_freq_factor
        high_wavelen = self.original_context / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_context / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class AttnOptions:
    """Attention and norm options beyond width/heads (defaults: full multi-head attention as before)."""

    kv_heads: int | None = None  # None = heads
    head_dim: int | None = None  # None = width // heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    qk_norm: str = "none"  # none | head | full
    qkv_bias: bool = False


def rotary_tables(
    seq_len: int,
    head_dim: int,
    base: float = 10000.0,
    device: torch.device | None = None,
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [seq_len, head_dim // 2] for rotary position embedding."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; rotate pairs (first half, second half) of the head dimension."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    """Causal attention; `qkv` holds [q (heads x head_dim) | k (kv_heads x head_dim) | v (same)] rows.
    kv_heads < heads is grouped-query attention (query head i reads key/value head i // (heads / kv_heads))."""

    def __init__(self, width: int, heads: int, opts: AttnOptions | None = None) -> None:
        super().__init__()
        opts = opts or AttnOptions()
        if opts.head_dim is None:
            assert width % heads == 0, "heads must divide width"
        self.heads = heads
        self.head_dim = opts.head_dim or width // heads
        self.kv_heads = opts.kv_heads or heads
        assert heads % self.kv_heads == 0, "kv_heads must divide heads"
        self.qk_norm = opts.qk_norm
        q_out, kv_out = heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv = nn.Linear(width, q_out + 2 * kv_out, bias=opts.qkv_bias)
        self.proj = nn.Linear(q_out, width, bias=False)
        if opts.qk_norm != "none":
            full = opts.qk_norm == "full"
            self.q_norm = RMSNorm(q_out if full else self.head_dim, opts.norm_eps)
            self.k_norm = RMSNorm(kv_out if full else self.head_dim, opts.norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, width] -> q [B, heads, T, head_dim], k and v [B, kv_heads, T, head_dim] (before rotary)."""
        b, t, _ = x.shape
        qkv = self.qkv(x)
        if self.kv_heads == self.heads and self.qk_norm == "none":
            q, k, v = qkv.view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            return q, k, v
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = qkv.split((q_out, kv_out, kv_out), dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.view(b, t, self.kv_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        """Attention of q over k, v (kv heads shared by groups of query heads), projected: [B, T, width]."""
        extra = {"enable_gqa": True} if self.kv_heads != self.heads else {}
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **extra)
        b, _, t, _ = q.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.project(x)
        cos, sin = rope[0][:t], rope[1][:t]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.attend(q, k, v, None, True)


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GeluMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


FFNFactory = Callable[[int], nn.Module]  # layer index -> feed-forward module
DENSE_MLPS: dict[str, type[nn.Module]] = {"swiglu": SwiGLU, "gelu": GeluMLP}


def dense_mlp(kind: str, width: int, hidden: int) -> nn.Module:
    """A dense MLP by kind (swiglu | gelu): dense blocks' FFN and MoE layers' shared expert alike."""
    try:
        return DENSE_MLPS[kind](width, hidden)
    except KeyError:
        raise ValueError(f"unknown MLP kind {kind!r}; available: {', '.join(DENSE_MLPS)}") from None


class Block(nn.Module):
    def __init__(self, width: int, heads: int, ffn: nn.Module, opts: AttnOptions | None = None) -> None:
        super().__init__()
        eps = opts.norm_eps if opts is not None else 1e-6
        self.attn_norm = RMSNorm(width, eps)
        self.attn = CausalSelfAttention(width, heads, opts)
        self.ffn_norm = RMSNorm(width, eps)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.ffn(self.ffn_norm(x))


class TransformerStack(nn.Module):
    """`depth` blocks sharing one rotary table; maps [B, T, width] -> [B, T, width] (normed)."""

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        ffn_factory: FFNFactory,
        max_seq_len: int,
        opts: AttnOptions | None = None,
        materialize: Callable[[int], bool] | None = None,
    ) -> None:
        """`materialize(i)` False: block i is built on the meta device (a pipeline rank's model holds
        only its stages' blocks). Each block is built from its own random stream (`stream_seed`), so
        its initial values do not depend on which other blocks were built."""
        super().__init__()
        opts = opts or AttnOptions()
        block_seed = int(torch.randint(2**62, (1,), device="cpu"))  # one draw from the caller's RNG
        self.blocks = nn.ModuleList()
        for i in range(depth):
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(stream_seed(block_seed, i))
                where = torch.device("meta") if materialize is not None and not materialize(i) else nullcontext()
                with where:
                    self.blocks.append(Block(width, heads, ffn_factory(i), opts))
        self.norm = RMSNorm(width, opts.norm_eps)
        head_dim = opts.head_dim or width // heads
        cos, sin = rotary_tables(max_seq_len, head_dim, opts.rope_theta, scaling=opts.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpoint_every = 0  # activation checkpointing: 0 = off, n = every n-th block (1 = all)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks_output(x))

    def blocks_output(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output, before the final norm."""
        if x.shape[1] > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {x.shape[1]} exceeds max_seq_len {self.rope_cos.shape[0]}")
        return run_blocks(enumerate(self.blocks), x, (self.rope_cos, self.rope_sin), self.checkpoint_every)


def run_blocks(
    blocks: Iterable[tuple[int, nn.Module]], x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], every: int
) -> torch.Tensor:
    """Blocks in order, given with their index in the whole stack: every `every`-th (by that index)
    recomputed in backward (activation checkpointing; 0 = none, and none without grad)."""
    every = every if torch.is_grad_enabled() else 0
    for i, block in blocks:
        x = checkpointed(block, x, rope) if every and (i + 1) % every == 0 else block(x, rope)
    return x


class ByteTransformerLM(nn.Module):
    """Flat language model: embed token ids (256 byte values by default; a tokenizer's vocabulary
    otherwise), transformer stack, tied-free head."""

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        ffn_factory: FFNFactory,
        max_seq_len: int,
        vocab_size: int = 256,
        opts: AttnOptions | None = None,
        tie_embeddings: bool = False,
        materialize: Callable[[int], bool] | None = None,
    ) -> None:
        """`materialize`: which blocks are built on the current device (the others on meta; see
        TransformerStack): every built block's values are those of the whole model's."""
        super().__init__()
        # Drawn before any layer is built, so they depend only on the RNG state the caller seeded: the
        # common parts' and the FFNs' initial values come from them (see init_common_first).
        common_seed, ffn_seed = (int(v) for v in torch.randint(2**62, (2,), device="cpu"))
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(self.vocab_size, width)
        self.stack = TransformerStack(width, depth, heads, ffn_factory, max_seq_len, opts, materialize)
        self.head = nn.Linear(width, self.vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        init_common_first(self, depth, common_seed, ffn_seed)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: [B, T] int64 token ids. Returns logits [B, T, vocab] and mean CE (nats)."""
        return self.output(self.stack.blocks_output(self.embed(idx)), targets)

    def output(self, hidden: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The final norm, the head and the mean cross-entropy over the last block's output: one
        function, so that training.compile compiles them as one graph (runtime.parallel.apply_compile)."""
        logits = self.head(self.stack.norm(hidden))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, self.vocab_size), targets.reshape(-1))
        return logits, loss


RESIDUAL_PROJECTIONS = ("attn.proj.weight", "down.weight", "w_down")  # what writes into the residual stream


def scale_residual_projections(stack: nn.Module, depth: int) -> None:
    """GPT-2 style: re-initialise the projections that write into the residual stream with std
    0.02 / sqrt(2 * depth), so the stream's variance does not grow with the number of blocks."""
    for name, p in stack.named_parameters():
        if name.endswith(RESIDUAL_PROJECTIONS):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * depth))


def init_weights(module: nn.Module, generator: torch.Generator | None = None) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=generator)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=generator)


def stream_seed(seed: int, index: int) -> int:
    """The seed of stream `index` (a block) derived from `seed`."""
    return (seed + 1_000_003 * (index + 1)) % 2**63


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)  # CPU: the models are built there (or on meta)


def init_common_first(model: ByteTransformerLM, depth: int, common_seed: int, ffn_seed: int) -> None:
    """Initialise a flat model so that its common parts (embedding, attention, norms, head) do not
    depend on its feed-forward layers, and no block on another: the embedding and head draw from a
    generator seeded with `common_seed`, block i's common parts from stream i of it and its FFN
    (dense MLP, router, experts) from stream i of `ffn_seed` (`stream_seed`). A dense and an MoE model
    built at the same seed therefore share every common weight (a paired comparison), and a pipeline
    rank that builds only its stages' blocks holds the whole model's values for them."""
    blocks = list(model.stack.blocks)
    inside_blocks = {id(m) for block in blocks for m in block.modules()}
    top = _generator(common_seed)
    for module in model.modules():
        if id(module) not in inside_blocks:
            init_weights(module, top)
    std = 0.02 / math.sqrt(2 * depth)  # GPT-2: what writes into the residual stream starts smaller
    for i, block in enumerate(blocks):
        common, ffn = _generator(stream_seed(common_seed, i)), _generator(stream_seed(ffn_seed, i))
        inside_ffn = {id(m) for m in block.ffn.modules()}
        for module in block.modules():
            if id(module) not in inside_ffn:
                init_weights(module, common)
        block.ffn.apply(lambda m, g=ffn: init_weights(m, g))
        nn.init.normal_(block.attn.proj.weight, mean=0.0, std=std, generator=common)
        for name, p in block.ffn.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(p, mean=0.0, std=std, generator=ffn)
