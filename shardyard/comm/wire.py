"""The payload stage of expert dispatch: what dtype rows have while a `Route` moves them.

A `Codec` encodes rows before the transport and decodes them after it; `send(x, route, codec)` is the
differentiable move: the forward runs `route` on `codec.encode(x)`, the backward runs
`route.reverse()` on the gradient encoded with `codec.grad_codec` (the straight-through estimator:
the rounding of the payload counts as the identity for gradients).

- `fp32`: rows travel as they are (bf16 under bf16 autocast); exactly `alltoall.run_route`.
- `bf16`: rows and gradients are cast to bfloat16 for the trip and back to their dtype on arrival.
- `fp8`: rows travel as float8 e4m3 with one fp32 scale per row (amax / 448), packed into one uint8
  tensor [M, width + 4] so one collective carries both; gradients travel in bf16 unless
  `grad_payload` says otherwise (`grad_payload: fp8` scales each gradient row the same way).

The wire stage sits on any transport (comm/alltoall.py), the one-rank `LocalAllToAll` included.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from shardyard.comm.alltoall import Route

FP8_MAX = 448.0  # largest finite float8 e4m3fn


class Codec:
    name = "fp32"

    def __init__(self, grad: Codec | None = None) -> None:
        self._grad = grad  # the gradients' wire format; None = this codec's default

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(dtype)

    def row_bytes(self, width: int, element_size: int) -> int:
        return width * element_size

    @property
    def grad_codec(self) -> Codec:
        return self._grad if self._grad is not None else self.default_grad()

    def default_grad(self) -> Codec:
        return self


class BF16Codec(Codec):
    name = "bf16"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16)

    def row_bytes(self, width: int, element_size: int) -> int:
        return width * 2


class FP8Codec(Codec):
    name = "fp8"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / FP8_MAX
        q = (x / scale).to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.cat([q, scale.view(torch.uint8)], dim=1)

    def decode(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        width = t.shape[1] - 4
        q = t[:, :width].contiguous().view(torch.float8_e4m3fn).float()
        scale = t[:, width:].contiguous().view(torch.float32)
        return (q * scale).to(dtype)

    def row_bytes(self, width: int, element_size: int) -> int:
        return width + 4

    def default_grad(self) -> Codec:
        return BF16Codec()


CODECS: dict[str, Callable[[], Codec]] = {"fp32": Codec, "bf16": BF16Codec, "fp8": FP8Codec}


def build_codec(name: str, grad: str = "auto") -> Codec:
    """The payload codec `name`; `grad` the gradients' ("auto": the same, but bf16 for fp8)."""
    for n in (name, grad):
        if n != "auto" and n not in CODECS:
            raise ValueError(f"unknown payload {n!r}; available: {', '.join(CODECS)}")
    return CODECS[name](None if grad == "auto" else CODECS[grad]())


class Timer:
    """Accumulates host wall time (ms) of transport calls into counters[slot] (a float64 tensor)."""

    def __init__(self, counters: torch.Tensor | None, slot: int) -> None:
        self.counters, self.slot = counters, slot

    def run(self, route: Route, t: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = route.run(t)
        if self.counters is not None:
            self.counters[self.slot] += (time.perf_counter() - start) * 1e3
        return out


class _SendFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, route: Route, codec: Codec, timer: Timer) -> torch.Tensor:  # type: ignore[override]
        ctx.route, ctx.codec, ctx.timer = route, codec, timer
        out = codec.decode(timer.run(route, codec.encode(x)), x.dtype)
        return out.clone() if out is x else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        codec = ctx.codec.grad_codec
        moved = ctx.timer.run(ctx.route.reverse(), codec.encode(grad.contiguous()))
        return codec.decode(moved, grad.dtype), None, None, None


def send(x: torch.Tensor, route: Route, codec: Codec, timer: Timer | None = None) -> torch.Tensor:
    """Move rows along `route` in `codec`'s wire format (differentiable; see the module docstring)."""
    return _SendFn.apply(x, route, codec, timer or Timer(None, 0))


def _pack(rows: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One uint8 tensor [M, row bytes + meta bytes] holding both (bit-exact); and the rows' byte width."""
    row_bytes = rows.contiguous().view(torch.uint8)
    return torch.cat([row_bytes, meta.contiguous().view(torch.uint8)], dim=1), row_bytes.shape[1]


def _unpack(
    t: torch.Tensor, split: int, row_dtype: torch.dtype, meta_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return t[:, :split].contiguous().view(row_dtype), t[:, split:].contiguous().view(meta_dtype)


class _SendWithMetaFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        meta: torch.Tensor,
        route: Route,
        codec: Codec,  # type: ignore[override]
        timer: Timer,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.route, ctx.codec, ctx.timer = route, codec, timer
        ctx.meta_shape, ctx.meta_dtype = meta.shape, meta.dtype
        encoded = codec.encode(x)
        packed, split = _pack(encoded, meta)
        rows, meta_out = _unpack(timer.run(route, packed), split, encoded.dtype, meta.dtype)
        return codec.decode(rows, x.dtype), meta_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor, grad_meta: torch.Tensor):  # type: ignore[override]
        codec = ctx.codec.grad_codec
        encoded = codec.encode(grad.contiguous())
        if grad_meta is None:
            grad_meta = encoded.new_zeros((encoded.shape[0], ctx.meta_shape[1]), dtype=ctx.meta_dtype)
        packed, split = _pack(encoded, grad_meta.to(ctx.meta_dtype))
        rows, meta_back = _unpack(ctx.timer.run(ctx.route.reverse(), packed), split, encoded.dtype, ctx.meta_dtype)
        return codec.decode(rows, grad.dtype), meta_back, None, None, None


def send_with_meta(
    x: torch.Tensor, meta: torch.Tensor, route: Route, codec: Codec, timer: Timer | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`send` for rows with a per-row table that travels exactly (fp32): both in one collective each way.
    The table's gradient comes back with the rows' (the router weights of deduplicated dispatch)."""
    return _SendWithMetaFn.apply(x, meta, route, codec, timer or Timer(None, 0))
