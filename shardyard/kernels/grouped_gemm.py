"""Grouped GEMM: y[rows of expert e] = x[rows of expert e] @ w[e], one call for all experts.

Contract: `grouped_mm(x_sorted [M, K], w [E, K, N], offsets [E] int32 cumulative row ends)` -> y [M, N].
Rows of `x_sorted` are grouped by expert; expert e owns rows offsets[e-1]:offsets[e] (offsets[-1] == M).
`grouped_mm_t(x, w [E, N, K], offsets)` is the transposed-weight variant (y_e = x_e @ w[e]^T) that the
backward pass needs for dX. Backends are interchangeable and all agree with the `loop` reference,
forward and backward:

- `loop`: one matmul per expert, autograd through slicing. The reference; never fast on many experts.
- `torch`: torch.nn.functional.grouped_mm. On CPU every stride must be a multiple of 16 bytes; when
  K or N is not, operands are zero-padded, and if grouped_mm still refuses, the per-expert loop runs.
  Which path ran is counted in `TORCH_PATHS` (and logged once per kind). On CPU the forward products
  (`mm`: a_e @ b[e]) are one torch.mm per expert written into the output's rows instead: grouped_mm's
  CPU kernel took 1.5x as long for a [8192, 256] x [8, 256, 2048] product with the same bits (one
  thread, torch 2.13); its transposed-operand products (dX, dW) are as fast as the loop and stay.
- `triton`: our own Triton kernel (triton_grouped.py), one launch for all experts.
- `megablocks`: the grouped_gemm CUDA kernel that megablocks uses (GPU only, optional extra).
- `auto`: the fastest available one for the tensors' device and dtype (`resolve_backend`).

Every non-reference backend is three primitives (`GroupedOps`, in ops.py) wrapped by one autograd Function:
`mm(a, b, offs)` (a_e @ b[e], b possibly a transposed view) and `wgrad(a, g, offs, E)` (a_e^T @ g_e).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

from shardyard.kernels.ops import BackendUnavailable, GroupedOps

log = logging.getLogger(__name__)


class _GroupedMM(torch.autograd.Function):
    """y_e = x_e @ w[e] (or x_e @ w[e]^T when transpose_w); both backward products via the same ops."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, ops: GroupedOps, transpose_w: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(x, w, offsets)
        ctx.ops, ctx.transpose_w = ops, transpose_w
        return ops.mm(x, w.transpose(1, 2) if transpose_w else w, offsets)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, w, offsets = ctx.saved_tensors
        ops, transpose_w = ctx.ops, ctx.transpose_w
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # dX_e = dY_e @ (forward weight)^T
            grad_x = ops.mm(grad_y, w if transpose_w else w.transpose(1, 2), offsets)
        if ctx.needs_input_grad[1]:  # dW[e] = X_e^T dY_e  (or dY_e^T X_e for the transposed variant)
            grad_w = (
                ops.wgrad(grad_y, x, offsets, w.shape[0]) if transpose_w else ops.wgrad(x, grad_y, offsets, w.shape[0])
            )
        return grad_x, grad_w, None, None, None


# ---------------------------------------------------------------- loop (reference)


def loop_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-expert reference: one matmul per expert (autograd through slicing)."""
    ends = offsets.tolist()
    outs, start = [], 0
    for e, end in enumerate(ends):
        outs.append(x[start:end] @ w[e])
        start = end
    return torch.cat(outs, dim=0) if outs else x.new_zeros(0, w.shape[-1])


def _loop_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    out = a.new_empty(a.shape[0], b.shape[-1]) if out is None else out
    start = 0
    for e, end in enumerate(offsets.tolist()):
        torch.mm(a[start:end], b[e], out=out[start:end])
        start = end
    return out


def _loop_wgrad(a: torch.Tensor, g: torch.Tensor, offsets: torch.Tensor, num_experts: int) -> torch.Tensor:
    out = a.new_empty(num_experts, a.shape[1], g.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        torch.mm(a[start:end].t(), g[start:end], out=out[e])
        start = end
    return out


# ---------------------------------------------------------------- torch.nn.functional.grouped_mm

TORCH_PATHS: Counter[str] = Counter()  # "direct" | "padded" | "loop_fallback" -> calls


def _record(path: str, detail: str) -> None:
    if TORCH_PATHS[path] == 0 and path != "direct":
        log.warning("torch grouped_mm: %s (%s)", path, detail)
    TORCH_PATHS[path] += 1


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm's CPU rule: unit stride in one of the last two dims, every other stride 16-byte aligned."""
    size = t.element_size()
    strides = t.stride()
    if t.data_ptr() % 16:
        return False
    if strides[-1] == 1:
        others = strides[:-1]
    elif strides[-2] == 1:
        others = strides[:-2] + strides[-1:]
    else:
        return False
    return all(s > 0 and (s * size) % 16 == 0 for s in others)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _torch_gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, wgrad_experts: int | None) -> torch.Tensor:
    """F.grouped_mm with the CPU alignment rule handled: direct, else zero-padded K/N, else loop."""
    if wgrad_experts is None and a.shape[0] == 0:
        return a.new_zeros(0, b.shape[-1])
    if _aligned(a) and _aligned(b):
        try:
            out = F.grouped_mm(a, b, offs=offs)
            _record("direct", "")
            return out
        except RuntimeError as err:  # e.g. a build without this layout; fall through to padding
            detail = str(err)
    else:
        detail = f"unaligned strides a{tuple(a.shape)}:{a.stride()} b{tuple(b.shape)}:{b.stride()}"
    mult = max(1, 16 // a.element_size())
    try:
        if wgrad_experts is None:  # a [M, K], b [E, K, N] -> [M, N]
            k, n = a.shape[1], b.shape[2]
            kp, np_ = _round_up(k, mult), _round_up(n, mult)
            a_p = F.pad(a, (0, kp - k)).contiguous()
            b_p = F.pad(b, (0, np_ - n, 0, kp - k)).contiguous()
            out = F.grouped_mm(a_p, b_p, offs=offs)[:, :n]
        else:  # a [K, M] (transposed view), b [M, N] -> [E, K, N]
            k, n = a.shape[0], b.shape[1]
            kp, np_ = _round_up(k, mult), _round_up(n, mult)
            a_p = F.pad(a.t(), (0, kp - k)).contiguous().t()
            b_p = F.pad(b, (0, np_ - n)).contiguous()
            out = F.grouped_mm(a_p, b_p, offs=offs)[:, :k, :n]
        _record("padded", detail)
        return out
    except RuntimeError as err:
        _record("loop_fallback", f"{detail}; padded call failed: {err}")
        if wgrad_experts is None:
            return _loop_mm(a, b, offs)
        return _loop_wgrad(a.t(), b, offs, wgrad_experts)


def _torch_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if a.device.type == "cpu":
        return _loop_mm(a, b, offs)
    return _torch_gmm(a, b, offs, None)


def _torch_mm_into(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if a.device.type == "cpu":
        return _loop_mm(a, b, offs, out)
    return out.copy_(_torch_gmm(a, b, offs, None))


def _torch_wgrad(a: torch.Tensor, g: torch.Tensor, offs: torch.Tensor, num_experts: int) -> torch.Tensor:
    if a.shape[0] == 0:
        return a.new_zeros(num_experts, a.shape[1], g.shape[1])
    return _torch_gmm(a.t(), g, offs, num_experts)


TORCH_OPS = GroupedOps("torch", _torch_mm, _torch_wgrad, _torch_mm_into)


# ---------------------------------------------------------------- megablocks / grouped_gemm (GPU)


def _megablocks_ops() -> GroupedOps:
    try:
        from grouped_gemm import backend as gg_backend  # type: ignore[import-not-found]
    except ImportError:
        try:
            from megablocks.grouped_gemm_util import backend as gg_backend  # type: ignore[import-not-found]
        except ImportError as err:
            raise BackendUnavailable(
                "backend 'megablocks' needs the grouped_gemm CUDA kernel (pip install grouped_gemm or "
                f"megablocks, GPU only): {err}"
            ) from None
    if gg_backend is None:
        raise BackendUnavailable("backend 'megablocks': grouped_gemm is installed without its CUDA ops")

    def sizes(offs: torch.Tensor) -> torch.Tensor:
        ends = offs.to("cpu", torch.int64)
        return torch.diff(ends, prepend=ends.new_zeros(1))

    def mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        trans_b = not b.is_contiguous() and b.transpose(1, 2).is_contiguous()
        b_arg = b.transpose(1, 2) if trans_b else b.contiguous()
        return gg_backend.gmm(a.contiguous(), b_arg, sizes(offs), trans_a=False, trans_b=trans_b)

    def wgrad(a: torch.Tensor, g: torch.Tensor, offs: torch.Tensor, num_experts: int) -> torch.Tensor:
        return gg_backend.gmm(a.contiguous(), g.contiguous(), sizes(offs), trans_a=True, trans_b=False)

    return GroupedOps("megablocks", mm, wgrad)


def _triton_ops() -> GroupedOps:
    from shardyard.kernels.triton_grouped import triton_ops  # imports triton lazily, raises if missing

    return triton_ops()


# ---------------------------------------------------------------- registry and entry points

_OPS_FACTORIES: dict[str, Callable[[], GroupedOps]] = {
    "torch": lambda: TORCH_OPS,
    "triton": _triton_ops,
    "megablocks": _megablocks_ops,
}
BACKENDS = ("loop", *_OPS_FACTORIES)
_ops_cache: dict[str, GroupedOps] = {}


def get_ops(backend: str) -> GroupedOps:
    """The primitives of a backend; raises BackendUnavailable with the reason when it cannot run here."""
    if backend not in _ops_cache:
        try:
            factory = _OPS_FACTORIES[backend]
        except KeyError:
            raise ValueError(f"unknown grouped GEMM backend {backend!r}; available: {list(BACKENDS)}") from None
        _ops_cache[backend] = factory()
    return _ops_cache[backend]


def device_refusal(backend: str, device: torch.device | str) -> str | None:
    """Why `backend` cannot run on `device` whatever is installed, or None when the device is fine."""
    if torch.device(device).type != "cpu":
        return None
    if backend == "megablocks":
        return "backend 'megablocks' runs on CUDA tensors only; use 'torch' or 'auto' on CPU"
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton; "
            "correctness only, slow); use 'torch' or 'auto' on CPU"
        )
    return None


def backend_available(backend: str, device: torch.device | str = "cpu") -> bool:
    if backend == "loop":
        return True
    if device_refusal(backend, device) is not None:
        return False
    try:
        get_ops(backend)
    except BackendUnavailable:
        return False
    return True


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    return [b for b in BACKENDS if backend_available(b, device)]


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """`auto` -> CPU: torch; CUDA: torch grouped_mm where it has a kernel (bf16, sm90+), else triton."""
    if backend != "auto":
        return backend
    if x.device.type != "cuda":
        return "torch"
    major, _ = torch.cuda.get_device_capability(x.device)
    if x.dtype == torch.bfloat16 and major >= 9:
        return "torch"
    return "triton" if backend_available("triton", x.device) else "loop"


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y[offsets[e-1]:offsets[e]] = x[offsets[e-1]:offsets[e]] @ w[e]; x [M, K], w [E, K, N] -> [M, N]."""
    return _run_backend(x, w, offsets, backend, transpose_w=False)


def grouped_mm_t(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Transposed-weight variant: y_e = x_e @ w[e]^T; x [M, K], w [E, N, K] -> [M, N]."""
    return _run_backend(x, w, offsets, backend, transpose_w=True)


def check_backend_device(backend: str, x: torch.Tensor) -> None:
    """Raise BackendUnavailable when `backend` cannot run on x's device (see `device_refusal`)."""
    reason = device_refusal(backend, x.device)
    if reason is not None:
        raise BackendUnavailable(reason)


def _run_backend(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str, transpose_w: bool
) -> torch.Tensor:
    if x.dim() != 2 or w.dim() != 3 or offsets.dim() != 1 or offsets.numel() != w.shape[0]:
        raise ValueError(
            f"grouped_mm wants x [M, K], w [E, K, N], offsets [E]; got {tuple(x.shape)}, "
            f"{tuple(w.shape)}, {tuple(offsets.shape)}"
        )
    backend = resolve_backend(backend, x)
    check_backend_device(backend, x)
    if backend == "loop":
        return loop_grouped_mm(x, w.transpose(1, 2) if transpose_w else w, offsets)
    ops = get_ops(backend)
    return _GroupedMM.apply(x, w, offsets.to(torch.int32), ops, transpose_w)
