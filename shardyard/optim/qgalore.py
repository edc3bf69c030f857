"""Q-GaLore AdamW: GaLore with INT4 projections, INT8 weights and a similarity-adaptive update gap.

What differs from GaLoreAdamW, for projected parameters only (dense ones step as in AdamW):

- Projection bases are stored as signed INT4 codes packed two per byte with one fp32 scale per
  `proj_group_size` elements (`basis_q`, `basis_scales`, `basis_shape`) and dequantised when used.
- Weights are INT8 (one fp32 scale per `weight_group_size` elements). Each step dequantises them
  chunk by chunk, applies decay and the update in fp32, and re-quantises with stochastic rounding
  (P(round up) = fractional part, so E[new weight] = exact fp32 result: updates far below one
  quantisation step still move the weight on average; round-to-nearest would drop them). Scales
  only grow (when an update overflows a group); they are never re-derived from scratch, so
  sub-step updates do not re-round a whole group. Where the weight lives:
  * in an INT8 layer (`int8_weights.prepare_model_for_optimizer`, the normal path): the layer's
    `<name>_codes` / `<name>_scales` buffers are the only copy and are updated in place;
  * otherwise (a projected weight whose module has no INT8 variant): an INT8 master in the
    optimizer state (`qweight`, `qscales`) plus the module's fp32 tensor, overwritten with the
    dequantised master after each step so forward and backward see exactly the INT8 values.
  Both paths do the same arithmetic (the first is tested bit-identical to the second in
  round-to-nearest mode).
- Update gap per parameter: at every refresh the overlap ||P_old^T P_new||_F^2 / r of the old
  and new bases is measured; after `sim_streak` consecutive refreshes with overlap >=
  `sim_threshold`, the parameter's gap is multiplied by `gap_growth` (capped at `max_update_gap`).
  Stable subspaces are thus re-computed less often (Q-GaLore's lazy layer-wise exploration).

Stochastic rounding draws from a generator seeded by (seed, parameter index, step): identical on
every data-parallel rank and on a resumed run, with no RNG state to save.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from shardyard.optim.galore import GaLoreAdamW
from shardyard.optim.int8_weights import int8_weight_of
from shardyard.optim.projection import choose_side, sketch_generator, subspace_overlap
from shardyard.optim.quant import (
    INT8_MAX,
    dequantize_int4,
    dequantize_int8,
    group_scales,
    quantize_int4,
    quantize_int8_with_scales,
)

CHUNK_GROUPS = 8192  # INT8 groups re-quantised at once (1 Mi weights at the default group size)


class QGaLoreAdamW(GaLoreAdamW):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        proj_group_size: int = 64,
        weight_group_size: int = 128,
        stochastic_rounding: bool = True,
        sim_threshold: float = 0.4,
        sim_streak: int = 5,
        gap_growth: float = 2.0,
        max_update_gap: int = 2000,
        **galore: Any,
    ) -> None:
        if proj_group_size % 2:
            raise ValueError(f"proj_group_size must be even (two INT4 codes per byte), got {proj_group_size}")
        self.proj_group_size = proj_group_size
        self.weight_group_size = weight_group_size
        self.stochastic_rounding = stochastic_rounding
        self.sim_threshold = sim_threshold
        self.sim_streak = sim_streak
        self.gap_growth = gap_growth
        self.max_update_gap = max_update_gap
        super().__init__(params, lr, betas, eps, weight_decay, **galore)

    # ------------------------------------------------------------------------ INT4 projections
    def _refresh(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        old = self._basis(state) if "basis_q" in state else None
        side = choose_side(p.shape)
        basis = self._new_basis(p, grad, group, side, state["step"])
        q, scales = quantize_int4(basis, self.proj_group_size)
        state["basis_q"], state["basis_scales"] = q, scales
        state["basis_shape"] = list(basis.shape)
        state["side"] = side
        state["refreshes"] = state.get("refreshes", 0) + 1
        gap = state.get("gap", group["update_gap"])
        if old is not None:
            similar = subspace_overlap(old, self._basis(state)) >= self.sim_threshold
            state["streak"] = state.get("streak", 0) + 1 if similar else 0
            if state["streak"] >= self.sim_streak:
                gap = min(self.max_update_gap, int(gap * self.gap_growth))
                state["streak"] = 0
        state["gap"] = gap
        state["next_refresh"] = state["step"] + gap

    def _basis(self, state: dict) -> torch.Tensor:
        return dequantize_int4(
            state["basis_q"], state["basis_scales"], tuple(state["basis_shape"]), self.proj_group_size
        )

    # ---------------------------------------------------------------------------- INT8 weights
    def _apply(self, p: torch.Tensor, update: torch.Tensor, group: dict, state: dict, projected: bool) -> None:
        if not projected:
            super()._apply(p, update, group, state, projected)
            return
        gs = self.weight_group_size
        owner = int8_weight_of(p)
        if owner is not None:  # an INT8 layer: its codes are the weight
            module, name = owner
            if module.group_size != gs:
                raise ValueError(f"INT8 layer group size {module.group_size} != optimizer's weight_group_size {gs}")
            self._step_codes(p, update, group, state, module.int8_codes(name), module.int8_scales(name))
            return
        if "qweight" not in state:  # first step: the fp32 init is rounded to nearest once
            scales = group_scales(p.detach(), gs, INT8_MAX)
            state["qscales"] = scales
            state["qweight"] = quantize_int8_with_scales(p.detach(), scales, gs)
        self._step_codes(p, update, group, state, state["qweight"], state["qscales"])
        p.copy_(dequantize_int8(state["qweight"], state["qscales"], gs, p.dtype))

    def _step_codes(
        self, p: torch.Tensor, update: torch.Tensor, group: dict, state: dict, codes: torch.Tensor, scales: torch.Tensor
    ) -> None:
        """codes, scales <- quantise(dequantise(codes) * (1 - lr wd) - lr update), in place, chunk by
        chunk of CHUNK_GROUPS groups (no full fp32 copy of the weight beyond the update itself)."""
        gs = self.weight_group_size
        lr, wd = group["lr"], group["weight_decay"]
        gen = None
        if self.stochastic_rounding:
            gen = sketch_generator(self.seed + 7919, self._param_index(p), state["step"], codes.device)
        flat_codes, flat_update = codes.view(-1), update.reshape(-1)
        n, chunk = flat_codes.numel(), CHUNK_GROUPS * gs
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            g_lo, g_hi = lo // gs, math.ceil(hi / gs)
            old = scales[g_lo:g_hi]
            w = dequantize_int8(flat_codes[lo:hi], old, gs)
            if wd:
                w.mul_(1 - lr * wd)
            w.add_(flat_update[lo:hi], alpha=-lr)
            # grow (never shrink) a group's scale only when a value would round beyond +-127
            needed = group_scales(w, gs, INT8_MAX)
            new = torch.where(needed * INT8_MAX > old * (INT8_MAX + 0.5), needed, old)
            flat_codes[lo:hi] = quantize_int8_with_scales(w, new, gs, gen)
            scales[g_lo:g_hi] = new
