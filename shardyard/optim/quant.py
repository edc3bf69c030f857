"""Group-wise integer quantisation for Q-GaLore: INT4 projections (packed two per byte) and INT8
weights with stochastic rounding.

All functions are symmetric (zero-point free): a group of `group_size` consecutive elements of the
flattened tensor shares one fp32 scale = absmax / qmax. The last group may be short.
"""

from __future__ import annotations

import torch

INT4_MAX = 7
INT8_MAX = 127


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


def quantize_int8(x: torch.Tensor, group_size: int, stochastic: bool,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (int8 codes with x's shape, fp32 scales [groups])."""
    groups, n = _grouped(x, group_size)
    scales = (groups.abs().amax(dim=1) / INT8_MAX).clamp_min(1e-12)
    scaled = groups / scales[:, None]
    q = stochastic_round(scaled, generator) if stochastic else torch.round(scaled)
    q = q.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(-1)[:n].view(x.shape), scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
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


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, shape: torch.Size | tuple[int, ...],
                    group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    low = (packed & 0x0F).to(torch.int16) - 8
    high = (packed >> 4).to(torch.int16) - 8
    q = torch.stack((low, high), dim=1).reshape(-1).float()
    numel = 1
    for d in shape:
        numel *= d
    values = (q.view(-1, group_size) * scales[:, None]).reshape(-1)[:numel]
    return values.view(shape).to(dtype)
