"""Byte generation with KV caches: each stage of a multiscale model runs once per unit it owns.

For a MEGABYTE model with patch size P the global model runs once per P bytes and the local model
takes one cached step per byte; a reference implementation re-runs the whole model for every byte
(`use_cache=False` does that here, for comparison and tests). Flat byte transformers (kinds dense |
moe) are served by the same functions with a single KV-cached stack.

Long outputs: when the text outgrows the model's context, the window slides forward by half a
context (whole global patches, so patch boundaries stay put) and the caches are rebuilt once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shardyard.models.bytes.multiscale import MultiscaleByteLM
from shardyard.models.registry import build_model
from shardyard.models.transformer import ByteTransformerLM, TransformerStack, apply_rotary

if TYPE_CHECKING:
    from shardyard.platform.schema import ModelSpec

KV = list[tuple[torch.Tensor, torch.Tensor] | None]


def stack_step(stack: TransformerStack, x: torch.Tensor, cache: KV, pos: int) -> torch.Tensor:
    """Run `stack` on x [B, q, d] at positions pos..pos+q-1, reading and extending `cache` (one
    (k, v) per block, holding positions < pos). Same maths as TransformerStack.forward."""
    q = x.shape[1]
    if pos + q > stack.rope_cos.shape[0]:
        raise ValueError(f"position {pos + q} exceeds the stack's max_seq_len {stack.rope_cos.shape[0]}")
    cos, sin = stack.rope_cos[pos : pos + q], stack.rope_sin[pos : pos + q]
    mask = None
    if pos and q > 1:
        mask = torch.ones(q, pos + q, dtype=torch.bool, device=x.device).tril(diagonal=pos)
    for i, block in enumerate(stack.blocks):
        attn = block.attn
        qh, k, v = attn.project(block.attn_norm(x))
        qh, k = apply_rotary(qh, cos, sin), apply_rotary(k, cos, sin)
        if cache[i] is not None:
            k, v = torch.cat((cache[i][0], k), dim=2), torch.cat((cache[i][1], v), dim=2)
        cache[i] = (k, v)
        x = x + attn.attend(qh, k, v, mask, pos == 0 and q > 1)
        x = x + block.ffn(block.ffn_norm(x))
    return stack.norm(x)


def window_start(n: int, max_known: int, align: int) -> int:
    """Where the model's window starts when n bytes are known and at most `max_known` fit: 0 while
    they fit, then jumps of half a context rounded to `align` (whole global patches)."""
    if n <= max_known:
        return 0
    half = max(align, (max_known + 1) // 2 // align * align)
    return ((n - max_known - 1) // half + 1) * half


class MultiscaleDecoder:
    """Incremental next-byte logits for a MultiscaleByteLM, one stage step per new unit."""

    def __init__(self, model: MultiscaleByteLM) -> None:
        self.m = model
        self.n = -1  # bytes of the window the caches describe
        self.caches: list[KV] = []
        self.pos: list[int] = []
        self.out: list[torch.Tensor] = []  # each stage's output for its current unit, [1, 1, d]
        self.ctx: list[torch.Tensor | None] = []  # stage i's context for its current parent unit

    def logits(self, window: torch.Tensor) -> torch.Tensor:
        """window [n] of known bytes -> logits [256] for byte n. Steps when one byte was appended."""
        if window.numel() == self.n + 1 and self.n >= 0:
            self._step(window)
        else:
            self._prefill(window)
        self.n = window.numel()
        return self.m.head(self.out[-1])[0, -1]

    def _run(self, i: int, x: torch.Tensor, fresh: bool) -> None:
        if fresh:
            self.caches[i], self.pos[i] = [None] * len(self.m.stacks[i].blocks), 0
        self.out[i] = stack_step(self.m.stacks[i], x, self.caches[i], self.pos[i])[:, -1:]
        self.pos[i] += x.shape[1]

    def _prefill(self, y: torch.Tensor) -> None:
        m, n, stages = self.m, y.numel(), len(self.m.dims)
        self.caches, self.pos = [[] for _ in range(stages)], [0] * stages
        self.out, self.ctx = [torch.empty(0)] * stages, [None] * stages
        y = y.view(1, -1)
        whole = n // m.units[0] * m.units[0]
        x = m.shift_in(0, torch.cat((m.embed_units(y[:, :whole], 0), m.pads[0].view(1, 1, -1)), dim=1))
        self._run(0, x, fresh=True)
        for i in range(1, stages):
            start = n - n % m.units[i - 1]  # first byte of the current parent unit
            j = (n - start) // m.units[i]  # current unit's index inside it
            self.ctx[i] = m.context_for(i, self.out[i - 1])[0, 0]
            emb = m.embed_units(y[:, start : start + j * m.units[i]], i)
            x = m.shift_in(i, torch.cat((emb, m.pads[i].view(1, 1, -1)), dim=1)) + self.ctx[i][: j + 1]
            self._run(i, x, fresh=True)

    def _step(self, y: torch.Tensor) -> None:
        m, n = self.m, y.numel()
        for i in range(len(m.dims)):
            if n % m.units[i]:
                continue  # stage i is still inside its current unit
            last = m.embed_units(y[n - m.units[i] :].view(1, -1), i)  # the unit just completed
            if i == 0:
                self._run(0, last, fresh=False)
                continue
            j = (n % m.units[i - 1]) // m.units[i]
            if j == 0:  # the parent moved on: new sequence for this stage
                self.ctx[i] = m.context_for(i, self.out[i - 1])[0, 0]
                self._run(i, (m.pads[i] + self.ctx[i][0]).view(1, 1, -1), fresh=True)
            else:
                self._run(i, last + self.ctx[i][j], fresh=False)


class FlatDecoder:
    """Incremental next-byte logits for a flat ByteTransformerLM (one KV-cached stack)."""

    def __init__(self, model: ByteTransformerLM) -> None:
        self.m, self.n, self.cache = model, -1, []

    def logits(self, window: torch.Tensor) -> torch.Tensor:
        if window.numel() == self.n + 1 and self.n > 0:
            x, pos = window[-1:], self.n
        else:
            self.cache, x, pos = [None] * len(self.m.stack.blocks), window, 0
        self.n = window.numel()
        out = stack_step(self.m.stack, self.m.embed(x.view(1, -1)), self.cache, pos)
        return self.m.head(out)[0, -1]


def _limits(model: nn.Module) -> tuple[int, int]:
    """(most known bytes the model can condition on, window alignment)."""
    if isinstance(model, MultiscaleByteLM):
        return model.context - 1, model.units[0]
    if isinstance(model, ByteTransformerLM):
        return model.stack.rope_cos.shape[0], 1
    raise TypeError(f"cannot generate with {type(model).__name__}: expected a MultiscaleByteLM or ByteTransformerLM")


def _full_logits(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Reference path: the whole model over the window, for every byte."""
    if isinstance(model, MultiscaleByteLM):
        return model.predict(window.view(1, -1), window.numel() + 1)[0, -1]
    if window.numel() == 0:
        raise ValueError("a flat byte model needs a non-empty prompt")
    return model(window.view(1, -1))[0][0, -1]


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: bytes,
    num_bytes: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    use_cache: bool = True,
    seed: int | None = None,
) -> bytes:
    """Continue `prompt` by `num_bytes` bytes. temperature <= 0 is greedy; top_k keeps the k most
    likely bytes. use_cache=False re-runs the whole model per byte (the reference behaviour)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    max_known, align = _limits(model)
    decoder: Any = None
    if use_cache:
        decoder = MultiscaleDecoder(model) if isinstance(model, MultiscaleByteLM) else FlatDecoder(model)
    seq = torch.tensor(list(prompt), dtype=torch.long, device=device)
    out = torch.empty(len(prompt) + num_bytes, dtype=torch.long, device=device)
    out[: len(prompt)] = seq
    start = 0
    try:
        for n in range(len(prompt), len(prompt) + num_bytes):
            new_start = window_start(n, max_known, align)
            if new_start != start and decoder is not None:
                decoder.n = -1  # window moved: rebuild the caches
            start = new_start
            window = out[start:n]
            logits = decoder.logits(window) if decoder is not None else _full_logits(model, window)
            out[n] = _sample(logits, temperature, top_k, gen)
    finally:
        model.train(was_training)
    return bytes(out[len(prompt) :].tolist())


def generate_from_checkpoint(
    model_spec: ModelSpec,
    state_dict: Mapping[str, torch.Tensor],
    prompt: bytes,
    num_bytes: int,
    *,
    seq_len: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    device: str | torch.device = "cpu",
) -> bytes:
    """Build the model of `model_spec` (a ModelSpec; seq_len = the job's data.seq_len), load
    `state_dict` (a checkpoint's "model" entry; a DDP "module." prefix is stripped) and generate."""
    model = build_model(model_spec, seq_len)
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    model.load_state_dict(state)
    model.to(device)
    return generate(model, prompt, num_bytes, temperature, top_k, use_cache, seed)
