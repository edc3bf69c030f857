"""Grouped GEMM kernels for expert computation (see grouped_gemm.py for the contract)."""

from shardyard.kernels.grouped_gemm import (
    BACKENDS,
    BackendUnavailable,
    available_backends,
    backend_available,
    grouped_mm,
    grouped_mm_t,
    resolve_backend,
)

__all__ = ["BACKENDS", "BackendUnavailable", "available_backends", "backend_available", "grouped_mm",
           "grouped_mm_t", "resolve_backend"]
