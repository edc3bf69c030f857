"""Every grouped GEMM backend agrees with the per-expert loop, forward and backward."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from shardyard.kernels import (
    BackendUnavailable,
    available_backends,
    backend_available,
    grouped_mm,
    grouped_mm_t,
    resolve_backend,
)
from shardyard.kernels import grouped_gemm as gg

HAS_TRITON = backend_available("triton", "cpu")
FAST_BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])

# (group sizes, K, N): uneven, empty experts, one expert, 1-token groups, unaligned K/N (torch pads).
CASES = [
    ([5, 0, 17, 1, 9], 32, 16),
    ([0, 0, 13, 0], 16, 32),
    ([23], 16, 16),
    ([1, 1, 1, 1, 1, 1], 16, 24),
    ([7, 0, 12], 20, 12),
    ([0, 3, 0], 9, 5),
]


def _offsets(sizes: list[int]) -> torch.Tensor:
    return torch.tensor(sizes).cumsum(0).to(torch.int32)


def _run(fn, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str, seed: int = 1):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = fn(x, w, offsets, backend)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    y.backward(g)
    return y.detach().float(), x.grad.float(), w.grad.float()


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 6e-2, "rtol": 2e-2}


def _check(backend: str, sizes: list[int], k: int, n: int, dtype: torch.dtype, transpose: bool) -> None:
    gen = torch.Generator().manual_seed(sum(sizes) + k + n)
    m, e = sum(sizes), len(sizes)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w_shape = (e, n, k) if transpose else (e, k, n)
    w = torch.randn(w_shape, generator=gen).to(dtype)
    fn = grouped_mm_t if transpose else grouped_mm
    offsets = _offsets(sizes)
    expected = _run(fn, x, w, offsets, "loop")
    got = _run(fn, x, w, offsets, backend)
    for name, a, b in zip(("y", "dx", "dw"), got, expected):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, **_tol(dtype), msg=f"{backend} {name} differs from loop")


@pytest.mark.parametrize("sizes,k,n", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_matches_loop(sizes, k, n, dtype):
    _check("torch", sizes, k, n, dtype, transpose=False)
    _check("torch", sizes, k, n, dtype, transpose=True)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("sizes,k,n", CASES[:5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_loop(sizes, k, n, dtype):
    _check("triton", sizes, k, n, dtype, transpose=False)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_transposed_weight_and_multi_tile():
    # M spans several 16-row tiles per expert and K several 16-wide steps.
    _check("triton", [37, 0, 20], 40, 24, torch.float32, transpose=True)


def test_empty_expert_gets_zero_weight_grad():
    x = torch.randn(6, 16)
    w = torch.randn(3, 16, 8, requires_grad=True)
    for backend in FAST_BACKENDS:
        w.grad = None
        grouped_mm(x, w, _offsets([6, 0, 0]), backend).sum().backward()
        assert torch.count_nonzero(w.grad[1:]) == 0, backend
        assert torch.count_nonzero(w.grad[0]) > 0, backend


def test_noncontiguous_output_grad():
    """y.sum() gives an expanded (stride-0) grad; torch's own backward trips on it on CPU."""
    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(2, 16, 16, requires_grad=True)
    grouped_mm(x, w, _offsets([4, 6]), "torch").sum().backward()
    xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    gg.loop_grouped_mm(xs, ws, _offsets([4, 6])).sum().backward()
    torch.testing.assert_close(x.grad, xs.grad)
    torch.testing.assert_close(w.grad, ws.grad)


def test_torch_records_padding_for_unaligned_shapes():
    """On CPU the forward product is one torch.mm per expert (any strides); the weight gradient goes
    through grouped_mm, zero-padded when a stride is not a multiple of 16 bytes."""
    before = gg.TORCH_PATHS["padded"]
    w = torch.randn(2, 9, 5, requires_grad=True)
    grouped_mm(torch.randn(5, 9), w, _offsets([2, 3]), "torch").square().sum().backward()
    assert gg.TORCH_PATHS["padded"] > before
    direct = gg.TORCH_PATHS["direct"]
    w = torch.randn(2, 16, 8, requires_grad=True)
    grouped_mm(torch.randn(5, 16), w, _offsets([2, 3]), "torch").square().sum().backward()
    assert gg.TORCH_PATHS["direct"] > direct


def test_cpu_forward_equals_grouped_mm_bitwise():
    """The per-expert forward on CPU gives grouped_mm's bits (uneven groups, an empty one)."""
    import torch.nn.functional as F

    x, w = torch.randn(40, 32), torch.randn(3, 32, 48)
    offs = _offsets([12, 0, 28])
    assert torch.equal(gg.TORCH_OPS.mm(x, w, offs), F.grouped_mm(x, w, offs=offs))
    out = torch.full((40, 48), float("nan"))
    gg.TORCH_OPS.mm_into(x, w, offs, out)
    assert torch.equal(out, F.grouped_mm(x, w, offs=offs))


def test_auto_and_errors():
    x = torch.randn(4, 16)
    assert resolve_backend("auto", x) == "torch"
    assert "loop" in available_backends("cpu") and "torch" in available_backends("cpu")
    assert not backend_available("megablocks", "cpu")
    with pytest.raises(ValueError, match="unknown grouped GEMM backend"):
        grouped_mm(x, torch.randn(1, 16, 16), _offsets([4]), "nope")
    with pytest.raises(ValueError, match="grouped_mm wants"):
        grouped_mm(x, torch.randn(2, 16, 16), _offsets([4]), "torch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_megablocks_unavailable_message():
    try:
        gg.get_ops("megablocks")
    except BackendUnavailable as err:
        assert "megablocks" in str(err)
    else:  # grouped_gemm importable: it must still refuse CPU tensors through backend_available
        assert not backend_available("megablocks", "cpu")


def test_triton_missing_is_a_clear_error(monkeypatch):
    from shardyard.kernels import triton_grouped

    triton_grouped._kernels.cache_clear()
    gg._ops_cache.pop("triton", None)
    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` sees when it is absent
    try:
        with pytest.raises(BackendUnavailable, match="needs the triton package"):
            grouped_mm(torch.randn(4, 16), torch.randn(1, 16, 16), _offsets([4]), "triton")
        assert not backend_available("triton", "cpu")
    finally:
        triton_grouped._kernels.cache_clear()
        gg._ops_cache.pop("triton", None)


def test_package_import_does_not_import_triton():
    code = "import sys, shardyard.kernels, shardyard.models.moe; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_device_checks(monkeypatch):
    x, w, offs = torch.randn(4, 16), torch.randn(1, 16, 16), _offsets([4])
    with pytest.raises(BackendUnavailable, match="CUDA"):
        grouped_mm(x, w, offs, "megablocks")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        grouped_mm(x, w, offs, "triton")
