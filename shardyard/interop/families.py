"""Hugging Face model families: which shardyard specs each holds exactly, and the pure maps between
the two worlds (spec <-> config.json, shardyard tensor <-> HF tensors), tensor by tensor.

A shardyard tensor is described by a `Layout`: how it is cut into HF tensors. `to_hf(layout, t)`
yields the HF tensors of one shardyard tensor; `from_hf(layout, read, rows)` assembles rows
[lo, hi) of it from the HF tensors, reading only what those rows need (`read(name, lo, hi)` returns
rows of one HF tensor). Import and export call these; the models know nothing of HF.

Families (transformers' model_type): llama and qwen3 (dense), mixtral, qwen2_moe, qwen3_moe, olmoe.
Exactness tricks (each exact in fp32): a qkv bias without an output-projection bias is written with a
zero o_proj bias where the family biases all four projections; an ungated shared expert goes to
Qwen2-MoE with a zero gate weight (sigmoid(0) = 1/2) and its down projection doubled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from shardyard.platform.schema import ModelSpec

Reader = Callable[[str, int, int], torch.Tensor]  # (hf name, first row, end row) -> those rows


class Unsupported(ValueError):
    """A spec (or config) a family cannot hold; the message names the field."""


# ------------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class Rows:
    """The shardyard tensor is the concatenation along dim 0 of HF tensors (name, rows, scale):
    the HF tensor is `scale` x its rows (scale 2 for an ungated shared expert's down projection).
    `interleave[i]` = head_dim permutes part i's rows within each head from shardyard's rotary
    layout (pairs j, j + d/2) to interleaved pairs (2j, 2j + 1) (Ernie); 0 = as is."""

    parts: tuple[tuple[str, int, float], ...]
    interleave: tuple[int, ...] = ()


@dataclass(frozen=True)
class Vector:
    """A shardyard vector [n] stored as an HF [1, n] tensor (Ernie's e_score_correction_bias)."""

    name: str
    size: int


def interleave_index(rows: int, head_dim: int) -> torch.Tensor:
    """HF row r holds shardyard row index[r]: per head, [0, d/2, 1, d/2 + 1, ...]."""
    return torch.arange(rows).view(-1, 2, head_dim // 2).transpose(1, 2).reshape(-1)


@dataclass(frozen=True)
class Experts:
    """An expert stack [E, ...]: expert e is the concatenation along the last dim of the transposes of
    HF tensors names[e] (w_up [W, 2H] = [gate.T | up.T]; w_down [H, W] = down.T)."""

    names: tuple[tuple[str, ...], ...]


Layout = Rows | Experts | Vector


def to_hf(layout: Layout, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of one shardyard tensor (works on meta tensors: names and shapes only)."""
    if isinstance(layout, Vector):
        yield layout.name, tensor.reshape(1, -1)
        return
    if isinstance(layout, Rows):
        start = 0
        for i, (name, rows, scale) in enumerate(layout.parts):
            part = tensor[start : start + rows]
            if layout.interleave and layout.interleave[i] and part.device.type != "meta":
                part = part[interleave_index(rows, layout.interleave[i])]
            yield name, (part * scale if scale != 1.0 else part).contiguous()
            start += rows
        return
    for e, names in enumerate(layout.names):
        pieces = tensor[e].chunk(len(names), dim=-1)
        for name, piece in zip(names, pieces):
            yield name, piece.t().contiguous()


def from_hf(layout: Layout, read: Reader, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) (experts [lo, hi) of a stack) of the shardyard tensor, read from HF tensors."""
    if isinstance(layout, Vector):
        return read(layout.name, 0, 1).reshape(-1)[lo:hi]
    if isinstance(layout, Rows):
        out, start = [], 0
        for i, (name, rows, scale) in enumerate(layout.parts):
            a, b = max(lo, start), min(hi, start + rows)
            if a < b:
                if layout.interleave and layout.interleave[i]:  # permuted within heads: read the part whole
                    whole = read(name, 0, rows)
                    part = whole[torch.argsort(interleave_index(rows, layout.interleave[i]))][a - start : b - start]
                else:
                    part = read(name, a - start, b - start)
                out.append(part / scale if scale != 1.0 else part)
            start += rows
        return torch.cat(out) if len(out) > 1 else out[0]
    experts = []
    for names in layout.names[lo:hi]:
        experts.append(torch.cat([read(n, 0, -1).t() for n in names], dim=-1))
    return torch.stack(experts)


def rows_of(layout: Layout) -> int:
    if isinstance(layout, Vector):
        return layout.size
    return sum(r for _, r, _ in layout.parts) if isinstance(layout, Rows) else len(layout.names)


def layout_names(layout: Layout) -> list[str]:
    """The HF tensors one shardyard tensor is made of."""
    if isinstance(layout, Vector):
        return [layout.name]
    if isinstance(layout, Rows):
        return [n for n, _, _ in layout.parts]
    return [n for group in layout.names for n in group]


# ------------------------------------------------------------------------------------------ families
@dataclass(frozen=True)
class Family:
    name: str  # transformers model_type
    architecture: str
    moe: bool
    qk_norm: str = "none"  # what the family has: none | head | full
    bias: str = "attention_bias"  # config flag for projection biases: attention_bias (q,k,v,o) | qkv_bias
    moe_prefix: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared: str = "none"  # gated: Qwen2-MoE's one gated shared expert (always there); ungated: Ernie's (optional)
    aux_free: bool = False  # holds the aux_free router's selection bias (e_score_correction_bias)
    interleaved_rope: bool = False  # rotates pairs (2j, 2j+1): q/k rows permuted per head
    sparse_step: bool = False  # decoder_sparse_step + mlp_only_layers
    renorm_flag: bool = True  # norm_topk_prob exists (else always renormalises: Mixtral)
    head_dim_flag: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", "LlamaForCausalLM", moe=False, extra={"mlp_bias": False, "pretraining_tp": 1}),
        Family("qwen3", "Qwen3ForCausalLM", moe=False, qk_norm="head", extra={"use_sliding_window": False}),
        Family(
            "mixtral",
            "MixtralForCausalLM",
            moe=True,
            bias="none",
            moe_prefix="block_sparse_moe",
            expert_names=("w1", "w3", "w2"),
            renorm_flag=False,
            extra={"sliding_window": None, "router_jitter_noise": 0.0},
        ),
        Family(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            moe=True,
            qk_norm="head",
            sparse_step=True,
            extra={"use_sliding_window": False},
        ),
        Family("olmoe", "OlmoeForCausalLM", moe=True, qk_norm="full", head_dim_flag=False, extra={"clip_qkv": None}),
        Family(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            moe=True,
            bias="qkv_bias",
            shared="gated",
            sparse_step=True,
            extra={"use_sliding_window": False},
        ),
        Family(
            "ernie4_5_moe",
            "Ernie4_5_MoeForCausalLM",
            moe=True,
            bias="none",
            shared="ungated",
            sparse_step=True,
            renorm_flag=False,
            aux_free=True,
            interleaved_rope=True,
            extra={"use_bias": False, "moe_norm_min": 1e-12},
        ),
    )
}
AUTO_ORDER = {False: ("llama", "qwen3"), True: ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "ernie4_5_moe")}


def problems(family: Family, m: ModelSpec) -> list[str]:
    """Why `family` cannot hold model spec `m` exactly (empty: it can); each names the field."""
    out: list[str] = []
    if m.kind not in ("dense", "moe"):
        return [f"model.kind: {m.kind!r} (hierarchical byte models have no transformers family)"]
    if m.ffn.kind != "swiglu" and (m.kind == "dense" or _has_dense_blocks(m)):
        out.append(f"model.ffn.kind: {m.ffn.kind!r} (the families here have SwiGLU MLPs)")
    if family.moe != (m.kind == "moe"):
        out.append(f"model.kind: {m.kind!r} ({family.name} is {'an MoE' if family.moe else 'a dense'} family)")
        return out
    if m.qk_norm != family.qk_norm:
        out.append(f"model.qk_norm: {m.qk_norm!r} ({family.name} has qk_norm {family.qk_norm!r})")
    if m.qkv_bias and family.bias == "none":
        out.append(f"model.qkv_bias: true ({family.name} has no projection biases)")
    if not family.head_dim_flag and m.head_dim not in (None, m.width // m.heads):
        out.append(f"model.head_dim: {m.head_dim} ({family.name} has head_dim = width / heads)")
    moe = m.moe
    if moe is None or m.kind != "moe":
        return out
    if moe.expert_kind != "swiglu":
        out.append(f"model.moe.expert_kind: {moe.expert_kind!r} (experts are SwiGLU MLPs in every family)")
    if moe.router == "expert_choice":
        out.append("model.moe.router: 'expert_choice' (each expert picks tokens from the whole batch: not causal)")
    if moe.router == "aux_free" and not family.aux_free:
        out.append("model.moe.router: 'aux_free' (its selection bias needs e_score_correction_bias: ernie4_5_moe)")
    if moe.capacity_factor is not None:
        out.append(f"model.moe.capacity_factor: {moe.capacity_factor} (drops tokens; transformers' MoE is dropless)")
    if moe.score != "softmax":
        out.append(f"model.moe.score: {moe.score!r} (these families score with a softmax)")
    if moe.routed_scale != 1.0:
        out.append(f"model.moe.routed_scale: {moe.routed_scale} (no routed scaling factor in {family.name})")
    renorm = moe.renormalize if moe.renormalize is not None else moe.router != "switch"
    if not family.renorm_flag and not renorm:
        out.append(f"model.moe.renormalize: false ({family.name} always renormalises the top-k weights)")
    if not family.sparse_step and (moe.every != 1 or moe.first_dense_layers):
        name = "every" if moe.every != 1 else "first_dense_layers"
        out.append(f"model.moe.{name}: {getattr(moe, name)} ({family.name} makes every block MoE)")
    if family.shared == "gated" and moe.num_shared == 0:
        out.append(f"model.moe.shared_experts: 0 ({family.name} always has a shared expert)")
    if family.shared == "none" and moe.num_shared:
        out.append(f"model.moe.shared_experts: {moe.num_shared} ({family.name} has no shared expert)")
    if family.shared == "ungated" and moe.num_shared:
        if moe.shared_gate:
            out.append(f"model.moe.shared_gate: true ({family.name}'s shared experts have no gate)")
        if m.shared_hidden != m.expert_hidden:
            out.append(
                f"model.moe.shared_hidden: {m.shared_hidden} ({family.name}'s shared experts are as wide as the routed "
                f"ones, {m.expert_hidden})"
            )
    return out


def _has_dense_blocks(m: ModelSpec) -> bool:
    return m.moe is None or not all(m.moe.is_moe_block(i) for i in range(m.depth))


def pick_family(m: ModelSpec, target: str = "auto") -> Family:
    """The family for `target` (auto: the first that holds the spec exactly); Unsupported names the fields."""
    if target != "auto":
        if target not in FAMILIES:
            raise Unsupported(f"--target {target!r}: supported families are auto, {', '.join(FAMILIES)}")
        found = problems(FAMILIES[target], m)
        if found:
            raise Unsupported(f"{target} cannot hold this model: " + "; ".join(found))
        return FAMILIES[target]
    if m.kind not in ("dense", "moe"):
        raise Unsupported(problems(FAMILIES["llama"], m)[0])
    tried = []
    for name in AUTO_ORDER[m.kind == "moe"]:
        found = problems(FAMILIES[name], m)
        if not found:
            return FAMILIES[name]
        tried.append(f"{name}: " + "; ".join(found))
    raise Unsupported("no transformers family holds this model exactly:\n  " + "\n  ".join(tried))


# ------------------------------------------------------------------------------------------ config
def rope_parameters(m: ModelSpec) -> dict[str, Any]:
    if m.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": m.rope_theta}
    r = m.rope_scaling
    return {
        "rope_type": "llama3",
        "rope_theta": m.rope_theta,
        "factor": r.factor,
        "low_freq_factor": r.low_freq_factor,
        "high_freq_factor": r.high_freq_factor,
        "original_max_position_embeddings": r.original_context,
    }


def hf_config(family: Family, m: ModelSpec, vocab_size: int, seq_len: int, dtype: str) -> dict[str, Any]:
    """config.json for `m` in `family` (assumes problems(family, m) is empty)."""
    cfg: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.name,
        "vocab_size": vocab_size,
        "hidden_size": m.width,
        "num_hidden_layers": m.depth,
        "num_attention_heads": m.heads,
        "num_key_value_heads": m.attn_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": seq_len,
        "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings,
        "rope_parameters": rope_parameters(m),
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": dtype,
        "intermediate_size": m.ffn_hidden,
        **family.extra,
    }
    if family.head_dim_flag:
        cfg["head_dim"] = m.attn_head_dim
    if family.bias == "attention_bias":
        cfg["attention_bias"] = m.qkv_bias
    elif family.bias == "qkv_bias":
        cfg["qkv_bias"] = m.qkv_bias
    if not family.moe:
        return cfg
    moe = m.moe
    assert moe is not None
    cfg.update(num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.aux_loss, output_router_logits=False)
    if family.name == "mixtral":
        cfg.update(num_local_experts=moe.num_experts, intermediate_size=m.expert_hidden)
        return cfg
    if family.name == "ernie4_5_moe":
        return _ernie_config(cfg, m)
    cfg.update(num_experts=moe.num_experts, moe_intermediate_size=m.expert_hidden)
    cfg["norm_topk_prob"] = moe.renormalize if moe.renormalize is not None else moe.router != "switch"
    if family.name == "olmoe":
        cfg["intermediate_size"] = m.expert_hidden
    if family.sparse_step:
        cfg.update(decoder_sparse_step=moe.every, mlp_only_layers=list(range(moe.first_dense_layers)))
    if family.shared == "gated":
        cfg["shared_expert_intermediate_size"] = moe.num_shared * m.shared_hidden
    return cfg


def _ernie_config(cfg: dict[str, Any], m: ModelSpec) -> dict[str, Any]:
    moe = m.moe
    assert moe is not None
    for key in ("num_experts", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"):
        cfg.pop(key, None)
    cfg.update(
        moe_num_experts=moe.num_experts,
        moe_k=moe.top_k,
        moe_intermediate_size=m.expert_hidden,
        moe_num_shared_experts=moe.num_shared,
        moe_layer_start_index=moe.first_dense_layers,
        moe_layer_end_index=m.depth - 1,
        moe_layer_interval=moe.every,
    )
    cfg.pop("num_experts_per_tok", None)
    return cfg


def _get(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def spec_from_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The `model:` section (a plain dict) of a shardyard spec that holds the HF config exactly.
    Unsupported names the HF config field it cannot hold."""
    kind = cfg.get("model_type")
    if kind not in FAMILIES:
        raise Unsupported(f"config.json model_type {kind!r}: supported are {', '.join(FAMILIES)}")
    family = FAMILIES[kind]
    if _get(cfg, "hidden_act", "silu") != "silu":
        raise Unsupported(f"config.json hidden_act {cfg['hidden_act']!r}: shardyard's MLPs are SwiGLU (silu)")
    for flag in ("mlp_bias", "use_sliding_window", "clip_qkv", "sliding_window"):
        if cfg.get(flag) and not (flag == "sliding_window" and not cfg.get("use_sliding_window", True)):
            raise Unsupported(f"config.json {flag}: {cfg[flag]!r} has no shardyard equivalent")
    width, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = _get(cfg, "num_key_value_heads", heads)
    head_dim = _get(cfg, "head_dim", width // heads) if family.head_dim_flag else width // heads
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    model: dict[str, Any] = {
        "kind": "moe" if family.moe else "dense",
        "width": width,
        "depth": cfg["num_hidden_layers"],
        "heads": heads,
        "ffn": {"kind": "swiglu", "hidden": cfg["intermediate_size"]},
        "rope_theta": float(theta),
        "norm_eps": float(_get(cfg, "rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "qk_norm": family.qk_norm,
        "qkv_bias": bool(cfg.get("qkv_bias", True) if family.bias == "qkv_bias" else cfg.get("attention_bias", False)),
    }
    if kv != heads:
        model["kv_heads"] = kv
    if head_dim != width // heads or width % heads:
        model["head_dim"] = head_dim
    if rope_type == "llama3":
        model["rope_scaling"] = {
            "type": "llama3",
            "factor": rope["factor"],
            "low_freq_factor": rope["low_freq_factor"],
            "high_freq_factor": rope["high_freq_factor"],
            "original_context": rope["original_max_position_embeddings"],
        }
    elif rope_type != "default":
        raise Unsupported(f"config.json rope_parameters.rope_type {rope_type!r}: shardyard has default | llama3")
    if not family.moe:
        return model
    if family.name == "ernie4_5_moe":
        return {**model, "moe": _ernie_moe(cfg)}
    moe: dict[str, Any] = {
        "top_k": cfg["num_experts_per_tok"],
        "aux_loss": float(_get(cfg, "router_aux_loss_coef", 0.01)),
    }
    moe["num_experts"] = cfg.get("num_local_experts") or cfg["num_experts"]  # 5.x saves either name
    if family.name == "mixtral":
        return {**model, "moe": moe}
    moe["renormalize"] = bool(cfg.get("norm_topk_prob", False))
    expert_hidden = cfg.get("moe_intermediate_size", cfg["intermediate_size"])  # olmoe: intermediate_size
    if expert_hidden != cfg["intermediate_size"]:
        moe["expert_hidden"] = expert_hidden
    if family.sparse_step:
        moe["every"] = _get(cfg, "decoder_sparse_step", 1)
        dense = sorted(cfg.get("mlp_only_layers") or [])
        if dense != list(range(len(dense))):
            raise Unsupported(
                f"config.json mlp_only_layers {dense}: shardyard's dense MoE blocks are the first n (first_dense_layers)"
            )
        moe["first_dense_layers"] = len(dense)
    if family.shared == "gated":
        moe.update(shared_experts=1, shared_hidden=cfg["shared_expert_intermediate_size"], shared_gate=True)
    return {**model, "moe": moe}


def _ernie_moe(cfg: dict[str, Any]) -> dict[str, Any]:
    depth = cfg["num_hidden_layers"]
    end = _get(cfg, "moe_layer_end_index", -1)
    if end not in (-1, depth - 1):
        raise Unsupported(f"config.json moe_layer_end_index {end}: shardyard's MoE blocks run to the last block")
    if cfg.get("use_bias"):
        raise Unsupported("config.json use_bias: true (biases on every projection) has no shardyard equivalent")
    moe = {
        "router": "aux_free",
        "num_experts": _get(cfg, "moe_num_experts", cfg.get("num_experts")),
        "top_k": _get(cfg, "moe_k", cfg.get("num_experts_per_tok")),
        "aux_loss": float(_get(cfg, "router_aux_loss_coef", 0.001)),
        "every": _get(cfg, "moe_layer_interval", 1),
        "first_dense_layers": _get(cfg, "moe_layer_start_index", 0),
    }
    if cfg["moe_intermediate_size"] != cfg["intermediate_size"]:
        moe["expert_hidden"] = cfg["moe_intermediate_size"]
    if _get(cfg, "moe_num_shared_experts", 0):
        moe["shared_experts"] = cfg["moe_num_shared_experts"]
    return moe


# ------------------------------------------------------------------------------------------ tensors
def layouts(family: Family, m: ModelSpec, vocab_size: int) -> tuple[dict[str, Layout], dict[str, tuple[int, ...]]]:
    """(shardyard key -> Layout, HF-only tensors that are zero: name -> shape). Keys absent from the
    first map (a tied head, the rope tables) have no HF tensor of their own."""
    hd, kv, width = m.attn_head_dim, m.attn_kv_heads, m.width
    out: dict[str, Layout] = {"embed.weight": Rows((("model.embed_tokens.weight", vocab_size, 1.0),))}
    zeros: dict[str, tuple[int, ...]] = {}
    gate_name, up_name, down_name = family.expert_names
    for i in range(m.depth):
        sd, hf = f"stack.blocks.{i}.", f"model.layers.{i}."
        out[sd + "attn_norm.weight"] = Rows(((hf + "input_layernorm.weight", width, 1.0),))
        out[sd + "ffn_norm.weight"] = Rows(((hf + "post_attention_layernorm.weight", width, 1.0),))
        a = hf + "self_attn."
        inter = (hd, hd, 0) if family.interleaved_rope else ()
        for kind in ("weight", "bias") if m.qkv_bias else ("weight",):
            out[sd + f"attn.qkv.{kind}"] = Rows(
                (
                    (a + f"q_proj.{kind}", m.heads * hd, 1.0),
                    (a + f"k_proj.{kind}", kv * hd, 1.0),
                    (a + f"v_proj.{kind}", kv * hd, 1.0),
                ),
                inter,
            )
        out[sd + "attn.proj.weight"] = Rows(((a + "o_proj.weight", width, 1.0),))
        if m.qkv_bias and family.bias == "attention_bias":
            zeros[a + "o_proj.bias"] = (width,)
        if m.qk_norm != "none":
            full = m.qk_norm == "full"
            out[sd + "attn.q_norm.weight"] = Rows(((a + "q_norm.weight", m.heads * hd if full else hd, 1.0),))
            out[sd + "attn.k_norm.weight"] = Rows(((a + "k_norm.weight", kv * hd if full else hd, 1.0),))
        moe = m.moe if m.kind == "moe" else None
        if moe is None or not moe.is_moe_block(i):
            h = m.ffn_hidden
            out[sd + "ffn.gate_up.weight"] = Rows(
                ((hf + "mlp.gate_proj.weight", h, 1.0), (hf + "mlp.up_proj.weight", h, 1.0))
            )
            out[sd + "ffn.down.weight"] = Rows(((hf + "mlp.down_proj.weight", width, 1.0),))
            continue
        p = hf + family.moe_prefix + "."
        out[sd + "ffn.router.gate.weight"] = Rows(((p + "gate.weight", moe.num_experts, 1.0),))
        if family.aux_free:
            statics = p + "moe_statics.e_score_correction_bias"
            if moe.router == "aux_free":
                out[sd + "ffn.router.expert_bias"] = Vector(statics, moe.num_experts)
            else:
                zeros[statics] = (1, moe.num_experts)
        e_names = range(moe.num_experts)
        out[sd + "ffn.experts.w_up"] = Experts(
            tuple((f"{p}experts.{e}.{gate_name}.weight", f"{p}experts.{e}.{up_name}.weight") for e in e_names)
        )
        out[sd + "ffn.experts.w_down"] = Experts(tuple((f"{p}experts.{e}.{down_name}.weight",) for e in e_names))
        if moe.num_shared:
            sh = moe.num_shared * m.shared_hidden
            s = p + ("shared_experts." if family.shared == "ungated" else "shared_expert.")
            out[sd + "ffn.shared_expert.gate_up.weight"] = Rows(
                ((s + "gate_proj.weight", sh, 1.0), (s + "up_proj.weight", sh, 1.0))
            )
            scale = 1.0 if moe.shared_gate or family.shared == "ungated" else 2.0  # zero gate: sigmoid(0) = 1/2
            out[sd + "ffn.shared_expert.down.weight"] = Rows(((s + "down_proj.weight", width, scale),))
            if moe.shared_gate:
                out[sd + "ffn.shared_gate.weight"] = Rows(((p + "shared_expert_gate.weight", 1, 1.0),))
            elif family.shared == "gated":
                zeros[p + "shared_expert_gate.weight"] = (1, width)
    out["stack.norm.weight"] = Rows((("model.norm.weight", width, 1.0),))
    if not m.tie_embeddings:
        out["head.weight"] = Rows((("lm_head.weight", vocab_size, 1.0),))
    return out, zeros


def hf_names(family: Family, m: ModelSpec, vocab_size: int) -> set[str]:
    """Every tensor name of the HF checkpoint of `m` in `family`."""
    maps, zeros = layouts(family, m, vocab_size)
    names = set(zeros)
    for layout in maps.values():
        names.update(layout_names(layout))
    return names
