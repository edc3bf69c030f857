"""Our Triton grouped GEMM: one launch covers every expert.

Forward / dX (`mm`): the grid is (row tiles, column tiles). There are at most cdiv(M, BLOCK_M) + E row
tiles, because each expert's rows start a fresh tile; program p walks the offsets (E scalar steps) to
find which expert owns row tile p and where that tile starts. Spare programs find no expert and write
nothing. The weight is read through strides, so w[e]^T (for dX = dY @ W^T) is the same kernel.

dW (`wgrad`): the grid is (E, K tiles, N tiles); program (e, i, j) accumulates X_e^T dY_e over the
rows of expert e in BLOCK_M steps, so empty experts write zeros.

Accumulation is fp32 (bf16 tiles are upcast before tl.dot in the CPU interpreter, whose bf16 dot
is wrong in triton 3.9); outputs are stored in the input dtype (fp32 or bf16). fp32 inputs use IEEE
products unless torch.backends.cuda.matmul.allow_tf32 is set. On CPU the kernels run only under
TRITON_INTERPRET=1 (correctness tests); speed needs a GPU.

Triton is imported when `triton_ops()` is first called, never at package import.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from shardyard.kernels.ops import BackendUnavailable, GroupedOps


@functools.cache
def _kernels() -> tuple[Any, Any, Any]:
    try:
        import triton
        import triton.language as tl
    except ImportError as err:
        raise BackendUnavailable(f"backend 'triton' needs the triton package (pip install triton): {err}") from None

    @triton.jit
    def gmm_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        offs_ptr,
        num_experts,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_we,
        stride_wk,
        stride_wn,
        stride_ym,
        stride_yn,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        # Map row tile pid_m -> (expert, first row, end row) by walking the cumulative offsets.
        expert = tl.full((), -1, tl.int32)
        row_start = tl.full((), 0, tl.int32)
        row_end = tl.full((), 0, tl.int32)
        tiles_before = tl.full((), 0, tl.int32)
        prev_end = tl.full((), 0, tl.int32)
        for e in range(num_experts):
            end = tl.load(offs_ptr + e)
            n_tiles = tl.cdiv(end - prev_end, BLOCK_M)
            hit = (pid_m >= tiles_before) & (pid_m < tiles_before + n_tiles)
            expert = tl.where(hit, e, expert)
            row_start = tl.where(hit, prev_end + (pid_m - tiles_before) * BLOCK_M, row_start)
            row_end = tl.where(hit, end, row_end)
            tiles_before += n_tiles
            prev_end = end
        if expert >= 0:
            rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
            cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            ks = tl.arange(0, BLOCK_K)
            w_base = w_ptr + expert.to(tl.int64) * stride_we
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + ks
                a = tl.load(
                    x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rows[:, None] < row_end) & (kk[None, :] < K),
                    other=0.0,
                )
                b = tl.load(
                    w_base + kk[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=(kk[:, None] < K) & (cols[None, :] < N),
                    other=0.0,
                )
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            tl.store(
                y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
                acc.to(y_ptr.dtype.element_ty),
                mask=(rows[:, None] < row_end) & (cols[None, :] < N),
            )

    @triton.jit
    def wgrad_kernel(
        x_ptr,
        g_ptr,
        dw_ptr,
        offs_ptr,
        K,
        N,
        stride_xm,
        stride_xk,
        stride_gm,
        stride_gn,
        stride_we,
        stride_wk,
        stride_wn,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        e = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_n = tl.program_id(2)
        start = tl.load(offs_ptr + tl.maximum(e - 1, 0))
        start = tl.where(e > 0, start, 0)
        end = tl.load(offs_ptr + e)
        ks = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        ns = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            xt = tl.load(
                x_ptr + rows[None, :] * stride_xm + ks[:, None] * stride_xk,
                mask=(rows[None, :] < end) & (ks[:, None] < K),
                other=0.0,
            )
            g = tl.load(
                g_ptr + rows[:, None] * stride_gm + ns[None, :] * stride_gn,
                mask=(rows[:, None] < end) & (ns[None, :] < N),
                other=0.0,
            )
            if UPCAST:
                xt, g = xt.to(tl.float32), g.to(tl.float32)
            acc = tl.dot(xt, g, acc, input_precision=PRECISION)
        tl.store(
            dw_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + ns[None, :] * stride_wn,
            acc.to(dw_ptr.dtype.element_ty),
            mask=(ks[:, None] < K) & (ns[None, :] < N),
        )

    return triton, gmm_kernel, wgrad_kernel


def _blocks(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): small tiles for the CPU interpreter, larger on GPUs."""
    if t.device.type == "cpu":
        return 16, 16, 16, 1
    return 64, 128, 32, 4


def _upcast(t: torch.Tensor) -> bool:
    """The CPU interpreter (triton 3.9) gets tl.dot on bf16 wrong; feed it exact fp32 copies instead.

    A bf16 x bf16 product is exact in fp32, so the result equals a GPU bf16 dot with fp32 accumulation.
    """
    return t.device.type == "cpu" and t.dtype != torch.float32


def _precision(t: torch.Tensor) -> str:
    if t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def triton_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y_e = x_e @ w[e] for x [M, K], w [E, K, N] (any strides: a transposed view gives x_e @ w^T)."""
    triton, gmm_kernel, _ = _kernels()
    m, k = x.shape
    num_experts, _, n = w.shape
    y = x.new_empty(m, n)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    bm, bn, bk, warps = _blocks(x)
    grid = (triton.cdiv(m, bm) + num_experts, triton.cdiv(n, bn))
    gmm_kernel[grid](
        x,
        w,
        y,
        offsets,
        num_experts,
        n,
        k,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        y.stride(0),
        y.stride(1),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        PRECISION=_precision(x),
        UPCAST=_upcast(x),
        num_warps=warps,
    )
    return y


def triton_wgrad(x: torch.Tensor, g: torch.Tensor, offsets: torch.Tensor, num_experts: int) -> torch.Tensor:
    """dw[e] = x_e^T @ g_e for x [M, K], g [M, N] -> [E, K, N] (zeros for empty experts)."""
    triton, _, wgrad_kernel = _kernels()
    k, n = x.shape[1], g.shape[1]
    dw = x.new_empty(num_experts, k, n)
    if num_experts == 0 or k == 0 or n == 0:
        return dw
    bm, bn, bk, warps = _blocks(x)
    grid = (num_experts, triton.cdiv(k, bk), triton.cdiv(n, bn))
    wgrad_kernel[grid](
        x,
        g,
        dw,
        offsets,
        k,
        n,
        x.stride(0),
        x.stride(1),
        g.stride(0),
        g.stride(1),
        dw.stride(0),
        dw.stride(1),
        dw.stride(2),
        BLOCK_M=bm,
        BLOCK_K=bk,
        BLOCK_N=bn,
        PRECISION=_precision(x),
        UPCAST=_upcast(x),
        num_warps=warps,
    )
    return dw


def triton_ops() -> GroupedOps:
    _kernels()  # fail now, with the reason, if triton is missing
    return GroupedOps("triton", triton_mm, triton_wgrad)
