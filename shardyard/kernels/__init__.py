"""Grouped GEMM kernels for expert computation (see grouped_gemm.py for the contract)."""

from shardyard.kernels.grouped_gemm import (
    BACKENDS,
    available_backends,
    backend_available,
    grouped_mm,
    grouped_mm_t,
    resolve_backend,
)
from shardyard.kernels.ops import BackendUnavailable, GroupedOps

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "GroupedOps",
    "available_backends",
    "backend_available",
    "grouped_mm",
    "grouped_mm_t",
    "resolve_backend",
]
