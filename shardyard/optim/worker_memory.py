"""Predicted memory of one worker, checked against what the worker is given before anything starts.

Parts, per worker, from the spec and the model's parameter shapes (built on the meta device):

- parameters, gradients, optimizer state: `optim.memory.optimizer_memory_report` (exact for this
  package's optimizers), divided the way the job shards them: expert weights over
  `parallel.expert_parallel`; dense weights, gradients and state over the workers for
  `parallel.shard: full` (all three), `zero2` (gradients, state); the `parallel.zero` stage
  1 (state), 2 (+ gradients), 3 (+ parameters).
- activations kept for backward of one micro-batch (`activation_bytes`): per transformer block of
  T = batch_size x tokens tokens and width w, about 6 T w (attention: norm input, q k v, output;
  flash attention keeps no T x T matrix; rotary q, k; residuals: 10 T w in all) plus the
  feed-forward (3 T w + 4 T h for SwiGLU, 3 T h for GELU; MoE: top_k copies of the token rows and
  their expert hidden, plus T x E router scores and probabilities); T x 256 x 3 fp32 logits. Activation checkpointing keeps one
  T w input per block plus one block's full set. Elements are 4 bytes (2 under bf16 autocast). Byte models sum their
  stages, stage i seeing batch x seq_len / (product of the later stages' patch sizes) positions.
  A test compares the estimate with the bytes autograd actually saves.
- a fixed `PROCESS_BYTES` for the Python, torch and Ray worker process itself.

`check_worker_memory` raises SpecError when the total exceeds `resources.memory_per_worker` (or this
machine's RAM when that is unset), naming the part and the spec field that drive the size.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from shardyard.platform.errors import SpecError
from shardyard.platform.schema import JobSpec, ModelSpec

PROCESS_BYTES = 512 * 2**20
GIB = 2**30


@dataclass
class MemoryPrediction:
    params: int
    grads: int
    optimizer: int
    activations: int
    process: int
    expert_fraction: float  # of parameter bytes

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.process

    def parts(self) -> dict[str, int]:
        return {
            "parameters": self.params,
            "gradients": self.grads,
            "optimizer state": self.optimizer,
            "activations": self.activations,
            "process": self.process,
        }

    def render(self) -> str:
        items = ", ".join(f"{name} {value / GIB:.2f}" for name, value in self.parts().items())
        return f"{self.total / GIB:.2f} GiB ({items} GiB)"


def _block_activation_elements(tokens: int, width: int, hidden: int, ffn_kind: str, moe) -> int:
    attention = 10 * tokens * width
    per_row_ffn = 4 * hidden if ffn_kind in ("swiglu", "lowrank") else 3 * hidden
    if moe is None:
        return attention + 3 * tokens * width + tokens * per_row_ffn
    rows = tokens * moe.top_k
    shared = tokens * per_row_ffn * moe.num_shared
    return (
        attention + 4 * tokens * moe.num_experts + 2 * rows * width + rows * per_row_ffn + 3 * tokens * width + shared
    )


def _stack_activation_elements(
    tokens: int, width: int, hidden: int, depth: int, ffn_kind: str, moe, moe_every: int, checkpointed_every: int
) -> int:
    """Elements one stack of `depth` blocks keeps; every `checkpointed_every`-th block checkpointed (0 = none)."""
    total = 0
    largest = 0
    for i in range(depth):
        is_moe = moe is not None and moe.is_moe_block(i)
        block = _block_activation_elements(tokens, width, hidden, ffn_kind, moe if is_moe else None)
        largest = max(largest, block)
        if checkpointed_every and i % checkpointed_every == 0:
            total += tokens * width  # its input; the rest is recomputed during backward
        else:
            total += block
    return total + (largest if checkpointed_every else 0)


def activation_bytes(spec: JobSpec) -> int:
    """Bytes autograd keeps for backward of one micro-batch on one worker (see the module docstring)."""
    m: ModelSpec = spec.model
    batch, seq_len = spec.training.batch_size, spec.data.seq_len
    element = 2 if spec.training.precision == "bf16" else 4
    logits = batch * seq_len * 256 * 3 * 4
    if m.stages:
        elements = 0
        for i, stage in enumerate(m.stages):
            later = 1
            for inner in m.stages[i + 1 :]:
                later *= inner.patch_size
            tokens = batch * -(-seq_len // later)
            every = 1 if stage.checkpoint_chunks else 0
            elements += _stack_activation_elements(
                tokens,
                stage.width,
                stage.hidden,
                stage.depth,
                "swiglu",
                stage.moe,
                stage.moe.every if stage.moe else 1,
                every,
            )
        return elements * element + logits
    mode = spec.training.activation_checkpointing
    every = {"none": 0, "full": 1, "every_n": spec.training.activation_checkpointing_every}[mode]
    moe = m.moe if m.kind == "moe" else None
    tokens = batch * seq_len
    elements = _stack_activation_elements(
        tokens, m.width, m.ffn_hidden, m.depth, m.ffn.kind, moe, moe.every if moe else 1, every
    )
    return elements * element + logits


def _expert_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".experts." in f".{name}")


def predict_worker_memory(spec: JobSpec, model: nn.Module) -> MemoryPrediction:
    """Per-worker memory of `spec` whose model (any device, meta included) is `model`."""
    from shardyard.optim.memory import optimizer_memory_report

    report = optimizer_memory_report(spec.optim, model)
    total_param_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) or 1
    expert_fraction = _expert_bytes(model) / total_param_bytes
    workers, ep = spec.resources.workers, spec.parallel.expert_parallel
    params_sharded, grads_sharded, state_sharded = spec.parallel.sharded_state()

    def per_worker(value: int, dense_sharded: bool) -> int:
        dense = value * (1 - expert_fraction) / (workers if dense_sharded else 1)
        return int(dense + value * expert_fraction / ep)

    params = per_worker(report["param_bytes"] + report["int8_weight_bytes"], params_sharded)
    grads = per_worker(report["grad_bytes"], grads_sharded)
    optimizer = per_worker(report["optimizer_state_bytes"], state_sharded)
    return MemoryPrediction(params, grads, optimizer, activation_bytes(spec), PROCESS_BYTES, expert_fraction)


def node_memory_bytes() -> int:
    """This machine's physical RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _driving_field(spec: JobSpec, prediction: MemoryPrediction) -> str:
    """The spec field to change, for the largest part of the prediction."""
    m, t = spec.model, spec.training
    state = prediction.params + prediction.grads + prediction.optimizer
    if prediction.process > state + prediction.activations:
        return (
            f"a worker process itself (Python, torch, Ray) needs about {prediction.process / GIB:.1f} GiB: raise "
            "resources.memory_per_worker"
        )
    if prediction.activations > state:
        return (
            f"activations are the largest part, driven by training.batch_size ({t.batch_size}) x data.seq_len "
            f"({spec.data.seq_len}): lower training.batch_size (training.grad_accum keeps the tokens per step)"
            + ("" if m.stages else " or set training.activation_checkpointing: full")
        )
    head = f"parameters, gradients and optimizer state ({state / GIB:.2f} GiB) are the largest part"
    advice = "; shard them over the workers with parallel.shard: full" if not any(spec.parallel.sharded_state()) else ""
    if prediction.expert_fraction > 0.5:
        moe = m.moe or next((s.moe for s in m.stages or [] if s.moe), None)
        field = "model.moe.num_experts" if m.moe else "model.stages[*].moe.num_experts"
        return (
            f"{head}, mostly expert weights, driven by {field} ({moe.num_experts if moe else '?'}): use fewer "
            "experts or shard them with parallel.expert_parallel"
        )
    if m.stages:
        sizes = [s.width * s.width * s.depth for s in m.stages]
        i = sizes.index(max(sizes))
        return (
            f"{head}, driven by model.stages[{i}].width ({m.stages[i].width}) and depth ({m.stages[i].depth})" + advice
        )
    return (
        f"{head}, driven by model.width ({m.width}) and model.depth ({m.depth})"
        + (f" (preset {m.preset})" if m.preset else "")
        + advice
    )


def check_worker_memory(
    spec: JobSpec, model: nn.Module, source: str = "<spec>", available: int | None = None
) -> MemoryPrediction:
    """The prediction, or SpecError when it exceeds what a worker is given."""
    prediction = predict_worker_memory(spec, model)
    given = spec.resources.memory_per_worker_bytes
    if available is None:
        available = given if given is not None else node_memory_bytes()
    if prediction.total > available:
        limit = (
            f"resources.memory_per_worker ({spec.resources.memory_per_worker})"
            if given is not None
            else f"this machine's RAM ({available / GIB:.1f} GiB; set resources.memory_per_worker for the "
            "cluster's workers)"
        )
        raise SpecError(
            f"{source}: predicted memory per worker {prediction.render()} exceeds {limit}; "
            f"{_driving_field(spec, prediction)}"
        )
    return prediction


_LAST_BUILT: list = []


@contextlib.contextmanager
def _no_weight_init() -> Iterator[None]:
    """Initialisers do nothing while a meta model is built (meta tensors have no values, but each
    call still costs ~1 ms of dispatch: most of `validate`'s time)."""
    from torch.nn import init

    names = ("normal_", "zeros_", "ones_", "uniform_", "trunc_normal_", "xavier_uniform_", "kaiming_uniform_")
    saved = {name: getattr(init, name) for name in names}
    for name in names:
        setattr(init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


MAX_BLOCKS = 4096  # transformer blocks in one model; the deepest published models have a few hundred


def build_meta_model(spec: JobSpec, source: str = "<spec>") -> nn.Module:
    """The spec's model on the meta device (no memory), or SpecError when it cannot be built: more
    than MAX_BLOCKS blocks (building would take hours), or sizes no tensor can have."""
    import torch

    from shardyard.models import build_model

    m = spec.model
    if m.stages:
        blocks, field = sum(s.depth for s in m.stages), "model.stages[*].depth"
    else:
        blocks, field = m.depth, "model.depth"
    if blocks > MAX_BLOCKS:
        raise SpecError(f"{source}: {field}: {blocks} transformer blocks in all; at most {MAX_BLOCKS} are supported")
    from shardyard.data.tokenize import vocab_size_for

    vocab_size = vocab_size_for(spec.data)  # 256 for bytes; the tokenizer's vocabulary otherwise
    key = (m.model_dump_json(), spec.data.seq_len, vocab_size)
    if _LAST_BUILT and _LAST_BUILT[0] == key:
        return _LAST_BUILT[1]  # `validate` asks twice (summary, memory check); meta models hold no data
    try:
        with torch.device("meta"), _no_weight_init():
            model = build_model(m, spec.data.seq_len, vocab_size)
        _LAST_BUILT[:] = [key, model]
        return model
    except (OverflowError, RuntimeError, TypeError, ValueError, MemoryError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SpecError(
            f"{source}: model: cannot be built at these sizes (model.width {m.width}, ffn hidden "
            f"{m.ffn_hidden}, data.seq_len {spec.data.seq_len}): {first}"
        ) from None


def check_spec_memory(spec: JobSpec, source: str = "<spec>") -> MemoryPrediction:
    """`check_worker_memory` on the spec's model built on the meta device (no memory, no time)."""
    return check_worker_memory(spec, build_meta_model(spec, source), source)
