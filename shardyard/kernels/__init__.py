"""Grouped GEMM kernels for expert computation (see grouped_gemm.py for the contract)."""

from shardyard.kernels.grouped_gemm import BACKENDS, grouped_mm

__all__ = ["BACKENDS", "grouped_mm"]
