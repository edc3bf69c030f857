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
    """`mm(a, b, offs)`: a_e @ b[e] (b possibly a transposed view); `wgrad(a, g, offs, E)`: a_e^T @ g_e;
    `mm_into(a, b, offs, out)`: mm written into the rows of `out` (a contiguous [M, N] tensor or row
    slice), for callers that fill one buffer block by block; a backend without its own copies mm's result."""

    name: str
    mm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    wgrad: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
    into: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def mm_into(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.into is not None:
            return self.into(a, b, offs, out)
        return out.copy_(self.mm(a, b, offs))
