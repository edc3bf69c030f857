"""Model FLOPs per token, for MFU and `validate`.

FLOPs are counted, not guessed: the model is built on the meta device and one forward of a
sequence runs under torch's FlopCounterMode (every matmul and attention, any architecture). MoE
layers route by data, which the meta device cannot do, so while counting each MoE layer runs a
stand-in with the same matmul shapes as perfectly balanced routing: the router, then top_k expert
MLPs per token (and the shared expert). Training costs three forwards (forward, and a backward
that computes both input and weight gradients); activation recomputation is not counted, as is
usual for MFU (it is work the model did not need).
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from shardyard.platform.schema import ModelSpec


def _balanced_moe_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Same matmul FLOPs as the MoE layer under perfectly balanced routing; used only for counting."""
    tokens = x.reshape(-1, x.shape[-1])
    gate = next(p for p in layer.router.parameters() if p.dim() == 2)
    F.linear(tokens, gate)  # the router's logits
    out = torch.zeros_like(tokens)
    w_up, w_down = layer.experts.w_up[0], layer.experts.w_down[0]
    for _ in range(layer.top_k):
        h = tokens @ w_up
        if h.shape[-1] == 2 * w_down.shape[0]:  # swiglu: gate and up in one matrix
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h)
        out = out + h @ w_down
    if layer.shared_expert is not None:
        shared = layer.shared_expert(tokens)
        if layer.shared_gate is not None:
            shared = torch.sigmoid(layer.shared_gate(tokens)) * shared
        out = out + shared
    return out.view(x.shape)


@contextlib.contextmanager
def _balanced_moe(model: nn.Module) -> Iterator[None]:
    from shardyard.models import moe_layers

    layers = moe_layers(model)
    for layer in layers:
        layer.forward = types.MethodType(_balanced_moe_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def training_flops_per_token(model_spec: ModelSpec, seq_len: int, vocab_size: int = 256) -> float:
    """Forward + backward FLOPs per input position (byte or token) of one training sequence
    (`vocab_size`: the tokenizer's, for the embedding and head)."""
    return _counted(model_spec.model_dump_json(), seq_len, vocab_size)


@functools.lru_cache(maxsize=64)
def _counted(model_json: str, seq_len: int, vocab_size: int = 256) -> float:
    """One count per (model, sequence length) in a process: validate, the CLI and the fuzz test ask often."""
    from torch.utils.flop_counter import FlopCounterMode

    from shardyard.models import build_model

    model_spec = ModelSpec.model_validate_json(model_json)
    with torch.device("meta"):
        model = build_model(model_spec, seq_len, vocab_size)
    inputs = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    try:
        with _balanced_moe(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(inputs, inputs)
    except (RuntimeError, NotImplementedError):
        # A forward that reads a value on the host (e.g. the self-guided low-rank blend) cannot run on
        # the meta device: fall back to the usual 6 x active parameters (attention not counted).
        from shardyard.models import count_parameters

        return 6.0 * count_parameters(model)[1]
    return 3.0 * counter.get_total_flops() / seq_len
