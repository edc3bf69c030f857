"""How MoE layers account for their work over an optimizer step, without side channels.

- The auxiliary loss (load balancing + router z-loss) enters the backward pass explicitly through
  `AttachAuxLoss`: the layer's output carries it, and its gradient is `aux_weight`, the layer's
  share of the step's loss (1 / grad_accum per micro-batch; times a chunk's share of its stage when
  a stage is checkpointed in chunks). No loss is stored on the module for someone to pick up.
- Per-expert token counts, the aux loss value, dropped assignments and routed assignments are
  accumulated in buffers over the optimizer step; the trainer reads and resets them after the step
  (`MoELayer.take_step_stats`). A forward recomputed by activation checkpointing is not counted
  twice: `checkpointed` runs the recompute inside `moe_scope(recomputing=True)` (torch's public
  `context_fn` hook of non-reentrant checkpointing), and puts back the buffers of every
  `StepStatistics` module inside (the MoE layers) as they were before it. The layer's forward itself
  does not branch on the flag, so a compiled block runs the same graph in the forward and in the
  recompute (torch.utils.checkpoint matches saved tensors by position: two graphs would not do).
  Eager code that is not compiled (the transport dispatchers' ledgers) reads `recomputing()`.

- The load-balancing loss counts its expert fractions per micro-batch by default. For the global scope
  (`balance_scope: global`) the trainer first runs the step's micro-batches without gradients inside
  `moe_scope(balance="count")`, where each layer only adds its assignment counts to its
  `balance_counts` buffer; the counts are summed over the data-parallel ranks
  (`models/moe/layer.py: share_balance_counts`); then the real forwards run inside
  `moe_scope(balance="global")`, where the formula takes f_e from those step-wide counts.

The scope is thread-local: torch runs a recompute in the thread executing the backward, and the
context manager torch enters there is ours.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_state = threading.local()


def aux_weight() -> float:
    """Share of the optimizer step's loss that the current forward carries (1.0 outside a scope)."""
    return getattr(_state, "aux_weight", 1.0)


def recomputing() -> bool:
    """True while activation checkpointing recomputes a forward during backward."""
    return getattr(_state, "recomputing", False)


BALANCE_MODES = ("local", "count", "global")


def balance_mode() -> str:
    """Where the balance loss takes its expert fractions: local (this micro-batch; the default) | count
    (a counting pre-pass: only add the assignments to `balance_counts`) | global (from `balance_counts`)."""
    return getattr(_state, "balance", "local")


@contextlib.contextmanager
def moe_scope(
    *, weight: float | None = None, recompute: bool | None = None, balance: str | None = None
) -> Iterator[None]:
    """Set the aux-loss weight (multiplied into the enclosing one), the recompute flag and/or the
    balance mode."""
    if balance is not None and balance not in BALANCE_MODES:
        raise ValueError(f"unknown balance mode {balance!r}; one of {BALANCE_MODES}")
    saved = (aux_weight(), recomputing(), balance_mode())
    if weight is not None:
        _state.aux_weight = saved[0] * weight
    if recompute is not None:
        _state.recomputing = recompute
    if balance is not None:
        _state.balance = balance
    try:
        yield
    finally:
        _state.aux_weight, _state.recomputing, _state.balance = saved


class StepStatistics:
    """A module whose buffers named in `step_stat_names` accumulate statistics over the optimizer step
    in its forward (the MoE layer); `checkpointed` restores them after a recompute."""

    step_stat_names: tuple[str, ...] = ()


def checkpointed(fn: Callable[..., Any], *args: Any, weight: float = 1.0) -> Any:
    """`torch.utils.checkpoint` (non-reentrant) of fn(*args) whose MoE layers carry `weight` of the
    enclosing aux-loss weight, in the forward and in the recompute, and count their tokens once."""
    effective = aux_weight() * weight  # fixed now: the recompute runs later, outside this scope
    balance = balance_mode()
    modules = fn.modules() if isinstance(fn, nn.Module) else ()
    counted = [m for m in modules if isinstance(m, StepStatistics)]

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return _absolute_scope(effective, False, balance), _recompute_scope(effective, balance, counted)

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


@contextlib.contextmanager
def _recompute_scope(weight: float, balance: str, counted: list[nn.Module]) -> Iterator[None]:
    """The recompute: flagged, and the step statistics it adds taken back out."""
    before = [(m, n, getattr(m, n).clone()) for m in counted for n in m.step_stat_names]
    try:
        with _absolute_scope(weight, True, balance):
            yield
    finally:  # also when torch stops the recompute early (it raises once it has what backward needs)
        with torch.no_grad():  # by name: a forward may have rebound the attribute to a new tensor
            for m, n, value in before:
                getattr(m, n).copy_(value)


@contextlib.contextmanager
def _absolute_scope(weight: float, recompute: bool, balance: str) -> Iterator[None]:
    saved = (aux_weight(), recomputing(), balance_mode())
    _state.aux_weight, _state.recomputing, _state.balance = weight, recompute, balance
    try:
        yield
    finally:
        _state.aux_weight, _state.recomputing, _state.balance = saved


class AttachAuxLoss(torch.autograd.Function):
    """Identity on `out`; in backward, `aux` receives gradient `weight` (as if weight * aux had been
    added to the loss). The Megatron-LM / DeepSeek pattern for auxiliary losses of inner layers."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:  # type: ignore[override]
        ctx.weight = weight
        ctx.aux_meta = (aux.dtype, aux.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        dtype, device = ctx.aux_meta
        return grad_out, torch.full((), ctx.weight, dtype=dtype, device=device), None
