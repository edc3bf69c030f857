"""INT8 weights with no fp32 copy, for Q-GaLore: layers that hold INT8 codes + group scales as their
only weight and dequantise on the fly.

`prepare_model_for_optimizer(model, spec.optim)` converts, in place, every weight Q-GaLore projects
(the projected group of `galore_param_groups`) whose owner is an `nn.Linear` (its `weight`) or a
`GroupedExperts` stack (`w_up` / `w_down`, [E, K, N]) into:

- buffers `<name>_codes` (int8, the weight's shape) and `<name>_scales` (fp32, one per
  `weight_group_size` consecutive elements of the flattened weight): the weight itself;
- a parameter `<name>` of the weight's shape and dtype that owns no memory (a zero scalar expanded
  to the shape: 4 bytes of storage). It is the autograd leaf that receives the gradient with
  respect to the dequantised weight, so clipping, gradient reduction, post-accumulate-grad hooks and
  the optimizer see an ordinary parameter with an ordinary `.grad`. It carries `INT8_WEIGHT_ATTR`
  = (module, name), through which QGaLoreAdamW finds and updates the codes in place.

Other modules (low-rank factors, anything custom) keep their fp32 weights and Q-GaLore's older
path (INT8 master in the optimizer state, fp32 working copy in the module).

Forward and backward of `Int8Linear` dequantise block-wise over output rows (about
BLOCK_ELEMENTS weights at a time), so a large layer's full fp32 matrix never exists. The expert
stack is the measured exception: grouped GEMM consumes the whole [E, K, N] stack, so
`Int8GroupedExperts` dequantises it once per forward and once more in backward (a saved-tensor hook
replaces the consumer's saved fp32 stack by a note to dequantise again), i.e. one layer's fp32
expert stack exists transiently while that layer runs, never across the model or between forward
and backward.

Use: call after expert parallelism has sharded the experts (runtime.parallel.place_experts slices the
parameters it finds) and before the optimizer, DDP or a LayerwiseStepper is built. Checkpoints of a
prepared model hold the codes and scales (`<name>_codes`, `<name>_scales`), not `<name>`; load them
into a prepared model. The handles are not to be broadcast or written to (DDP's start-up broadcast
writes parameters: reduce gradients with `sync_gradients` or a LayerwiseStepper instead). Moving the
module (`.to(device)`) moves the codes and re-creates the handles on the new device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardyard.models.moe.experts import EXPERT_SHARD_ATTR, GroupedExperts, run_experts
from shardyard.optim.galore import galore_param_groups
from shardyard.optim.quant import dequantize_int8, quantize_int8
from shardyard.platform.schema import OptimSpec

INT8_WEIGHT_ATTR = "_shardyard_int8_weight"
BLOCK_ELEMENTS = 1 << 20  # weights dequantised at once by Int8Linear (4 MiB of fp32)


def _handle(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `shape` backed by one element: the gradient's leaf, no weight memory."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


class _Int8Weights:
    """Shared behaviour of the INT8 modules (a mixin over nn.Linear / GroupedExperts)."""

    int8_names: tuple[str, ...]
    group_size: int

    def _quantize_into(self, name: str, group_size: int) -> None:
        module: nn.Module = self  # type: ignore[assignment]
        weight = module._parameters[name]
        assert weight is not None
        codes, scales = quantize_int8(weight.detach(), group_size, stochastic=False)
        module.register_buffer(f"{name}_codes", codes)
        module.register_buffer(f"{name}_scales", scales)
        handle = nn.Parameter(_handle(weight.shape, weight.dtype, weight.device), requires_grad=weight.requires_grad)
        if hasattr(weight, EXPERT_SHARD_ATTR):  # an expert-parallel shard stays one
            setattr(handle, EXPERT_SHARD_ATTR, getattr(weight, EXPERT_SHARD_ATTR))
        setattr(handle, INT8_WEIGHT_ATTR, (module, name))
        module._parameters[name] = handle

    def int8_codes(self, name: str) -> torch.Tensor:
        return getattr(self, f"{name}_codes")

    def int8_scales(self, name: str) -> torch.Tensor:
        return getattr(self, f"{name}_scales")

    def dequantized(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.int8_codes(name), self.int8_scales(name), self.group_size, dtype)

    # state dicts hold codes and scales; the handles are not state
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        for name in self.int8_names:
            destination.pop(prefix + name, None)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        params = self._parameters  # type: ignore[attr-defined]
        handles = {name: params.pop(name) for name in self.int8_names}
        try:
            super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]
        finally:
            params.update(handles)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any) -> nn.Module:
        params = self._parameters  # type: ignore[attr-defined]
        handles = {name: params.pop(name) for name in self.int8_names}
        try:
            super()._apply(fn, *args)  # type: ignore[misc]
        finally:
            params.update(handles)
        for name, h in handles.items():
            h.data = _handle(h.shape, h.dtype, self.int8_codes(name).device)
        return self  # type: ignore[return-value]


# ------------------------------------------------------------------------------------- linear
def _row_blocks(out_features: int, in_features: int, group_size: int) -> int:
    """Rows per dequantised block: about BLOCK_ELEMENTS weights, starting on a group boundary."""
    align = group_size // math.gcd(in_features, group_size)
    rows = max(1, BLOCK_ELEMENTS // max(1, in_features))
    rows = max(align, rows // align * align)
    return min(out_features, rows)


def _dequant_rows(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int, lo: int, hi: int, dtype: torch.dtype
) -> torch.Tensor:
    first = lo * codes.shape[1] // group_size  # lo is group-aligned (see _row_blocks)
    last = math.ceil(hi * codes.shape[1] / group_size)
    return dequantize_int8(codes[lo:hi], scales[first:last], group_size, dtype)


class _Int8LinearFn(torch.autograd.Function):
    """y = x W^T with W dequantised block by block; d/dW (the full fp32 gradient) goes to the handle."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        handle: torch.Tensor,
        codes: torch.Tensor,
        scales: torch.Tensor,
        group_size: int,
        block_rows: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, codes, scales)
        ctx.group_size, ctx.block_rows = group_size, block_rows
        out = codes.shape[0]
        pieces = [
            F.linear(x, _dequant_rows(codes, scales, group_size, lo, min(lo + block_rows, out), x.dtype))
            for lo in range(0, out, block_rows)
        ]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor):
        x, codes, scales = ctx.saved_tensors
        gs, block_rows = ctx.group_size, ctx.block_rows
        out, inp = codes.shape
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            for lo in range(0, out, block_rows):
                hi = min(lo + block_rows, out)
                part = grad_y[..., lo:hi].matmul(_dequant_rows(codes, scales, gs, lo, hi, grad_y.dtype))
                grad_x = part if grad_x is None else grad_x.add_(part)
        if ctx.needs_input_grad[1]:
            grad_w = grad_y.reshape(-1, out).t().mm(x.reshape(-1, inp)).float()
        return grad_x, grad_w, None, None, None, None


class Int8Linear(_Int8Weights, nn.Linear):
    """nn.Linear whose weight is INT8 codes + group scales (see the module docstring)."""

    int8_names = ("weight",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _row_blocks(self.out_features, self.in_features, self.group_size)
        y = _Int8LinearFn.apply(x, self.weight, self.weight_codes, self.weight_scales, self.group_size, rows)
        return y if self.bias is None else y + self.bias


# ------------------------------------------------------------------------------- expert stacks
class _DequantFn(torch.autograd.Function):
    """The dequantised stack as a function of the handle: its gradient flows to the handle."""

    @staticmethod
    def forward(
        ctx: Any, handle: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int
    ) -> torch.Tensor:
        return dequantize_int8(codes, scales, group_size, handle.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return grad, None, None, None


class Int8GroupedExperts(_Int8Weights, GroupedExperts):
    """GroupedExperts whose projected stacks are INT8 codes + group scales (see the module docstring)."""

    int8_names: tuple[str, ...] = ()

    def _weight(self, name: str) -> torch.Tensor:
        handle = getattr(self, name)
        if name not in self.int8_names:
            return handle
        return _DequantFn.apply(handle, self.int8_codes(name), self.int8_scales(name), self.group_size)

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        w_up, w_down = self._weight("w_up"), self._weight("w_down")
        dequantized = {name: w for name, w in (("w_up", w_up), ("w_down", w_down)) if name in self.int8_names}

        def pack(t: torch.Tensor) -> Any:
            for name, w in dequantized.items():
                if t.untyped_storage()._cdata == w.untyped_storage()._cdata:  # data_ptr is 0 on meta
                    return ("int8", name, t.dtype, t.size(), t.stride(), t.storage_offset())
            return t

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, tuple) and packed and packed[0] == "int8":
                _, name, dtype, size, stride, offset = packed
                return self.dequantized(name, dtype).as_strided(size, stride, offset)
            return packed

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return self._mlp(x_sorted, offsets, w_up, w_down)

    def _mlp(
        self, x_sorted: torch.Tensor, offsets: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
    ) -> torch.Tensor:
        """GroupedExperts.forward's arithmetic on the given (dequantised) stacks."""
        return run_experts(self, x_sorted, offsets, w_up, w_down)


# ------------------------------------------------------------------------------------ convert
def _convert(module: nn.Module, cls: type, names: tuple[str, ...], group_size: int) -> None:
    module.__class__ = cls
    module.int8_names = names  # type: ignore[attr-defined]
    module.group_size = group_size  # type: ignore[attr-defined]
    for name in names:
        module._quantize_into(name, group_size)  # type: ignore[attr-defined]


def prepare_model_for_optimizer(model: nn.Module, spec: OptimSpec) -> nn.Module:
    """Give the optimizer the model it expects; in place, returns the model.

    For `q_galore_adamw`: every projected weight owned by an nn.Linear or a GroupedExperts stack
    becomes INT8 codes + scales with no fp32 copy (round to nearest, the same first quantisation
    QGaLoreAdamW applies to a plain weight). Any other optimizer kind: the model is returned as is.
    Call after expert parallelism has sharded the experts, before building the optimizer.
    """
    if spec.kind != "q_galore_adamw":
        return model
    g = spec.galore
    assert g is not None and g.quant is not None  # filled by OptimSpec's validator
    groups = galore_param_groups(model, g.targets, g.rank, spec.weight_decay, g.experts)
    projected = {id(p) for grp in groups if grp.get("galore") for p in grp["params"]}
    for module in list(model.modules()):
        if isinstance(module, _Int8Weights):
            continue
        own = [name for name, p in module.named_parameters(recurse=False) if id(p) in projected]
        if isinstance(module, nn.Linear) and "weight" in own:
            _convert(module, Int8Linear, ("weight",), g.quant.weight_group_size)
        elif isinstance(module, GroupedExperts) and own:
            names = tuple(n for n in ("w_up", "w_down") if n in own)
            _convert(module, Int8GroupedExperts, names, g.quant.weight_group_size)
    return model


def int8_weight_of(p: torch.Tensor) -> tuple[nn.Module, str] | None:
    """(module, name) when p is the handle of an INT8 weight, else None."""
    return getattr(p, INT8_WEIGHT_ATTR, None)
