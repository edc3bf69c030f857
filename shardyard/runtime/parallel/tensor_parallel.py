"""Tensor parallelism with sequence parallelism for the flat transformers (dense | moe), DTensor style.

Over the dims' `tp` mesh (neighbouring ranks that read the same batch), Megatron's layout:

- the residual stream and the norms are split along the sequence (`SequenceParallel`): each rank
  holds T / tp positions of every sequence between sub-layers;
- attention: the input is all-gathered along the sequence, `qkv` is split by heads (column-wise; kv
  heads too, so grouped-query attention keeps each query head's kv head on its rank), `proj` row-wise,
  and its partial output is reduce-scattered back onto the sequence split;
- dense MLP: `gate_up` / `up` column-wise, `down` row-wise, the same gather / reduce-scatter;
- MoE layer: experts and router replicated over tp (or sharded by expert parallelism), each rank routes
  its own T / tp positions (the tokens are split, not the experts), so no expert weight is split and
  the router sees every token once. The router's load-balance and z losses are computed from
  statistics averaged over the tp group (`TensorParallelTokens`), which keeps them those of the whole
  batch;
- embedding row-wise (vocabulary split, output onto the sequence split); the head column-wise with
  its logits gathered (every rank of the group computes the same loss: a vocabulary of a few hundred
  to a few thousand entries makes loss parallelism not worth its complexity here).

Fused projections (`qkv` = [q | k | v], `gate_up` = [gate | up]) are reordered before they are
split, so that rank r's contiguous rows are [q_r | k_r | v_r] (resp. [gate_r | up_r]); `HeadAligned`
records each reordered parameter and turns it back into the canonical (single-worker) order for
checkpoints (runtime.parallel.state), so checkpoints stay layout-free.

Parameters left unsplit (norm weights as replicated DTensors; qk-norm weights, MoE routers, experts
and shared experts as plain tensors) see only this rank's share of the heads or tokens: their
gradients are summed over tp by the gradient step (`sum_partial_grads_over_tp`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DeviceMesh, DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from shardyard.models.moe.experts import is_expert_shard
from shardyard.models.moe.layer import MoELayer
from shardyard.models.moe.router import LocalTokens
from shardyard.models.transformer import ByteTransformerLM, CausalSelfAttention, GeluMLP, SwiGLU
from shardyard.platform.schema import ModelSpec


# ------------------------------------------------------------------------------ fused projections
def head_aligned_order(parts: tuple[int, ...], tp: int) -> torch.Tensor:
    """Row order that makes contiguous 1/tp splits hold every part's r-th chunk: for each rank r, the
    rows of chunk r of part 0, then of part 1, ... (`reordered = canonical[order]`)."""
    starts = torch.tensor((0, *parts[:-1])).cumsum(0).tolist()
    rows = []
    for r in range(tp):
        for start, size in zip(starts, parts):
            chunk = size // tp
            rows.append(torch.arange(start + r * chunk, start + (r + 1) * chunk))
    return torch.cat(rows)


@dataclass
class HeadAligned:
    """The fused parameters tensor parallelism reorders: state-dict name -> row order
    (`reordered = canonical[order]`). A pure function of the model spec and tp (`head_aligned`), so
    parallelize and the checkpoint state derive the same one."""

    orders: dict[str, torch.Tensor] = field(default_factory=dict)

    def reorder_(self, name: str, param: nn.Parameter) -> None:
        order = self.orders[name]
        if order.numel() != param.shape[0]:
            raise ValueError(f"{name}: {param.shape[0]} rows, the tensor-parallel plan expects {order.numel()}")
        with torch.no_grad():
            param.copy_(param[order.to(param.device)])

    def canonical(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """A reordered parameter (or optimizer moment) in the single-worker row order, same placements."""
        return self._permute(value, torch.argsort(self.orders[name]))

    def reordered(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """A canonical tensor in this layout's row order, same placements."""
        return self._permute(value, self.orders[name])

    @staticmethod
    def _permute(value: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        if not isinstance(value, DTensor):
            return value[order.to(value.device)]
        full = value.full_tensor()  # one tensor at a time, gathered over its mesh
        return distribute_tensor(full[order.to(full.device)], value.device_mesh, value.placements, src_data_rank=None)


def head_aligned(model: ModelSpec, tp: int) -> HeadAligned:
    """The row orders of a flat model's fused projections at tensor-parallel degree `tp` (empty at 1)."""
    aligned = HeadAligned()
    if tp == 1:
        return aligned
    q_out, kv_out = model.heads * model.attn_head_dim, model.attn_kv_heads * model.attn_head_dim
    for i in range(model.depth):
        block = f"stack.blocks.{i}."
        for kind in ("weight", "bias") if model.qkv_bias else ("weight",):
            aligned.orders[f"{block}attn.qkv.{kind}"] = head_aligned_order((q_out, kv_out, kv_out), tp)
        dense = model.moe is None or not model.moe.is_moe_block(i)
        if dense and model.ffn.kind == "swiglu":
            hidden = model.ffn_hidden
            aligned.orders[f"{block}ffn.gate_up.weight"] = head_aligned_order((hidden, hidden), tp)
    return aligned


# What the plan below splits over tp (state-dict names of a flat model): the memory prediction's share.
SPLIT_OVER_TP = re.compile(
    r"(embed|head)\.weight|stack\.blocks\.\d+\.(attn\.qkv\.(weight|bias)|attn\.proj\.weight|ffn\.(gate_up|up|down)\.weight)"
)


def tp_share(name: str, tp: int) -> float:
    """The share of parameter `name` (a flat model's state-dict name) one tp rank holds."""
    return 1.0 / tp if SPLIT_OVER_TP.fullmatch(name) else 1.0


# ------------------------------------------------------------------------------ the plan
class RowwiseParallelSync(RowwiseParallel):
    """torch's RowwiseParallel with its output's reduction (all-reduce or reduce-scatter) waited for where
    it is issued. torch's issues it asynchronously and hands on a tensor that waits when first read; when
    such a tensor is a compiled block's input (the embedding's output entering block 0 under
    training.compile) AOTAutograd returns no gradient for it (torch 2.13; the compiled-TP test in
    tests/runtime/test_compile.py fails that way with torch's class). The next op reads the sum at once
    in every use here, so waiting where it is issued loses no overlap."""

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if outputs.placements != output_layouts:
            outputs = outputs.redistribute(placements=output_layouts, async_op=False)
        return outputs.to_local() if use_local_output else outputs


def _attention_plan(attn: CausalSelfAttention, prefix: str, tp: int, aligned: HeadAligned) -> dict:
    if attn.heads % tp or attn.kv_heads % tp:
        raise ValueError(f"tensor parallelism ({tp}) must divide heads ({attn.heads}) and kv heads ({attn.kv_heads})")
    for kind, p in attn.qkv.named_parameters():
        aligned.reorder_(f"{prefix}attn.qkv.{kind}", p)
    attn.heads //= tp  # this rank's heads: the module's maths reads its own counts
    attn.kv_heads //= tp
    return {
        "attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attn.qkv": ColwiseParallel(),
        "attn.proj": RowwiseParallelSync(output_layouts=Shard(1)),
    }


def _ffn_plan(ffn: nn.Module, prefix: str, aligned: HeadAligned) -> dict:
    if isinstance(ffn, MoELayer):  # tokens split over tp: each rank routes its own positions
        local = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_output=True)
        return {"ffn": local}
    gather = {"ffn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))}
    if isinstance(ffn, SwiGLU):
        aligned.reorder_(f"{prefix}ffn.gate_up.weight", ffn.gate_up.weight)
        return {**gather, "ffn.gate_up": ColwiseParallel(), "ffn.down": RowwiseParallelSync(output_layouts=Shard(1))}
    if isinstance(ffn, GeluMLP):
        return {**gather, "ffn.up": ColwiseParallel(), "ffn.down": RowwiseParallelSync(output_layouts=Shard(1))}
    raise ValueError(f"tensor parallelism has no plan for a {type(ffn).__name__} feed-forward layer")


def apply_tp(model: nn.Module, mesh: DeviceMesh, aligned: HeadAligned) -> None:
    """Tensor + sequence parallelism over `mesh` (1-D) for a flat transformer, in place (see the module
    docstring). Every rank must hold the same full weights beforehand; `aligned` = head_aligned(spec, tp)."""
    if not isinstance(model, ByteTransformerLM):
        raise ValueError(f"tensor parallelism applies to the flat transformers, not {type(model).__name__}")
    tp = mesh.size()
    tied = model.head is not None and model.embed is not None and model.head.weight is model.embed.weight
    # A pipeline stage's model is pruned to its parts (pipeline.split_into_stages): embedding on the first
    # stage, final norm and head on the last, its blocks under their whole-model indices.
    ends = {
        "embed": RowwiseParallelSync(input_layouts=Replicate(), output_layouts=Shard(1)),
        "stack.norm": SequenceParallel(),
        "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    present = {name: plan for name, plan in ends.items() if _holds(model, name)}
    if present:
        parallelize_module(model, mesh, present)
    if tied:  # one vocabulary-split weight, read by both (both split dim 0)
        model.head.weight = model.embed.weight
    blocks = model.stack.blocks
    for i, block in blocks.items() if isinstance(blocks, nn.ModuleDict) else enumerate(blocks):
        prefix = f"stack.blocks.{i}."
        plan = {
            "attn_norm": SequenceParallel(),
            **_attention_plan(block.attn, prefix, tp, aligned),
            "ffn_norm": SequenceParallel(),
            **_ffn_plan(block.ffn, prefix, aligned),
        }
        parallelize_module(block, mesh, plan)
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            layer.router.token_group = TensorParallelTokens(mesh.get_group())


def _holds(model: nn.Module, name: str) -> bool:
    """Whether `model` holds submodule `name` (a pruned pipeline stage sets what it lacks to None)."""
    owner, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, leaf, None) is not None


# ------------------------------------------------------------------------------ routers and gradients
class TensorParallelTokens(LocalTokens):
    """The tp group's token split seen by a router: means over all its ranks' tokens (equal counts), with
    this rank's own term differentiable and the others' constant, so the loss built from them on every
    rank back-propagates each rank's true share (the loss counted once, not tp times)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group, self.size = group, dist.get_world_size(group)

    def mean(self, local: torch.Tensor) -> torch.Tensor:
        total = local.detach().clone()
        dist.all_reduce(total, group=self.group)
        return (local + (total - local.detach())) / self.size


@torch.no_grad()
def sum_partial_grads_over_tp(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Sum over tp the gradients each tp rank computed from its own heads or tokens only: a replicated
    DTensor's (a norm's weight under sequence parallelism: its gradient comes out Partial) is
    redistributed to its parameter's placements; a plain tensor's (qk-norm weights, MoE routers, experts
    and shared experts) is all-reduced. Expert-parallel shards are reduced over EDP instead."""
    grads = []
    for p in model.parameters():
        if not p.requires_grad or is_expert_shard(p):
            continue
        g = p.grad
        if isinstance(g, DTensor) and any(placement.is_partial() for placement in g.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements)
        elif not (isinstance(p, DTensor) and _on_tp(p)):  # a tp shard's gradient is its slice's whole
            if g is None:  # no token reached it here: every rank still reduces the same buffers
                g = p.grad = torch.zeros_like(p)
            grads.append(g.to_local() if isinstance(g, DTensor) else g)
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _on_tp(p: DTensor) -> bool:
    names = p.device_mesh.mesh_dim_names or ()
    return "tp" in names
