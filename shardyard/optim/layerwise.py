"""Layer-wise GaLore under data parallelism: reduce each gradient from its hook, step, free it.

Plain layer-wise GaLore steps a parameter from its post-accumulate-grad hook, so only about one
gradient is alive at a time. Under DDP that breaks: the hook fires before DDP has averaged the
gradient, and DDP's buckets keep every gradient alive until backward ends (the "DDP doubles
GaLore's memory" problem). `LayerwiseStepper` replaces DDP for the model's gradients:

- Buckets: the parameters, in reverse registration order (roughly the order backward produces
  their gradients), are split into buckets of about `bucket_bytes`, separately for dense
  parameters and expert shards (marked with the expert-shard attribute by
  runtime.parallel.place_experts), and per dtype. Bucket membership and order are fixed at `attach()`, so
  every rank issues the same collectives in the same order whatever order its hooks fire in.
- Hook: when a parameter's gradient is final, it is marked ready; when a bucket is complete (and
  all earlier buckets of its kind are launched), its gradients are all-reduced in place,
  asynchronously (one collective per gradient; a flat copy would double the bucket's memory while
  it is made): dense buckets over `dense_group`, expert
  buckets over `expert_group` (the expert-data-parallel group: the ranks holding the same expert
  shard); both are summed and divided by `world_size`, which gives the gradient of the world-mean
  loss (see comm.grad_sync for why experts also divide by the world size).
- Before a bucket is launched, the previous in-flight bucket of the same group is waited for; its
  reduced gradients are then stepped one parameter at a time (`optimizer.step_param`) and freed.
  At most one bucket in flight per group and one filling bucket exist at once: the peak gradient
  memory is about two buckets (each at most bucket_bytes plus one gradient), instead of the whole
  model's gradients.
- `finish()` (after backward) gives parameters whose hook never fired (unused this step) a zero
  gradient, launches the remaining buckets, waits for every reduction, steps what remains, calls
  `optimizer.step()` (a no-op in layer-wise mode that runs the optimizer's step hooks, e.g. the MoE
  router-bias update; do not call it again) and returns the global gradient norm (computed from the reduced buckets; expert shards' squared
  norms summed over the world and divided by the expert-data-parallel size, so each shard counts
  once).
- Clipping: a global clip needs every reduced gradient before the first step, which is exactly what
  layer-wise updates avoid. With `max_norm > 0` each parameter's reduced gradient is clipped to
  that norm on its own (galore.clip_param_grad_); the returned norm is the unclipped global one.
- Gradient accumulation: set `accumulate = True` for every micro-batch but the last. The hooks then
  leave gradients to accumulate in `.grad` (full gradient memory during those micro-batches: the
  price of accumulating); the last micro-batch's hooks see the summed gradient and proceed as above.

Whole-model steps (an optimizer not in layer-wise mode): the stepper is then a DDP replacement
that works for INT8-weight models too (DDP's start-up broadcast cannot write their memory-less
gradient handles): the same bucketed async reductions from the hooks, but the gradients are kept;
`finish()` waits for them, clips by the global norm (`max_norm`, as clip_grad_norm_), calls
`optimizer.step()` and frees the gradients. Peak gradient memory is then the whole model's, as
with DDP.

Collective order: the same buckets in the same order on every rank of a group, as long as backward
produces gradients in the same order on every rank (the same graph; true for every model here).
With world_size 1 nothing is reduced and the stepper is plain layer-wise stepping with buckets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardyard.models.moe.experts import is_expert_shard
from shardyard.optim.clip import scale_grads_
from shardyard.optim.galore import GaLoreAdamW, clip_param_grad_


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    expert: bool
    index: int  # position among the buckets of its kind
    ready: set[int] = field(default_factory=set)  # ids of parameters whose gradient is final
    launched: bool = False


@dataclass
class _InFlight:
    bucket: _Bucket
    works: list[Any]  # torch.distributed Work per gradient (empty without reduction)


class LayerwiseStepper:
    def __init__(
        self,
        model: nn.Module,
        optimizer: GaLoreAdamW,
        dense_group: Any = None,
        expert_group: Any = None,
        world_size: int = 1,
        bucket_bytes: int = 4 << 20,
        max_norm: float = 0.0,
    ) -> None:
        if not isinstance(optimizer, GaLoreAdamW):
            raise TypeError(f"layer-wise stepping needs a GaLoreAdamW-family optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer = model, optimizer
        self.dense_group, self.expert_group = dense_group, expert_group
        self.world_size, self.bucket_bytes, self.max_norm = world_size, bucket_bytes, max_norm
        self.accumulate = False
        managed = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.params = [p for p in model.parameters() if p.requires_grad]
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in managed]
        if missing:
            raise ValueError(f"parameters not managed by the optimizer: {missing[:5]}")
        if world_size > 1 and expert_group is None and any(self._is_expert(p) for p in self.params):
            raise ValueError("expert-parallel parameters need expert_group (their expert-data-parallel group)")
        self.buckets = self._make_buckets()
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._handles: list[Any] = []
        self._in_flight: dict[bool, _InFlight | None] = {False: None, True: None}
        self._device = self.params[0].device if self.params else torch.device("cpu")
        self._sq = self._zero_norms()
        self.live_grad_bytes = 0
        self.peak_grad_bytes = 0  # since the last reset_peak(): measured from the hooks

    # ------------------------------------------------------------------------------- public
    def attach(self) -> LayerwiseStepper:
        """Register the hooks (taking over from the optimizer's own single-worker hooks)."""
        self.optimizer.remove_hooks()
        self.optimizer.external_hooks = self.optimizer.layerwise
        for p in self.params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.optimizer.external_hooks = False

    @torch.no_grad()
    def finish(self) -> torch.Tensor:
        """After backward of the last micro-batch: reduce and step everything still pending;
        returns the global gradient norm (before clipping), identical on every rank."""
        for b in self.buckets:
            for p in b.params:
                if id(p) not in b.ready:  # no gradient this step: reduce (and step) a zero one
                    if p.grad is None:
                        p.grad = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
                    self._mark_ready(p, b)
        self._launch_complete()
        for expert in (False, True):
            self._drain(expert)
        norm = self._global_norm()
        if not self.optimizer.layerwise:  # whole-model step on the reduced gradients
            if self.max_norm > 0:
                scale_grads_(self.params, norm, self.max_norm)  # the one clip rule (optim.clip)
            self.optimizer.step()
            for p in self.params:
                self._track(-p.grad.numel() * p.grad.element_size())
                p.grad = None
        else:
            self.optimizer.step()  # a no-op step that still runs the optimizer's step hooks (router biases)
        for b in self.buckets:
            b.ready.clear()
            b.launched = False
        self._sq = self._zero_norms()
        return norm

    def reset_peak(self) -> None:
        self.peak_grad_bytes = self.live_grad_bytes

    # ---------------------------------------------------------------------------- internals
    def _zero_norms(self) -> dict[bool, torch.Tensor]:
        """Squared gradient norms of the reduced buckets, dense and expert, on the parameters' device
        (NCCL reduces device tensors only)."""
        return {kind: torch.zeros((), dtype=torch.float64, device=self._device) for kind in (False, True)}

    @staticmethod
    def _is_expert(p: torch.Tensor) -> bool:
        return bool(is_expert_shard(p))

    def _make_buckets(self) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        open_: dict[tuple[bool, torch.dtype], list[nn.Parameter]] = {}
        sizes: dict[tuple[bool, torch.dtype], int] = {}
        counts = {False: 0, True: 0}

        def close(key: tuple[bool, torch.dtype]) -> None:
            if open_.get(key):
                buckets.append(_Bucket(open_.pop(key), key[0], counts[key[0]]))
                counts[key[0]] += 1
                sizes[key] = 0

        for p in reversed(self.params):  # backward produces the last layers' gradients first
            key = (self._is_expert(p), p.dtype)
            open_.setdefault(key, []).append(p)
            sizes[key] = sizes.get(key, 0) + p.numel() * p.element_size()
            if sizes[key] >= self.bucket_bytes:
                close(key)
        for key in list(open_):
            close(key)
        return buckets

    def _track(self, delta: int) -> None:
        self.live_grad_bytes += delta
        self.peak_grad_bytes = max(self.peak_grad_bytes, self.live_grad_bytes)

    def _on_grad(self, p: torch.Tensor) -> None:
        if self.accumulate:
            return  # a micro-batch before the last: the gradient keeps accumulating in .grad
        b = self._bucket_of[id(p)]
        with torch.no_grad():
            self._mark_ready(p, b)
            self._launch_complete()

    def _mark_ready(self, p: torch.Tensor, b: _Bucket) -> None:
        if id(p) not in b.ready:
            b.ready.add(id(p))
            self._track(p.grad.numel() * p.grad.element_size())

    def _launch_complete(self) -> None:
        """Launch, in bucket order per kind, every bucket whose gradients are all final."""
        for expert in (False, True):
            for b in self.buckets:
                if b.expert != expert or b.launched:
                    continue
                if len(b.ready) < len(b.params):
                    break  # later buckets of this kind wait for this one: fixed collective order
                self._launch(b)

    def _launch(self, b: _Bucket) -> None:
        """All-reduce the bucket's gradients in place (one async collective each: no flat copy,
        which would double the bucket's memory while it is made)."""
        self._drain(b.expert)  # at most one reduction in flight per group
        b.launched = True
        works = []
        if self.world_size > 1:
            group = self.expert_group if b.expert else self.dense_group
            works = [dist.all_reduce(p.grad, group=group, async_op=True) for p in b.params]
        self._in_flight[b.expert] = _InFlight(b, works)

    def _drain(self, expert: bool) -> None:
        """Wait for the group's in-flight reduction, then step its parameters and free their gradients."""
        pending = self._in_flight[expert]
        if pending is None:
            return
        self._in_flight[expert] = None
        for work in pending.works:
            work.wait()
        for p in pending.bucket.params:
            grad = p.grad
            if self.world_size > 1:
                grad.div_(self.world_size)
            self._sq[expert] += grad.double().square().sum()
            if not self.optimizer.layerwise:
                continue  # kept for the whole-model step in finish()
            if self.max_norm > 0:
                clip_param_grad_(grad, self.max_norm)
            self.optimizer.step_param(p)
            self._track(-grad.numel() * grad.element_size())
            p.grad = None

    def _global_norm(self) -> torch.Tensor:
        dense_sq, expert_sq = self._sq[False], self._sq[True]
        if self.world_size > 1 and any(self._is_expert(p) for p in self.params):
            # each expert shard's reduced gradient is identical on its EDP ranks: sum over the world,
            # then count each shard once
            total = expert_sq.clone()
            dist.all_reduce(total, group=self.dense_group)
            expert_sq = total / dist.get_world_size(self.expert_group)
        return (dense_sq + expert_sq).sqrt().float()
