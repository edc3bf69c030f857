"""Weights from outside a run: `model.init_from` (a Hugging Face model directory), `model.upcycle_from`
(a dense model turned into an MoE), and `shardyard import` (a job spec from an HF config).

`load_into(model, ...)` fills the parameters a worker holds, whatever parallelize made of them:
a plain tensor (replicated), an FSDP2 DTensor shard (dim 0), or an expert-parallel slice of an expert
stack. Each rank reads only the rows it owns, by safetensors file offset (`HFCheckpoint.read`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shardyard.interop import FAMILIES, Unsupported, layouts, spec_from_config
from shardyard.interop.families import from_hf, rows_of
from shardyard.interop.hf_dir import HFCheckpoint, check_zero_tensors
from shardyard.models.moe.experts import is_expert_shard
from shardyard.platform.errors import UserError
from shardyard.platform.schema import JobSpec, ModelSpec

RowReader = Callable[[str, int, int], torch.Tensor]  # (shardyard key, first row, end row) -> rows


# ------------------------------------------------------------------------------------------ ownership
def owned_rows(model: nn.Module, name: str, param: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """(first row, end row, local tensor to fill) of `param` in the full (single-worker) tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        if any(offset[1:]) or tuple(shape[1:]) != tuple(param.shape[1:]):
            raise NotImplementedError(f"{name}: only dim-0 sharding is supported by init_from")
        return offset[0], offset[0] + shape[0], param.to_local()
    if is_expert_shard(param):  # an expert-parallel rank's slice of an expert stack
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        first = int(owner.first_expert)
        return first, first + param.shape[0], param
    return 0, param.shape[0], param


@torch.no_grad()
def load_into(model: nn.Module, read: RowReader, keys: set[str], skip: Callable[[str], bool] = lambda k: False) -> int:
    """Fill every parameter of `model` whose canonical name is in `keys` with its owned rows from
    `read`; returns how many tensors were filled. Keys not in `keys` (router biases) keep their init."""
    filled = 0
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        key = name.removeprefix("module.")
        if key not in keys or skip(key):
            continue
        lo, hi, local = owned_rows(model, name, p)
        if hi <= lo:
            continue
        local.copy_(read(key, lo, hi).to(local.dtype))
        filled += 1
    return filled


# ------------------------------------------------------------------------------------------ init_from
def open_hf(path: str | Path, field: str = "model.init_from") -> HFCheckpoint:
    try:
        return HFCheckpoint(Path(path))
    except FileNotFoundError as err:
        raise UserError(f"{field}: {err}") from None


def hf_model_spec(ckpt: HFCheckpoint) -> ModelSpec:
    try:
        return ModelSpec(**spec_from_config(ckpt.config))
    except Unsupported as err:
        raise UserError(f"{ckpt.dir}: {err}") from None


def _resolved(m: ModelSpec) -> dict[str, Any]:
    """The architecture as numbers that decide the weights and the maths (defaults resolved)."""
    out: dict[str, Any] = {
        "model.kind": m.kind,
        "model.width": m.width,
        "model.depth": m.depth,
        "model.heads": m.heads,
        "model.kv_heads": m.attn_kv_heads,
        "model.head_dim": m.attn_head_dim,
        "model.rope_theta": m.rope_theta,
        "model.rope_scaling": None if m.rope_scaling is None else m.rope_scaling.model_dump(),
        "model.norm_eps": m.norm_eps,
        "model.tie_embeddings": m.tie_embeddings,
        "model.qk_norm": m.qk_norm,
        "model.qkv_bias": m.qkv_bias,
        "model.ffn.kind": m.ffn.kind,
    }
    moe = m.moe if m.kind == "moe" else None
    if moe is None or any(not moe.is_moe_block(i) for i in range(m.depth)):
        out["model.ffn.hidden"] = m.ffn_hidden
    if moe is not None:
        out.update(
            {
                "model.moe.num_experts": moe.num_experts,
                "model.moe.top_k": moe.top_k,
                "model.moe.expert_hidden": m.expert_hidden,
                "model.moe.shared_experts": moe.num_shared,
                "model.moe.every": moe.every,
                "model.moe.first_dense_layers": moe.first_dense_layers,
                "model.moe.renormalize": moe.renormalize if moe.renormalize is not None else moe.router != "switch",
                "model.moe.score": moe.score,
                "model.moe.routed_scale": moe.routed_scale,
                "model.moe.expert_kind": moe.expert_kind,
            }
        )
        if moe.num_shared:
            out["model.moe.shared_experts x shared_hidden"] = moe.num_shared * m.shared_hidden
            out["model.moe.shared_gate"] = moe.shared_gate
    return out


def check_matches(model: ModelSpec, vocab_size: int, ckpt: HFCheckpoint, field: str = "model.init_from") -> ModelSpec:
    """Refuse a spec that disagrees with the checkpoint, naming both values; returns the HF model's spec."""
    theirs = hf_model_spec(ckpt)
    ours_r, theirs_r = _resolved(model), _resolved(theirs)
    diffs = [
        f"{k}: the spec says {ours_r.get(k)!r}, {ckpt.dir}/config.json says {theirs_r.get(k)!r}"
        for k in sorted(set(ours_r) | set(theirs_r))
        if ours_r.get(k) != theirs_r.get(k)
    ]
    hf_vocab = ckpt.config.get("vocab_size")
    if hf_vocab != vocab_size:
        diffs.append(
            f"vocabulary: the spec's data.tokenizer gives {vocab_size}, {ckpt.dir}/config.json vocab_size says {hf_vocab}"
        )
    if diffs:
        raise UserError(f"{field}: the spec disagrees with the checkpoint:\n  " + "\n  ".join(diffs))
    return theirs


def init_from_hf(model: nn.Module, spec: JobSpec, vocab_size: int) -> dict[str, int]:
    """Load `spec.model.init_from` into this worker's `model` (any layout). Returns counters."""
    ckpt = open_hf(spec.model.init_from or "")
    theirs = check_matches(spec.model, vocab_size, ckpt)
    family = FAMILIES[ckpt.config["model_type"]]
    maps, zeros = layouts(family, theirs, vocab_size)
    missing = sorted(n for n in _names(maps) | set(zeros) if n not in ckpt.names() and "shared_expert_gate" not in n)
    if missing:
        raise UserError(f"model.init_from: {ckpt.dir} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    try:
        check_zero_tensors(ckpt, zeros)
    except ValueError as err:
        raise UserError(f"model.init_from: {err}") from None
    filled = load_into(model, lambda key, lo, hi: from_hf(maps[key], ckpt.read, lo, hi), set(maps))
    ckpt.close()
    return {"tensors": filled, "bytes_read": ckpt.bytes_read}


def _names(maps) -> set[str]:
    from shardyard.interop.families import layout_names

    return {n for layout in maps.values() for n in layout_names(layout)}


# ------------------------------------------------------------------------------------------ upcycling
def _dense_source(path: str, vocab_size: int) -> tuple[ModelSpec, Callable[[str], torch.Tensor]]:
    """(dense model spec, key -> full tensor) from an HF directory or a shardyard run/checkpoint/export."""
    p = Path(path)
    if (p / "config.json").exists():
        ckpt = open_hf(p, "model.upcycle_from")
        dense = hf_model_spec(ckpt)
        maps, _ = layouts(FAMILIES[ckpt.config["model_type"]], dense, vocab_size)
        return dense, lambda key: from_hf(maps[key], ckpt.read, 0, rows_of(maps[key]))
    from shardyard.runtime.export import load_for_inference

    spec, model = load_for_inference(p)
    state = model.state_dict()
    return spec.model, lambda key: state[key]


def _slice_for(e: int, hidden: int, dense_hidden: int) -> slice:
    """Fine-grained upcycling: expert e takes hidden slice (e mod G) of the dense MLP, G = dense / expert."""
    g = dense_hidden // hidden
    part = e % g
    return slice(part * hidden, (part + 1) * hidden)


def upcycle_tensor(key: str, shape: tuple[int, ...], dense: ModelSpec, get, noise: float, gen) -> torch.Tensor:
    """One tensor of the MoE model from the dense model's weights (keys as in a single worker)."""
    if ".ffn.router." in key:
        return torch.randn(shape, generator=gen) * 1e-3  # small router: near-uniform scores at first
    if ".ffn.shared_expert.down." in key or ".ffn.shared_gate." in key:
        return torch.zeros(shape)  # shared experts start silent: the step-0 output is the dense model's
    if ".ffn.shared_expert.gate_up." in key:
        block = key.split(".ffn.")[0]
        gate, up = get(f"{block}.ffn.gate_up.weight").chunk(2, dim=0)
        h = shape[0] // 2
        return torch.cat([gate[:h], up[:h]]) if h <= gate.shape[0] else torch.randn(shape, generator=gen) * 0.02
    if ".ffn.experts." in key:
        block = key.split(".ffn.")[0]
        gate, up = get(f"{block}.ffn.gate_up.weight").chunk(2, dim=0)  # [H, W] each
        down = get(f"{block}.ffn.down.weight")  # [W, H]
        num, hidden = shape[0], (shape[2] // 2 if key.endswith("w_up") else shape[1])
        experts = []
        for e in range(num):
            s = _slice_for(e, hidden, gate.shape[0])
            w = torch.cat([gate[s].t(), up[s].t()], dim=1) if key.endswith("w_up") else down[:, s].t()
            if noise:
                w = w + noise * w.std() * torch.randn(w.shape, generator=gen)
            experts.append(w)
        return torch.stack(experts)
    return get(key)


def upcycle(model: nn.Module, spec: JobSpec, vocab_size: int) -> int:
    """Initialise this worker's MoE `model` from the dense `spec.model.upcycle_from` (sparse upcycling)."""
    m = spec.model
    dense, get = _dense_source(m.upcycle_from or "", vocab_size)
    if dense.kind != "dense":
        raise UserError(f"model.upcycle_from: {m.upcycle_from} holds a {dense.kind} model, not a dense one")
    for field in ("width", "depth", "heads", "attn_kv_heads", "attn_head_dim", "qk_norm", "qkv_bias", "tie_embeddings"):
        if getattr(dense, field) != getattr(m, field):
            name = field.removeprefix("attn_")
            raise UserError(
                f"model.{name}: the spec says {getattr(m, field)!r}, the dense model at {m.upcycle_from} has "
                f"{getattr(dense, field)!r}"
            )
    if dense.ffn_hidden % m.expert_hidden:
        raise UserError(
            f"model.moe.expert_hidden: {m.expert_hidden} must divide the dense model's ffn.hidden ({dense.ffn_hidden})"
        )
    with torch.device("meta"):
        from shardyard.models import build_model

        shapes = {k: tuple(v.shape) for k, v in build_model(m, 8, vocab_size).state_dict().items()}
    gen = torch.Generator().manual_seed(spec.seed + 1)
    cache: dict[str, torch.Tensor] = {}

    def read(key: str, lo: int, hi: int) -> torch.Tensor:
        if key not in cache:
            cache.clear()  # one tensor at a time
            cache[key] = upcycle_tensor(key, shapes[key], dense, get, m.upcycle_noise, gen)
        return cache[key][lo:hi]

    skip = {k for k in shapes if k.endswith("expert_bias")}
    return load_into(model, read, set(shapes) - skip)


# ------------------------------------------------------------------------------------------ import
def job_spec_from_hf(hf_dir: Path, name: str) -> str:
    """A job spec (YAML text) whose model holds the HF model exactly and starts from its weights."""
    import json

    import yaml

    from shardyard.platform.spec import load_spec_text

    config = Path(hf_dir) / "config.json"
    if not config.exists():
        raise UserError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        spec = ModelSpec(**spec_from_config(json.loads(config.read_text())))
    except Unsupported as err:
        raise UserError(f"{config}: {err}") from None
    ckpt = open_hf(hf_dir, "import")
    model = spec.model_dump(exclude_defaults=True)
    model["init_from"] = str(Path(hf_dir).resolve())
    vocab = ckpt.config.get("vocab_size")
    data: dict[str, Any] = {
        "paths": ["stdlib"],
        "seq_len": min(int(ckpt.config.get("max_position_embeddings", 256)), 256),
    }
    if vocab != 256:
        tok = Path(hf_dir).resolve() / "tokenizer.json"
        if not tok.exists():
            raise UserError(
                f"{hf_dir}: vocabulary {vocab} is not bytes and there is no tokenizer.json to read text with"
            )
        data["tokenizer"] = str(tok)
    doc = {
        "name": "".join(c if c.isalnum() or c in "_.-" else "-" for c in name) or "imported",
        "model": model,
        "data": data,
        "training": {"steps": 100, "batch_size": 8},
        "optim": {"lr": 1.0e-4},
    }
    text = (
        f"# Imported from {Path(hf_dir).resolve()} ({ckpt.config.get('model_type')}); model.init_from loads its\n"
        "# weights (the optimizer starts fresh). Fill in data and training for your run.\n"
        + yaml.safe_dump(doc, sort_keys=False)
    )
    load_spec_text(text)  # the written spec validates
    return text


def load_initial_weights(model: nn.Module, spec: JobSpec, vocab_size: int) -> str | None:
    """model.init_from / model.upcycle_from into this worker's `model`; a line for the log, or None."""
    if spec.model.init_from:
        counts = init_from_hf(model, spec, vocab_size)
        return (
            f"init_from {spec.model.init_from}: {counts['tensors']} tensors, {counts['bytes_read'] / 1e6:.2f} MB read "
            "by this rank"
        )
    if spec.model.upcycle_from:
        filled = upcycle(model, spec, vocab_size)
        return f"upcycled from {spec.model.upcycle_from}: {filled} tensors (noise {spec.model.upcycle_noise})"
    return None
