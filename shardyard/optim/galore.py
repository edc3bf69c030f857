"""GaLore AdamW: Adam moments kept in a low-rank projection of each matrix gradient.

For a projected weight W [m, n] (or a stack [E, m, n], one projector per expert slice) with
gradient G, every `update_gap` steps the optimizer recomputes an orthonormal basis P of G's
dominant rank-r subspace (exact SVD, or randomized SVD as in GaLore 2; see projection.py).
Each step Adam runs on R = project(G) [max(m,n), r] and the normalised update is projected back
and scaled: W -= lr * scale * project_back(Adam(R)). Parameters outside the projected groups
(embeddings, norms, biases, anything not matched by the target patterns) get plain AdamW.

The Adam arithmetic matches torch.optim.AdamW (decoupled weight decay applied first, bias-corrected
denominator + eps), so a GaLore optimizer with nothing projected steps exactly like AdamW.

Data parallel: DDP averages gradients during backward, before `step()` sees them, so every rank
projects the identical averaged gradient. The exact SVD is deterministic for identical inputs on
identical hardware and the randomized sketch is drawn from a generator seeded by
(seed, parameter index, step), so by default every rank computes the same basis with no
communication. `broadcast_projection=True` instead broadcasts rank 0's basis after each refresh
(one [min(m,n), r] tensor per parameter per refresh), for mixed hardware where LAPACK results may
differ in the last bits. Expert-parallel shards (different experts on every rank) are never broadcast:
each rank projects its own experts' gradients.

Layer-wise mode (`layerwise=True`): each parameter is stepped during backward as soon as its
gradient is final and its gradient is freed at once; `step()` is then a no-op. With one worker the
optimizer attaches its own post-accumulate-grad hooks; under data parallelism (or to reduce
gradients, clip or accumulate micro-batches) `shardyard.optim.layerwise.LayerwiseStepper` takes the
hooks over: it all-reduces gradients in buckets from the hooks and calls `step_param` when a
bucket's reduction lands.

Moments (`moments="int8"`): every moment tensor of at least MOMENT_BLOCK elements (the low-rank
moments of projected parameters, the dense moments of large matrices) is stored as 8-bit codes on
8-bit Adam's dynamic map with one fp32 absmax per block of 256 (quant.quantize_moment); the first
moment is signed, the second is stored as sqrt(v) (unsigned), which halves its dynamic range in
decades so small entries do not round to zero and blow up m / sqrt(v). Each step dequantises,
runs the fp32 Adam arithmetic and re-quantises (round to nearest).

State (all saved by state_dict, loadable with torch.load(weights_only=True)): per parameter
`step` (int), `exp_avg`, `exp_avg_sq` (fp32, low-rank shape when projected) or with int8 moments
`exp_avg_q`, `exp_avg_absmax`, `exp_avg_sq_q`, `exp_avg_sq_absmax`, and for projected
parameters `basis` (fp32 [.., min(m,n), r]), `side` ('left'/'right'), `next_refresh` (int),
`refreshes` (int, number of SVDs so far).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardyard.models.moe.experts import is_expert_shard
from shardyard.optim.projection import Side, choose_side, compute_basis, project, project_back, sketch_generator
from shardyard.optim.quant import MOMENT_BLOCK, dequantize_moment, quantize_moment

GALORE_DEFAULTS: dict[str, Any] = {
    "galore": False,
    "rank": 32,
    "update_gap": 200,
    "scale": 0.25,
    "projection": "svd",
    "oversample": 8,
    "power_iters": 2,
}


def is_projectable(p: torch.Tensor, rank: int) -> bool:
    """2-D matrices, or 3-D stacks of per-expert matrices, whose smaller side exceeds the rank."""
    return p.dim() in (2, 3) and rank < min(p.shape[-2], p.shape[-1])


def galore_param_groups(
    model: nn.Module, targets: Iterable[str], rank: int, weight_decay: float, experts: str = "per_expert"
) -> list[dict]:
    """Split parameters into [projected (galore=True), dense decayed, dense undecayed] groups.

    Projected: >= 2-D weights whose name matches a target regex, excluding embeddings and norms;
    3-D expert stacks only with experts='per_expert'; matrices too small for the rank stay dense.
    Decay follows `shardyard.optim.param_groups`: matrices decay, norms/biases/embeddings do not.
    """
    patterns = [re.compile(t) for t in targets]
    projected, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        dense_only = "embed" in name or "norm" in name or (p.dim() == 3 and experts != "per_expert")
        if not dense_only and is_projectable(p, rank) and any(pt.search(name) for pt in patterns):
            projected.append(p)
        elif p.dim() >= 2 and "embed" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": projected, "galore": True, "weight_decay": weight_decay},
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def clip_param_grad_(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Layer-wise clipping: scale one parameter's gradient to norm <= max_norm (0 = off); returns
    its norm before clipping. A global clip needs every gradient before any step, which layer-wise
    updates do not wait for; clipping each parameter at the global threshold bounds the same spikes
    (a parameter's norm never exceeds the global one, so this clips no more than the global rule)."""
    norm = grad.detach().float().norm()
    if max_norm > 0:
        grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype))
    return norm


class GaLoreAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rank: int = 32,
        update_gap: int = 200,
        scale: float = 0.25,
        projection: str = "svd",
        oversample: int = 8,
        power_iters: int = 2,
        seed: int = 0,
        broadcast_projection: bool = False,
        layerwise: bool = False,
        moments: str = "fp32",
        layerwise_clip: float = 0.0,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        """`group`: the data-parallel ranks that hold the same dense weights (the projection is
        broadcast over it; layer-wise steps are driven by a LayerwiseStepper when it has several
        ranks); None for one process on its own."""
        if projection not in ("svd", "randomized"):
            raise ValueError(f"unknown projection {projection!r}; available: svd, randomized")
        if moments not in ("fp32", "int8"):
            raise ValueError(f"unknown moments {moments!r}; available: fp32, int8")
        defaults = {
            **GALORE_DEFAULTS,
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "rank": rank,
            "update_gap": update_gap,
            "scale": scale,
            "projection": projection,
            "oversample": oversample,
            "power_iters": power_iters,
        }
        super().__init__(params, defaults)
        self.seed = seed
        self.broadcast_projection = broadcast_projection
        self.group = group
        self.layerwise = layerwise
        self.moments = moments
        self.layerwise_clip = layerwise_clip  # layer-wise: clip each gradient's norm to this (0 = off)
        self._hooks: list[Any] = []
        self.external_hooks = False  # True while a LayerwiseStepper drives step_param
        self._index: dict[torch.Tensor, tuple[int, dict]] = {}
        self._build_index()
        if layerwise:
            self._attach_layerwise_hooks()

    # ------------------------------------------------------------------------------------ public
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:
            if not self._hooks and not self.external_hooks:
                raise RuntimeError(
                    "layer-wise GaLore under data parallelism steps parameters from "
                    "shardyard.optim.layerwise.LayerwiseStepper; none is attached"
                )
            return loss  # parameters were stepped by their gradient hooks during backward
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Step one parameter from its current `.grad` (layer-wise mode: called from a hook or by
        LayerwiseStepper once the parameter's reduced gradient is in place)."""
        self._update(p, self._group_of(p))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_index"):
            self._build_index()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but tensors keep their saved dtype (torch would cast INT codes to float)
        and plain values (side, basis shape) are restored as saved."""
        saved = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in saved.get(pid, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device).clone()
                else:  # torch's cast would turn strings and lists into generators
                    self.state[p][key] = copy.deepcopy(value)
        self._build_index()  # torch replaces the group dicts

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------------------- internals
    def _attach_layerwise_hooks(self) -> None:
        """Single worker: step and free each gradient from its own hook. Under data parallelism the
        gradient must first be averaged over ranks: LayerwiseStepper attaches those hooks instead."""
        if self.group is not None and dist.get_world_size(self.group) > 1:
            return

        def hook(p: torch.Tensor) -> None:
            with torch.no_grad():
                clip_param_grad_(p.grad, self.layerwise_clip)
                self._update(p, self._group_of(p))
            p.grad = None

        for group in self.param_groups:
            for p in group["params"]:
                self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def _build_index(self) -> None:
        """parameter -> (position over all groups, its group), built once (and after the groups
        change): the per-step lookups are dictionary hits, not scans of every group."""
        self._index = {}
        for group in self.param_groups:
            for p in group["params"]:
                self._index[p] = (len(self._index), group)

    def _group_of(self, p: torch.Tensor) -> dict:
        try:
            return self._index[p][1]
        except KeyError:
            raise KeyError("parameter is not managed by this optimizer") from None

    def _param_index(self, p: torch.Tensor) -> int:
        try:
            return self._index[p][0]
        except KeyError:
            raise KeyError("parameter is not managed by this optimizer") from None

    def _projected(self, p: torch.Tensor, group: dict) -> bool:
        return bool(group["galore"]) and is_projectable(p, group["rank"])

    def _new_basis(self, p: torch.Tensor, grad: torch.Tensor, group: dict, side: Side, step: int) -> torch.Tensor:
        gen = None
        if group["projection"] == "randomized":
            gen = sketch_generator(self.seed, self._param_index(p), step, grad.device)
        basis = compute_basis(
            grad, group["rank"], side, group["projection"], group["oversample"], group["power_iters"], gen
        )
        # expert-parallel shards hold different experts on every rank: never broadcast those
        sharded = is_expert_shard(p)
        if self.broadcast_projection and not sharded and self.group is not None:
            dist.broadcast(basis, group=self.group, group_src=0)
        return basis

    def _refresh_due(self, state: dict) -> bool:
        return "side" not in state or state["step"] >= state["next_refresh"]

    def _refresh(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        side = choose_side(p.shape)
        state["basis"] = self._new_basis(p, grad, group, side, state["step"])
        state["side"] = side
        state["next_refresh"] = state["step"] + group["update_gap"]
        state["refreshes"] = state.get("refreshes", 0) + 1

    def _basis(self, state: dict) -> torch.Tensor:
        return state["basis"]

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad.float()
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        projected = self._projected(p, group)
        if projected:
            if self._refresh_due(state):
                self._refresh(p, grad, group, state)
            basis = self._basis(state)
            grad = project(grad, basis, state["side"])
        exp_avg, exp_avg_sq = self._load_moments(state, grad)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**step
        bias2 = 1 - beta2**step
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(group["eps"])
        update = (exp_avg / bias1) / denom
        self._store_moments(state, exp_avg, exp_avg_sq)
        if projected:
            update = project_back(update, basis, state["side"]).mul_(group["scale"])
        self._apply(p, update, group, state, projected)

    def _quantized_moments(self, numel: int) -> bool:
        return self.moments == "int8" and numel >= MOMENT_BLOCK

    def _load_moments(self, state: dict, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 working moments: the state's own tensors (fp32) or dequantised copies (int8)."""
        if not self._quantized_moments(grad.numel()):
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
            return state["exp_avg"], state["exp_avg_sq"]
        if "exp_avg_q" not in state:
            return torch.zeros_like(grad), torch.zeros_like(grad)
        m = dequantize_moment(state["exp_avg_q"], state["exp_avg_absmax"], signed=True)
        root_v = dequantize_moment(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], signed=False)
        return m, root_v.square_()

    def _store_moments(self, state: dict, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        if not self._quantized_moments(exp_avg.numel()):
            return  # updated in place
        state["exp_avg_q"], state["exp_avg_absmax"] = quantize_moment(exp_avg, signed=True)
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize_moment(exp_avg_sq.sqrt(), signed=False)

    def _apply(self, p: torch.Tensor, update: torch.Tensor, group: dict, state: dict, projected: bool) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            p.mul_(1 - lr * wd)
        p.add_(update.to(p.dtype), alpha=-lr)
