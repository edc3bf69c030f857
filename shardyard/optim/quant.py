"""Group-wise integer quantisation for Q-GaLore and 8-bit moments: INT4 projections (packed two per
byte), INT8 weights with stochastic rounding, and 8-bit Adam moments on a dynamic (log-spaced) map.

INT4 / INT8 are symmetric (zero-point free): a group of `group_size` consecutive elements of the
flattened tensor shares one fp32 scale = absmax / qmax. The last group may be short (zero-padded).
INT8 quantisation is defined once here (`quantize_int8_with_scales`); the optimizer and the INT8
layers both call it.

8-bit moments (`quantize_moment` / `dequantize_moment`) follow 8-bit Adam (Dettmers et al. 2022):
block-wise absmax normalisation to [-1, 1] (dynamic per-block scales), then the nearest of 256
values of a dynamic map whose values are spaced log-uniformly over 7 decades (signed for the
first moment, unsigned for the second), so small entries of a block keep their relative precision
instead of rounding to zero as a linear INT8 grid would.
"""

from __future__ import annotations

import functools

import torch

INT4_MAX = 7
INT8_MAX = 127
MOMENT_BLOCK = 256  # elements per dynamic scale of an 8-bit moment


def _grouped(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """Flatten x and zero-pad it to whole groups: ([groups, group_size], original numel)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % group_size
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    return flat.view(-1, group_size), n


def group_scales(x: torch.Tensor, group_size: int, qmax: int) -> torch.Tensor:
    groups, _ = _grouped(x, group_size)
    return (groups.abs().amax(dim=1) / qmax).clamp_min(1e-12)


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round to an integer-valued float tensor with P(up) = frac(x): E[result] = x exactly."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.floor(x + noise)


def quantize_int8_with_scales(
    x: torch.Tensor, scales: torch.Tensor, group_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x -> int8 codes with x's shape on the given group scales; stochastic rounding when a
    generator is given, round to nearest otherwise. Values beyond +-127 steps are clamped."""
    groups, n = _grouped(x, group_size)
    scaled = groups / scales[:, None]
    q = stochastic_round(scaled, generator) if generator is not None else torch.round(scaled)
    return q.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8).reshape(-1)[:n].view(x.shape)


def quantize_int8(
    x: torch.Tensor, group_size: int, stochastic: bool, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (int8 codes with x's shape, fp32 scales [groups]), scales from each group's absmax."""
    scales = group_scales(x, group_size, INT8_MAX)
    if stochastic and generator is None:
        generator = torch.Generator(device=x.device)
        generator.seed()
    return quantize_int8_with_scales(x, scales, group_size, generator if stochastic else None), scales


def dequantize_int8(
    q: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    groups, n = _grouped(q, group_size)
    return (groups * scales[:, None]).reshape(-1)[:n].view(q.shape).to(dtype)


def quantize_int4(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (uint8 [ceil(numel/2)] with two signed 4-bit codes per byte, fp32 scales [groups]).

    Round to nearest: the projection is recomputed from scratch at each refresh, so its rounding
    error does not accumulate the way a weight update's would.
    """
    if group_size % 2:
        raise ValueError(f"INT4 group size must be even, got {group_size}")
    groups, n = _grouped(x, group_size)
    scales = (groups.abs().amax(dim=1) / INT4_MAX).clamp_min(1e-12)
    q = torch.round(groups / scales[:, None]).clamp_(-INT4_MAX, INT4_MAX).to(torch.int16) + 8  # 1..15
    q = q.reshape(-1).to(torch.uint8)
    return (q[0::2] | (q[1::2] << 4)).contiguous(), scales


def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    low = (packed & 0x0F).to(torch.int16) - 8
    high = (packed >> 4).to(torch.int16) - 8
    q = torch.stack((low, high), dim=1).reshape(-1).float()
    numel = 1
    for d in shape:
        numel *= d
    values = (q.view(-1, group_size) * scales[:, None]).reshape(-1)[:numel]
    return values.view(shape).to(dtype)


# ------------------------------------------------------------------------------- 8-bit moments
@functools.lru_cache(maxsize=2)
def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted values of 8-bit Adam's dynamic map in [-1, 1] (signed) or [0, 1] (unsigned).

    Decade i (i = 0..6) covers [10^(i-6) * 0.1, 10^(i-6)] with 2^i (signed, per sign) or 2^(i+1)
    (unsigned) linearly spaced midpoints; plus 0 and 1. More values near 1 of each decade's scale,
    i.e. roughly constant relative precision over seven orders of magnitude.
    """
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        edges = torch.linspace(0.1, 1.0, items, dtype=torch.float64)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += means
        if signed:
            values += [-m for m in means]
    assert len(values) == 256, len(values)
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.lru_cache(maxsize=2)
def _nearest_code_lut(signed: bool) -> torch.Tensor:
    """For every float32 bit pattern's top 17 bits (sign, exponent, 8 mantissa bits: buckets of
    0.4% relative width), the map index nearest to the bucket's lower edge. The map's relative
    spacing (>= 1.4%) exceeds a bucket's width, so the nearest code of any value in the bucket is
    this index or one of its neighbours (`quantize_moment` checks both)."""
    edges = (torch.arange(1 << 17, dtype=torch.int64) << 15).to(torch.int32).view(torch.float32)
    edges = torch.nan_to_num(edges, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)
    table = dynamic_map(signed)
    hi = torch.searchsorted(table, edges).clamp_(1, 255)
    lo = hi - 1
    return torch.where((edges - table[lo]) <= (table[hi] - edges), lo, hi).to(torch.int64)


def quantize_moment(x: torch.Tensor, signed: bool, block: int = MOMENT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (uint8 indices into dynamic_map(signed), with x's shape; fp32 absmax per block).

    Nearest map value of each block-normalised element, found with a bit-pattern lookup plus a
    neighbour check (a binary search over the 256 values costs ten times more on CPU)."""
    table = dynamic_map(signed).to(x.device)
    groups, n = _grouped(x, block)
    absmax = groups.abs().amax(dim=1).clamp_min(1e-30)
    normed = (groups / absmax[:, None]).reshape(-1)
    lut = _nearest_code_lut(signed).to(x.device)
    bucket = (normed.view(torch.int32).to(torch.int64) >> 15) & ((1 << 17) - 1)
    idx = lut[bucket]
    best, best_err = idx, (table[idx] - normed).abs()
    for step in (-1, 1):
        cand = (idx + step).clamp_(0, 255)
        err = (table[cand] - normed).abs()
        better = err < best_err
        best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    return best.to(torch.uint8)[:n].view(x.shape), absmax


def dequantize_moment(idx: torch.Tensor, absmax: torch.Tensor, signed: bool, block: int = MOMENT_BLOCK) -> torch.Tensor:
    table = dynamic_map(signed).to(idx.device)
    values = table[idx.reshape(-1).long()]
    n = values.numel()
    pad = (-n) % block
    if pad:
        values = torch.cat((values, values.new_zeros(pad)))
    return (values.view(-1, block) * absmax[:, None]).reshape(-1)[:n].view(idx.shape)
