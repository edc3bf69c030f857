"""Backend primitives every grouped-GEMM backend provides, and the error a backend raises when it cannot run.

A leaf module: grouped_gemm.py (the dispatcher and autograd Function) and each backend module
(triton_grouped.py, ...) import these, so a backend never imports the dispatcher that loads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class BackendUnavailable(RuntimeError):
    """The named backend cannot run here (missing package or wrong device)."""


@dataclass(frozen=True)
class GroupedOps:
    """`mm(a, b, offs)`: a_e @ b[e] (b possibly a transposed view); `wgrad(a, g, offs, E)`: a_e^T @ g_e."""

    name: str
    mm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    wgrad: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
