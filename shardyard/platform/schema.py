"""The job spec: one typed config tree (pydantic v2). YAML is its serialised form.

Every component takes the piece it needs (`spec.model`, `spec.optim`, ...). Unknown keys are
errors; cross-field rules (top_k <= num_experts, heads | width, ...) live in validators here so
`shardyard validate` catches them without a cluster.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- model
class FFNSpec(Section):
    """Feed-forward sub-layer of dense blocks (and the expert shape of MoE blocks)."""

    kind: Literal["swiglu", "gelu", "lowrank"] = Field(
        "swiglu", description="swiglu | gelu | lowrank (U V factorised SwiGLU)"
    )
    hidden: PositiveInt | None = Field(None, description="hidden width; default: from the preset, or 3 x width")
    rank: PositiveInt | None = Field(None, description="lowrank only: rank of each factorised projection")
    self_guided: NonNegFloat = Field(
        0.0, le=1.0, description="lowrank only: fraction of training over which a dense guide is blended out (0 = off)"
    )

    @model_validator(mode="after")
    def _lowrank_needs_rank(self) -> FFNSpec:
        if self.kind == "lowrank" and self.rank is None:
            raise ValueError("ffn.kind 'lowrank' needs ffn.rank")
        if self.kind != "lowrank" and self.rank is not None:
            raise ValueError(f"ffn.rank only applies to ffn.kind 'lowrank', not {self.kind!r}")
        if self.kind != "lowrank" and self.self_guided > 0:
            raise ValueError(f"ffn.self_guided only applies to ffn.kind 'lowrank', not {self.kind!r}")
        if self.kind == "lowrank" and self.hidden is not None and self.rank is not None and self.rank >= self.hidden:
            raise ValueError(
                f"ffn.rank ({self.rank}) must be below ffn.hidden ({self.hidden}); a full-rank factorisation "
                f"saves nothing"
            )
        return self


class MoESpec(Section):
    num_experts: PositiveInt = Field(8, description="experts per MoE layer")
    top_k: PositiveInt = Field(2, description="experts per token")
    router: Literal["softmax_topk", "switch", "aux_free", "expert_choice"] = Field(
        "softmax_topk",
        description="softmax_topk (renormalised top-k) | switch (top-1, raw probability) | aux_free (top-k with a "
        "selection-only per-expert bias moved toward balance; DeepSeek-V3) | expert_choice (each expert "
        "takes its top capacity_factor*T*k/E tokens; non-causal)",
    )
    aux_loss: NonNegFloat = Field(0.01, description="weight of the load-balancing loss")
    balance_scope: Literal["micro", "global"] | None = Field(
        None,
        description="tokens the load-balancing loss counts: micro (each micro-batch on each worker on its own) | "
        "global (the expert fractions over the whole optimizer step: every micro-batch of every worker, as "
        "Megatron's global aux loss; the loss then does not depend on the worker count). null = global for "
        "elastic jobs (resources.workers: {min, max}), micro otherwise (docs/moe.md)",
    )
    z_loss: NonNegFloat = Field(0.001, description="weight of the router z-loss")
    capacity_factor: PositiveFloat | None = Field(
        None,
        description="null = dropless; else each expert keeps ceil(cf * tokens * k / E) assignments (expert_choice: "
        "each expert takes exactly that many tokens, null = 1.0)",
    )
    backend: Literal["auto", "loop", "torch", "triton", "megablocks"] = Field(
        "auto", description="grouped GEMM backend for the experts"
    )
    jitter: NonNegFloat = Field(0.0, lt=1.0, description="multiplicative router input noise during training")
    every: PositiveInt = Field(1, description="every n-th block is MoE (1 = all)")
    expert_kind: Literal["swiglu", "gelu"] = Field("swiglu", description="expert MLP shape")
    shared_expert: bool = Field(
        False, description="add one always-on dense expert (same hidden size) to every MoE layer (= shared_experts: 1)"
    )
    bias_update_rate: NonNegFloat = Field(
        1e-3, description="aux_free router: per-step bias change toward balance (bias += rate * sign(mean load - load))"
    )
    expert_hidden: PositiveInt | None = Field(
        None, description="each routed expert's hidden width (fine-grained experts); null = the dense ffn hidden"
    )
    shared_experts: NonNegInt = Field(
        0,
        description="always-on shared experts per MoE layer (DeepSeekMoE); n experts of hidden h are one dense MLP "
        "of hidden n x h. shared_expert: true means 1",
    )
    shared_hidden: PositiveInt | None = Field(
        None, description="hidden width of each shared expert; null = the routed experts' hidden width"
    )
    shared_gate: bool = Field(
        False, description="scale the shared experts' output by sigmoid(x . w) per token (Qwen2-MoE's shared gate)"
    )
    first_dense_layers: NonNegInt = Field(
        0, description="the first n blocks are dense whatever moe.every says (DeepSeek's first_k_dense_replace)"
    )
    score: Literal["softmax", "sigmoid"] = Field(
        "softmax",
        description="router score function over the expert logits: softmax (Mixtral, Qwen) | sigmoid (DeepSeek-V3); "
        "token-choice routers only",
    )
    renormalize: bool | None = Field(
        None,
        description="divide each token's top-k weights by their sum; null = the router's own rule (softmax_topk and "
        "aux_free: yes, switch: no)",
    )
    routed_scale: PositiveFloat = Field(
        1.0,
        description="multiply the routed experts' combine weights (DeepSeek's routed_scaling_factor; e.g. E for a "
        "switch router so its output is not ~1/E of a dense FFN's at initialisation)",
    )

    @model_validator(mode="after")
    def _check(self) -> MoESpec:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})")
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"router 'switch' is top-1, but top_k is {self.top_k}")
        if self.shared_expert and self.shared_experts > 1:
            raise ValueError(
                f"moe.shared_expert: true means one shared expert, but moe.shared_experts is {self.shared_experts}; "
                "set only moe.shared_experts"
            )
        if self.num_shared == 0 and (self.shared_hidden is not None or self.shared_gate):
            field = "moe.shared_hidden" if self.shared_hidden is not None else "moe.shared_gate"
            raise ValueError(f"{field} is set but there is no shared expert; set moe.shared_experts >= 1")
        if self.router == "expert_choice":
            if self.score != "softmax":
                raise ValueError(f"moe.score: {self.score!r} applies to token-choice routers, not 'expert_choice'")
            if self.renormalize:
                raise ValueError("moe.renormalize applies to token-choice routers, not 'expert_choice'")
        return self

    @property
    def num_shared(self) -> int:
        """Shared experts per MoE layer (`shared_experts`, or 1 for the older `shared_expert: true`)."""
        return self.shared_experts or (1 if self.shared_expert else 0)

    def is_moe_block(self, layer: int) -> bool:
        """Block `layer` (from 0) is an MoE block: past the first dense layers, every `every`-th."""
        return layer >= self.first_dense_layers and (layer + 1) % self.every == 0


class RopeScalingSpec(Section):
    """Rotary frequency scaling (Llama 3.1's rule: long wavelengths divided by factor, short ones kept,
    a smooth blend between)."""

    type: Literal["llama3"] = Field("llama3", description="llama3 (the one kind supported)")
    factor: PositiveFloat = Field(8.0, description="divide the low frequencies by this")
    low_freq_factor: PositiveFloat = Field(1.0, description="wavelengths above original_context / this are scaled")
    high_freq_factor: PositiveFloat = Field(4.0, description="wavelengths below original_context / this are kept")
    original_context: PositiveInt = Field(8192, description="the context length the base model was trained at")

    @model_validator(mode="after")
    def _check(self) -> RopeScalingSpec:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed rope_scaling.low_freq_factor "
                f"({self.low_freq_factor})"
            )
        return self


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"width": 128, "depth": 4, "heads": 4, "ffn": {"hidden": 384}},
    "small": {"width": 256, "depth": 6, "heads": 8, "ffn": {"hidden": 768}},
    "base": {"width": 768, "depth": 12, "heads": 12, "ffn": {"hidden": 2048}},
}


class StageSpec(Section):
    """One stage of a hierarchical byte model (kind megabyte | multiscale); model.stages lists them global first."""

    width: PositiveInt = Field(..., description="this stage's residual width")
    depth: PositiveInt = Field(..., description="transformer blocks in this stage")
    heads: PositiveInt = Field(..., description="attention heads (must divide width; width/heads even)")
    patch_size: PositiveInt = Field(
        ...,
        description="positions this stage sees per unit of the stage above; for the first (global) stage: patches "
        "per context. Context = product over stages",
    )
    ffn_hidden: PositiveInt | None = Field(
        None,
        description="feed-forward hidden width (default 3 x width); also each expert's hidden width when moe is set",
    )
    checkpoint_chunks: NonNegInt = Field(
        0,
        description="0 = no activation checkpointing; n >= 1 = run this stage under torch.utils.checkpoint in n "
        "chunks of its batch of patches",
    )
    moe: MoESpec | None = Field(
        None, description="make this stage's feed-forward layers MoE (every moe.every-th block)"
    )

    @model_validator(mode="after")
    def _check(self) -> StageSpec:
        if self.width % self.heads:
            raise ValueError(f"stage heads ({self.heads}) must divide stage width ({self.width})")
        if (self.width // self.heads) % 2:
            raise ValueError(
                f"stage head size width/heads = {self.width // self.heads} must be even for rotary positions"
            )
        if self.moe is not None and self.moe.every > self.depth:
            raise ValueError(
                f"stage moe.every ({self.moe.every}) exceeds stage depth ({self.depth}): no block would be MoE"
            )
        return self

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 3 * self.width


ARCH_OPTIONS = (
    "kv_heads",
    "head_dim",
    "rope_theta",
    "rope_scaling",
    "norm_eps",
    "tie_embeddings",
    "qk_norm",
    "qkv_bias",
    "init_from",
    "upcycle_from",
)


class ModelSpec(Section):
    kind: Literal["dense", "moe", "megabyte", "multiscale"] = Field(
        "moe",
        description="model registry key: dense | moe | megabyte (2-stage byte model) | multiscale (N-stage byte model)",
    )
    preset: Literal["tiny", "small", "base"] | None = Field(
        None, description="size preset; fields given here override it"
    )
    width: PositiveInt = Field(128, description="residual stream width")
    depth: PositiveInt = Field(4, description="number of transformer blocks")
    heads: PositiveInt = Field(4, description="attention heads (must divide width)")
    ffn: FFNSpec = Field(default_factory=FFNSpec)
    moe: MoESpec | None = Field(None, description="MoE settings; required (defaults filled) when kind is moe")
    kv_heads: PositiveInt | None = Field(
        None,
        description="key/value heads (grouped-query attention; 1 = multi-query); must divide heads; null = heads",
    )
    head_dim: PositiveInt | None = Field(
        None, description="size of each attention head (even, for rotary positions); null = width / heads"
    )
    rope_theta: PositiveFloat = Field(10000.0, description="rotary position base")
    rope_scaling: RopeScalingSpec | None = Field(
        None, description="rotary frequency scaling for long context: null (none) | {type: llama3, ...}"
    )
    norm_eps: PositiveFloat = Field(1e-6, description="RMSNorm epsilon (every norm of the model)")
    tie_embeddings: bool = Field(False, description="the output head shares the input embedding's weight")
    qk_norm: Literal["none", "head", "full"] = Field(
        "none",
        description="RMSNorm on queries and keys before rotary positions: none | head (per head, over head_dim; "
        "Qwen3) | full (over all heads' projection; OLMoE)",
    )
    qkv_bias: bool = Field(False, description="biases on the query, key and value projections (Qwen2)")
    init_from: str | None = Field(
        None,
        description="start from these weights: a Hugging Face model directory (config.json + *.safetensors); the "
        "optimizer starts fresh; a spec that disagrees with the checkpoint is refused",
    )
    upcycle_from: str | None = Field(
        None,
        description="kind moe only: start from a dense Hugging Face model directory (sparse upcycling): attention, "
        "norms and embeddings copied, every expert a copy (or, fine-grained, a slice) of the dense MLP",
    )
    upcycle_noise: NonNegFloat = Field(
        0.0, description="upcycle_from: relative noise added to each expert copy to break symmetry (0 = exact copies)"
    )
    stages: list[StageSpec] | None = Field(
        None,
        description="megabyte | multiscale only: the stages, global first, local (byte) last; top-level "
        "width/depth/heads/ffn.hidden are not used by these kinds",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        preset = PRESETS.get(data["preset"]) if isinstance(data["preset"], str) else None
        if preset is None:
            return data  # the Literal check reports the bad name
        merged = {**preset, **data}
        if isinstance(data.get("ffn"), dict):
            merged["ffn"] = {**preset["ffn"], **data["ffn"]}
        return merged

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.kind in ("megabyte", "multiscale"):
            self._check_byte_stages()
        elif self.stages is not None:
            raise ValueError(f"model.stages only applies to kinds megabyte | multiscale, not {self.kind!r}")
        if self.head_dim is None:
            if self.width % self.heads:
                raise ValueError(f"heads ({self.heads}) must divide width ({self.width}); or set model.head_dim")
            if (self.width // self.heads) % 2:
                raise ValueError(
                    f"head size width/heads = {self.width // self.heads} must be even for rotary positions"
                )
        elif self.head_dim % 2:
            raise ValueError(f"model.head_dim ({self.head_dim}) must be even for rotary positions")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"model.kv_heads ({self.kv_heads}) must divide model.heads ({self.heads})")
        if self.qk_norm == "full" and self.head_dim is not None and self.head_dim * self.heads != self.width:
            raise ValueError(
                f"model.qk_norm: 'full' normalises over the whole projection; it needs heads x head_dim = width "
                f"({self.heads} x {self.head_dim} != {self.width}); use qk_norm: head"
            )
        if self.stages is not None:
            for name in ARCH_OPTIONS:
                if getattr(self, name) != ModelSpec.model_fields[name].default:
                    raise ValueError(f"model.{name} applies to flat models (dense | moe), not {self.kind!r}")
        if self.init_from is not None and self.upcycle_from is not None:
            raise ValueError("model.init_from and model.upcycle_from both set the starting weights; choose one")
        if self.upcycle_from is not None and self.kind != "moe":
            raise ValueError(f"model.upcycle_from turns a dense model into an MoE; model.kind is {self.kind!r}")
        if self.upcycle_noise and self.upcycle_from is None:
            raise ValueError("model.upcycle_noise is set but model.upcycle_from is not")
        if self.kind == "moe" and self.moe is None:
            self.moe = MoESpec()
        if self.kind == "dense" and self.moe is not None:
            raise ValueError("model.moe is set but model.kind is 'dense'; use kind: moe")
        if self.kind == "moe" and self.moe is not None and self.moe.every > self.depth:
            raise ValueError(f"moe.every ({self.moe.every}) exceeds depth ({self.depth}): no block would be MoE")
        if self.kind == "moe" and self.moe is not None and not any(map(self.moe.is_moe_block, range(self.depth))):
            raise ValueError(
                f"moe.first_dense_layers ({self.moe.first_dense_layers}) with moe.every ({self.moe.every}) leaves "
                f"no MoE block in depth {self.depth}"
            )
        return self

    @property
    def ffn_hidden(self) -> int:
        return self.ffn.hidden or 3 * self.width

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.width // self.heads

    @property
    def attn_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def expert_hidden(self) -> int:
        """Each routed expert's hidden width (MoE models)."""
        return (self.moe.expert_hidden if self.moe else None) or self.ffn_hidden

    @property
    def shared_hidden(self) -> int:
        """Each shared expert's hidden width (MoE models)."""
        return (self.moe.shared_hidden if self.moe else None) or self.expert_hidden

    def _check_byte_stages(self) -> None:
        kind, stages = self.kind, self.stages
        if not stages:
            raise ValueError(
                f"model.kind {kind!r} needs model.stages: a list of {{width, depth, heads, patch_size}}, global "
                f"stage first"
            )
        if kind == "megabyte" and len(stages) != 2:
            raise ValueError(
                f"model.kind 'megabyte' has exactly 2 stages (global, local), got {len(stages)}; use kind "
                f"'multiscale' for more"
            )
        if len(stages) < 2:
            raise ValueError("model.kind 'multiscale' needs at least 2 stages")
        if self.preset is not None:
            raise ValueError(
                f"model.preset sizes dense models; a {kind} model is sized by model.stages (remove preset)"
            )
        if self.moe is not None:
            raise ValueError(
                f"model.moe does not apply to kind {kind!r}; set model.stages[i].moe on the stages that should be MoE"
            )
        if self.ffn.hidden is not None:
            raise ValueError(f"model.ffn.hidden does not apply to kind {kind!r}; set model.stages[i].ffn_hidden")
        for i, stage in enumerate(stages[1:], start=1):
            if stage.patch_size < 2:
                raise ValueError(
                    f"model.stages[{i}].patch_size is {stage.patch_size}; inner stages need patch_size >= 2"
                )

    @property
    def context(self) -> int | None:
        """Byte models: the longest sequence in bytes (product of stage patch sizes); data.seq_len may not exceed it."""
        if not self.stages:
            return None
        context = 1
        for stage in self.stages:
            context *= stage.patch_size
        return context

    def seq_len_problem(self, seq_len: int) -> str | None:
        """Why sequences of `seq_len` bytes do not fit this model (None when they do): byte models
        see at most `context` bytes. The one statement of the rule, for the spec and the builders."""
        context, stages = self.context, self.stages
        if context is None or stages is None or seq_len <= context:
            return None
        sizes = " x ".join(str(s.patch_size) for s in stages)
        least = -(-seq_len // (context // stages[0].patch_size))
        return (
            f"data.seq_len: {seq_len} exceeds the {self.kind} model's context of {context} bytes (the product "
            f"of model.stages[*].patch_size, {sizes}); raise model.stages[0].patch_size to at least {least}"
        )


# ---------------------------------------------------------------------------------------------- data
class SourceSpec(Section):
    """One data source of data.sources."""

    path: str = Field(
        ...,
        min_length=1,
        description="file, directory, glob or s3:// URL; 'stdlib' = this Python's standard library sources",
    )
    format: Literal["auto", "text", "jsonl", "parquet", "hf"] = Field(
        "auto",
        description="auto (by suffix: .jsonl/.json -> jsonl, .parquet -> parquet, a directory with dataset_info.json "
        "-> hf, else text; in a directory: .jsonl/.ndjson/.parquet files and data.extensions) | text "
        "(whole files as bytes) | jsonl | parquet | hf (datasets.save_to_disk output)",
    )
    text_field: str = Field(
        "text", min_length=1, description="jsonl / parquet / hf: the column holding the document text"
    )
    weight: PositiveFloat = Field(
        1.0,
        description="mixture weight: each training batch takes this share (normalised over sources) of its windows "
        "from this source",
    )


class DataSpec(Section):
    paths: list[str] = Field(
        default_factory=lambda: ["stdlib"],
        min_length=1,
        description="files, directories or globs; 'stdlib' = this Python's standard library sources",
    )
    extensions: list[str] = Field(
        default_factory=lambda: [".py"], description="file suffixes kept when a path is a directory ('*' = all)"
    )
    seq_len: PositiveInt = Field(256, description="bytes per training sequence")
    val_fraction: float = Field(
        0.02,
        gt=0,
        lt=0.5,
        description="fraction of files (chosen deterministically by path hash) held out for validation",
    )
    max_bytes: PositiveInt | None = Field(None, description="cap on corpus bytes read (first files in sorted order)")
    cache_dir: str | None = Field(
        None,
        description="where the train/val byte streams are cached for memory-mapping (default "
        "~/.cache/shardyard/corpus)",
    )
    sources: list[SourceSpec] | None = Field(
        None,
        description="instead of paths: sources with formats and mixture weights (JSONL / Parquet with a text_field, "
        "saved HF datasets, plain files); prepared into token shards (docs/data.md)",
    )
    tokenizer: str = Field(
        "bytes",
        description="bytes | path to a HF tokenizers tokenizer.json | bpe:<vocab_size> (byte-level BPE trained once "
        "on the training split, stored with the prepared data)",
    )
    prepared_dir: str | None = Field(
        None,
        description="where `shardyard prepare` writes token shards + index + fingerprint (local, shared or s3://); "
        "default <cache_dir>/prepared. Used whenever sources, a non-byte tokenizer or this field is set",
    )
    shard_tokens: PositiveInt = Field(
        1 << 24, description="tokens per prepared shard file (the last shard of a split is shorter)"
    )

    @model_validator(mode="after")
    def _check_tokenizer(self) -> DataSpec:
        tok = self.tokenizer
        if tok.startswith("bpe:"):
            size = tok[4:]
            if not size.isdigit() or not 256 < int(size) <= 1 << 31:
                raise ValueError(
                    f"data.tokenizer: {tok!r}: bpe:<vocab_size> needs an integer vocab_size above 256 (the byte "
                    f"alphabet)"
                )
        elif tok != "bytes" and not tok.endswith(".json"):
            raise ValueError(
                f"data.tokenizer: {tok!r} is none of bytes | bpe:<vocab_size> | a path to a tokenizer.json"
            )
        return self

    @property
    def prepared(self) -> bool:
        """True when training reads prepared token shards (shardyard prepare) instead of the byte cache."""
        return self.sources is not None or self.tokenizer != "bytes" or self.prepared_dir is not None


# --------------------------------------------------------------------------------------------- optim
class ScheduleSpec(Section):
    warmup: NonNegInt = Field(20, description="linear warm-up steps")
    decay: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of optim.lr")


class QGaLoreSpec(Section):
    """Q-GaLore: INT4 projections, INT8 weights with stochastic rounding, similarity-adaptive update gap."""

    proj_group_size: PositiveInt = Field(
        64, multiple_of=2, description="elements per INT4 scale group of a projection matrix (even: two codes per byte)"
    )
    weight_group_size: PositiveInt = Field(128, description="elements per INT8 scale group of a projected weight")
    stochastic_rounding: bool = Field(
        True, description="round weight updates to INT8 stochastically (unbiased); false = round to nearest"
    )
    sim_threshold: float = Field(
        0.4, ge=0, le=1, description="subspace overlap ||P_old^T P_new||^2/r above which a refresh counts as 'similar'"
    )
    sim_streak: PositiveInt = Field(5, description="consecutive similar refreshes before the update gap grows")
    gap_growth: float = Field(
        2.0, ge=1, description="factor applied to a parameter's update gap after a similar streak"
    )
    max_update_gap: PositiveInt = Field(2000, description="cap on the adapted update gap")


class GaLoreSpec(Section):
    """Gradient low-rank projection (GaLore / GaLore 2) settings for galore_adamw and q_galore_adamw."""

    rank: PositiveInt = Field(
        32, description="rank of the gradient projection (matrices with min(shape) <= rank stay dense)"
    )
    update_gap: PositiveInt = Field(
        200, description="steps between projection refreshes (Q-GaLore adapts it per parameter)"
    )
    scale: PositiveFloat = Field(0.25, description="multiplier of the projected-back update (GaLore's alpha)")
    projection: Literal["svd", "randomized"] = Field(
        "svd", description="svd = exact SVD (GaLore); randomized = randomized range finder + small SVD (GaLore 2)"
    )
    oversample: NonNegInt = Field(8, description="randomized only: extra sketch columns beyond rank")
    power_iters: NonNegInt = Field(2, description="randomized only: power (subspace) iterations")
    targets: list[str] = Field(
        default_factory=lambda: ["attn", "ffn"],
        min_length=1,
        description="regexes searched in parameter names; matching >=2-D weights are projected (embeddings, norms, "
        "biases always dense)",
    )
    experts: Literal["per_expert", "dense"] = Field(
        "per_expert",
        description="3-D stacked expert weights [E, K, N]: one projector per expert slice, or leave them dense",
    )
    layerwise: bool = Field(
        False,
        description="step each parameter as soon as its (data-parallel reduced) gradient is final and free it at "
        "once; grad_clip then clips each parameter's gradient on its own",
    )
    moments: Literal["fp32", "int8"] = Field(
        "fp32",
        description="Adam moments: fp32, or int8 = block-wise 8-bit codes on a dynamic map with per-block absmax "
        "scales (8-bit Adam) for every moment of >= 256 elements",
    )
    broadcast_projection: bool = Field(
        False,
        description="data parallel: compute projections on rank 0 and broadcast (default: every rank computes the "
        "same deterministic projection from the DDP-averaged gradient)",
    )
    seed: NonNegInt = Field(
        0,
        description="seed of the randomized sketches and stochastic rounding (derived per parameter and step, "
        "identical on every rank)",
    )
    quant: QGaLoreSpec | None = Field(None, description="q_galore_adamw settings (defaults filled for that kind)")


class OptimSpec(Section):
    kind: Literal["adamw", "galore_adamw", "q_galore_adamw", "sgd"] = Field(
        "adamw",
        description="optimizer: adamw | galore_adamw | q_galore_adamw | sgd (plain torch.optim.SGD: a step "
        "proportional to the gradient, for tests and baselines)",
    )
    lr: PositiveFloat = Field(3e-3, description="peak learning rate")
    weight_decay: NonNegFloat = Field(
        0.1, description="weight decay (matrices only): decoupled for the Adam kinds, an L2 term for sgd"
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas")
    eps: PositiveFloat = Field(1e-8, description="Adam epsilon")
    momentum: NonNegFloat = Field(0.0, description="SGD momentum in [0, 1) (kind sgd only; 0 = none)")
    implementation: Literal["fused", "foreach", "for-loop"] = Field(
        "fused",
        description="the adamw / sgd update's kernels: fused (torch's fused kernel, one pass over all parameters; "
        "2.7-3.4x faster than the for-loop on this project's CPU models, docs/parallelism.md), foreach (batched per-operation "
        "kernels) or for-loop (one parameter at a time: torch's CPU default). The same maths; the results "
        "differ in rounding only. Layouts that mix DTensors with plain expert shards (ep with fsdp or "
        "tensor_parallel) take the for-loop: torch's fused and foreach kernels take one kind per call. The "
        "GaLore kinds step their own way",
    )
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    grad_clip: NonNegFloat = Field(1.0, description="max global grad norm (0 = off)")
    galore: GaLoreSpec | None = Field(
        None, description="low-rank projection settings; defaults filled when kind is galore_adamw or q_galore_adamw"
    )

    @model_validator(mode="after")
    def _check(self) -> OptimSpec:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")
        if self.momentum >= 1:
            raise ValueError(f"optim.momentum must lie in [0, 1), got {self.momentum}")
        if self.momentum and self.kind != "sgd":
            raise ValueError(f"optim.momentum only applies to kind sgd, not {self.kind!r}")
        if self.kind in ("adamw", "sgd"):
            if self.galore is not None:
                raise ValueError(
                    f"optim.galore is set but optim.kind is {self.kind!r}; use kind: galore_adamw or q_galore_adamw"
                )
            return self
        if self.galore is None:
            self.galore = GaLoreSpec()
        g = self.galore
        if self.kind == "q_galore_adamw" and g.quant is None:
            g.quant = QGaLoreSpec()
        if self.kind == "galore_adamw" and g.quant is not None:
            raise ValueError("optim.galore.quant only applies to kind q_galore_adamw, not galore_adamw")
        if g.quant is not None and g.quant.max_update_gap < g.update_gap:
            raise ValueError(
                f"optim.galore.quant.max_update_gap ({g.quant.max_update_gap}) is below optim.galore.update_gap "
                f"({g.update_gap})"
            )
        return self


# ------------------------------------------------------------------------------------------ training
class TrainingSpec(Section):
    steps: PositiveInt = Field(200, description="optimizer steps")
    batch_size: PositiveInt = Field(
        8,
        description="sequences per worker per micro-batch; with global_batch set, the largest micro-batch a "
        "worker takes (gradient accumulation makes up the rest)",
    )
    global_batch: PositiveInt | None = Field(
        None,
        description="sequences per optimizer step over all workers, kept whatever the worker count: each (re)start "
        "splits it into a micro-batch <= batch_size x gradient accumulation per worker (docs/elastic.md); "
        "null = batch_size x grad_accum x workers",
    )
    eval_every: NonNegInt = Field(50, description="steps between validation passes (0 = only at the end)")
    eval_bytes: PositiveInt = Field(
        131_072,
        description="bytes scored per validation pass (windows of data.seq_len, sampled evenly over the whole "
        "held-out split, every file in proportion to its size; capped at the split's size). With byte "
        "data and the n-gram control (eval_control) the default gives a standard error of ~0.003-0.008 "
        "bits/byte on the stdlib split",
    )
    eval_control: Literal["ngram", "none"] = Field(
        "ngram",
        description="byte data: correct the sampled mean with byte n-gram control variates fitted on the training "
        "split (the regression estimator: the same windows give a 2-3.5x smaller standard error); none = "
        "the plain mean over windows. Tokenized data always uses the plain estimator",
    )
    eval_sets: dict[str, list[str]] = Field(
        default_factory=dict,
        description="extra held-out texts evaluated beside the validation split, by name: {name: [files, directories "
        "or globs]}; each logs val/<name>_bpb",
    )
    log_every: PositiveInt = Field(1, description="steps between metric records")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="autocast dtype for the forward pass")
    grad_accum: PositiveInt = Field(
        1,
        description="micro-batches of batch_size per optimizer step (gradients are synchronised once, after the last)",
    )
    activation_checkpointing: Literal["none", "full", "every_n"] = Field(
        "none",
        description="flat models: recompute block activations in backward: none | full (every block) | every_n "
        "(every activation_checkpointing_every-th block). Byte models use "
        "model.stages[i].checkpoint_chunks",
    )
    activation_checkpointing_every: PositiveInt = Field(2, description="every_n only: checkpoint every n-th block")
    compile: bool = Field(
        False,
        description="torch.compile every transformer block and the flat model's output (final norm, head, loss) "
        "(inductor: C++ kernels on CPU, Triton on GPU), applied "
        "after activation checkpointing and before FSDP / DDP. The first steps pay the compile time (tens of "
        "seconds per distinct block on a CPU); see docs/parallelism.md for what compiles as one graph",
    )

    @model_validator(mode="after")
    def _check_eval_sets(self) -> TrainingSpec:
        for name, paths in self.eval_sets.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(
                    f"training.eval_sets: name {name!r} becomes the metric val/{name}_bpb; use letters, digits, _ . -"
                )
            if not paths:
                raise ValueError(f"training.eval_sets.{name}: give at least one file, directory or glob")
        return self


class LSHSpec(Section):
    """LSH-MoE centroids: tokens bound for one expert that hash alike travel as their mean (docs/lsh.md)."""

    hashes: PositiveInt = Field(
        6,
        le=64,
        description="cross-polytope hash functions ANDed into one bucket id; more = finer buckets, more bytes, less "
        "error",
    )
    buckets_per_hash: int = Field(
        2,
        ge=2,
        le=64,
        description="buckets of one hash function (2m for m projected coordinates; 2 = the sign of one projection); "
        "even",
    )
    rotation_refresh: PositiveInt = Field(
        100, description="training micro-batches between new random rotations (the same on every rank)"
    )
    target_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="adapt the hash functions in use (1..hashes) so centroids / rows approaches this; null = always "
        "use all",
    )
    max_error: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="adapt the hash functions in use (1..hashes, starting from all) to keep the sampled error of the "
        "expert outputs, relative to their variation (||out - exact|| / ||exact - its expert's mean||, "
        "comm/lsh_spread_error), between max_error / 2 and max_error: one more when above, one fewer "
        "when below half (measured every error_every micro-batches, agreed over the EP group); null = "
        "off. Not with target_ratio",
    )
    error_every: NonNegInt = Field(
        50,
        description="every n-th training micro-batch also runs the exact dispatch and records the relative error of "
        "the expert outputs (0 = never)",
    )
    seed: NonNegInt = Field(
        0, description="seed of the random rotations (combined with the layer index and the refresh epoch)"
    )
    residual: Literal[True, False, "forward"] = Field(
        False,
        description="true = add each row's residual x - c to its centroid's expert output (LSH-MoE's error "
        "compensation); false = E(c) only (the default: it trained 4.6 points of bits per byte better in "
        "benchmarks/results/dispatch-2026-11-26.md); forward = add it in the forward but pass no "
        "gradient through it",
    )
    center: bool = Field(
        True,
        description="hash each row minus the mean of the rows bound for its expert, so buckets split on what tells "
        "tokens apart rather than the direction they share; false = hash the rows as they are (the paper)",
    )

    @model_validator(mode="after")
    def _one_adaptation(self) -> LSHSpec:
        if self.target_ratio is not None and self.max_error is not None:
            raise ValueError("parallel.dispatch.lsh: target_ratio and max_error both steer the hashes in use; set one")
        if self.max_error is not None and self.error_every == 0:
            raise ValueError(
                "parallel.dispatch.lsh.max_error needs error_every > 0 (the error it steers by is measured then)"
            )
        return self

    @model_validator(mode="after")
    def _even_buckets(self) -> LSHSpec:
        if self.buckets_per_hash % 2:
            raise ValueError(
                f"parallel.dispatch.lsh.buckets_per_hash: {self.buckets_per_hash} must be even "
                "(a cross-polytope hash has 2 buckets per projected coordinate)"
            )
        return self


class DispatchSpec(Section):
    """How expert rows travel: deduplicate -> optional LSH centroids -> payload dtype -> parallel.a2a transport."""

    dedup: Literal[False, True, "node"] = Field(
        False,
        description="true: send a token once per destination EP rank (top-k > 1) and sum its expert outputs there; "
        "node: once per destination node across the inter-node link, relayed by the peer with the same "
        "local rank and fanned out inside the node (DeepEP-style; needs the EP group to be whole nodes, "
        "otherwise as true). Exact up to the order of each token's sums",
    )
    payload: Literal["fp32", "bf16", "fp8"] = Field(
        "fp32",
        description="wire dtype of the rows, always applied: fp32 = as computed (bf16 under bf16 autocast), bf16 = "
        "cast both ways (gradients too), fp8 = e4m3 with one fp32 scale per row forward, bf16 gradients",
    )
    grad_payload: Literal["auto", "fp32", "bf16", "fp8"] = Field(
        "auto",
        description="wire dtype of the gradients of those rows in the backward: auto = as payload, except bf16 for "
        "fp8; fp8 = e4m3 with one fp32 scale per row, like the forward",
    )
    lsh: LSHSpec | None = Field(None, description="LSH-MoE centroid compression; null = off")

    @model_validator(mode="after")
    def _dedup_or_lsh(self) -> DispatchSpec:
        if self.dedup and self.lsh is not None:
            raise ValueError(
                "parallel.dispatch.dedup and parallel.dispatch.lsh do not combine: centroids are formed "
                "per destination expert, deduplicated rows per destination rank; choose one"
            )
        return self

    @property
    def compressed(self) -> bool:
        """True when any stage changes what travels (the layer then needs the dispatch wrapper, EP 1 included)."""
        return (
            bool(self.dedup)
            or self.payload != "fp32"
            or self.grad_payload not in ("auto", "fp32")
            or self.lsh is not None
        )


class PipelineSpec(Section):
    """How a pipeline-parallel job's layers are split into stages and its batch into micro-batches."""

    schedule: Literal["1f1b", "interleaved_1f1b", "gpipe"] = Field(
        "1f1b",
        description="1f1b (one forward, one backward in steady state; bubble (p-1)/(m+p-1)) | interleaved_1f1b "
        "(stages_per_rank looped stages per rank: bubble (p-1)/(v m + p-1)) | gpipe (all forwards, then all "
        "backwards: the 1f1b bubble, m micro-batches of activations held)",
    )
    microbatches: PositiveInt = Field(
        2, description="micro-batches each optimizer micro-step's batch (training.batch_size) is split into"
    )
    stages_per_rank: PositiveInt | None = Field(
        None, description="stages (virtual stages) each pipeline rank holds; default: 2 for interleaved_1f1b, else 1"
    )
    layers_per_stage: list[int] | None = Field(
        None,
        description="transformer blocks of each stage, in order (sum = model.depth, one entry per stage); default: "
        "as even as possible, extra blocks to the stages after the first (which also holds the embedding)",
    )

    @property
    def virtual_stages(self) -> int:
        if self.stages_per_rank is not None:
            return self.stages_per_rank
        return 2 if self.schedule == "interleaved_1f1b" else 1


class ParallelSpec(Section):
    expert_parallel: PositiveInt | Literal["auto"] = Field(
        1,
        description="expert-parallel degree (1 = experts replicated, plain DDP) | auto: at every (re)start the "
        "largest degree dividing the worker count and model.moe.num_experts (and fitting the nodes)",
    )
    tensor_parallel: PositiveInt = Field(
        1,
        description="tensor-parallel degree: attention heads and dense MLPs split over this many neighbouring "
        "workers, norms and the residual stream split along the sequence (docs/parallelism.md); its ranks share "
        "one batch, so the data-parallel degree is resources.workers / tensor_parallel",
    )
    a2a: Literal["flat", "hierarchical", "leader"] = Field(
        "flat", description="all-to-all algorithm for expert parallelism"
    )
    dispatch: DispatchSpec = Field(
        default_factory=DispatchSpec,
        description="compressed expert dispatch (docs/lsh.md); works with expert_parallel 1 too",
    )
    zero: Literal[0, 1, 2, 3] = Field(
        0,
        description="DeepSpeed ZeRO stage; 0 = off. Dense models only; its checkpoints resume at the same number of "
        "workers",
    )
    shard: Literal["none", "zero2", "full"] = Field(
        "none",
        description="FSDP2 sharding of the dense weights, gradients and optimizer state over all workers, composable "
        "with expert_parallel (experts stay sharded over EP): none = replicated (DDP) | zero2 = "
        "parameters kept gathered between forward and backward | full = parameters resharded after "
        "forward (ZeRO-3)",
    )
    pipeline_parallel: PositiveInt = Field(
        1,
        description="pipeline-parallel degree: the model's blocks split into stages over this many ranks (the "
        "outermost mesh dim); its ranks share one batch, so data-parallel ranks = workers / pipeline_parallel",
    )
    pipeline: PipelineSpec = Field(
        default_factory=PipelineSpec, description="pipeline schedule and split (with pipeline_parallel > 1)"
    )

    # Fields a resume may not change when the checkpoint format does not reshard (see `checkpoints_reshard`).
    PINNED_WITHOUT_RESHARDING: ClassVar[tuple[str, ...]] = ("resources.workers", "parallel.zero")

    @property
    def checkpoints_reshard(self) -> bool:
        """Whether this job's checkpoints resume under another layout (DeepSpeed's own format does not)."""
        return not self.zero

    def sharded_state(self) -> tuple[bool, bool, bool]:
        """Whether the dense (parameters, gradients, optimizer state) are split over the workers:
        FSDP2's `shard` modes or the ZeRO stage."""
        return (
            self.shard == "full" or self.zero >= 3,
            self.shard != "none" or self.zero >= 2,
            self.shard != "none" or self.zero >= 1,
        )


class WorkerRange(Section):
    """An elastic worker group: starts with `min` workers, grows to `max` (docs/elastic.md)."""

    min: int = Field(..., description="workers the job needs to start and to go on after a node loss")
    max: int = Field(..., description="workers the job grows to when the cluster has room")


class ResourcesSpec(Section):
    workers: int | WorkerRange = Field(
        2,
        description="Ray Train workers (data-parallel ranks): N, or {min: A, max: B} for an elastic group that "
        "starts once A fit, grows to B and goes on without a lost node (docs/elastic.md)",
    )
    resize_interval_s: PositiveFloat = Field(
        60.0,
        description="elastic jobs: seconds between checks for room to grow (Ray Train's "
        "elastic_resize_monitor_interval_s)",
    )
    cpus_per_worker: PositiveFloat = Field(1.0, description="logical CPUs per worker (fractions allowed)")
    gpus_per_worker: NonNegFloat = Field(0.0, description="GPUs per worker (0 = CPU training with gloo)")
    max_failures: int = Field(
        1,
        ge=-1,
        description="worker-group restarts from the newest checkpoint before the job fails; -1 = unlimited (spot "
        "capacity). Errors in the job itself (bad data path, corpus too small, a model that cannot fit) "
        "fail at once",
    )
    collective_timeout_minutes: PositiveFloat = Field(
        5.0,
        description="process-group timeout: a collective that waits longer ends the attempt; the step watchdog "
        "reports a rank that makes no progress for this long",
    )
    memory_per_worker: PositiveInt | str | None = Field(
        None,
        description="memory each worker is given, bytes or a size such as 8GiB / 512MB (also asked of Ray's "
        "scheduler); `validate` refuses a spec whose predicted per-worker memory exceeds it (default: "
        "compared with this machine's RAM)",
    )

    @property
    def elastic(self) -> bool:
        """The worker count may change while the job runs (`workers: {min, max}` with min < max)."""
        return isinstance(self.workers, WorkerRange) and self.workers.min < self.workers.max

    @property
    def min_workers(self) -> int:
        return self.workers.min if isinstance(self.workers, WorkerRange) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers.max if isinstance(self.workers, WorkerRange) else self.workers

    @property
    def worker_counts(self) -> range:
        """Every worker count the job may run at."""
        return range(self.min_workers, self.max_workers + 1)

    def describe_workers(self) -> str:
        return f"{self.min_workers}-{self.max_workers} (elastic)" if self.elastic else str(self.min_workers)

    @model_validator(mode="after")
    def _check_memory(self) -> ResourcesSpec:
        if self.memory_per_worker is not None:
            parse_size(self.memory_per_worker, "resources.memory_per_worker")
        return self

    @model_validator(mode="after")
    def _whole_gpus(self) -> ResourcesSpec:
        if self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError(
                f"resources.gpus_per_worker: {self.gpus_per_worker:g} is a fraction; every worker owns whole "
                "GPUs (its RNG, memory and NCCL communicator are per device): use 0, 1, 2, ..."
            )
        return self

    @property
    def memory_per_worker_bytes(self) -> int | None:
        return (
            None
            if self.memory_per_worker is None
            else parse_size(self.memory_per_worker, "resources.memory_per_worker")
        )


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}


def parse_size(value: int | str, field: str) -> int:
    """Bytes of 123, "123", "8GiB", "512 MB", "1.5g" (binary for single letters); ValueError naming `field`."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{field}: {value!r} is not a size; write bytes or e.g. 8GiB, 512MB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


class CheckpointSpec(Section):
    # `async` is a Python keyword: the field is `async_` in code, `async` in YAML, --set and JSON.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    dir: str = Field(
        "runs", description="storage root; the run lives in <dir>/<name> (local path or shared filesystem)"
    )
    every: NonNegInt = Field(50, description="steps between checkpoints (0 = only at the end)")
    keep: int = Field(
        3,
        ge=2,
        description="newest checkpoints kept (at least 2: the newest can be cut short by a crash; the one before it "
        "is the fallback)",
    )
    keep_best: bool = Field(
        False,
        description="also keep the checkpoint with the lowest held-out val bpb so far in <run dir>/best, outside the "
        "rotation (chosen among checkpoints written at evaluation steps)",
    )
    every_minutes: PositiveFloat | None = Field(
        None,
        description="also checkpoint when this many minutes passed since the last checkpoint (decided together by "
        "all ranks at a step boundary); null = by steps only",
    )
    async_: bool = Field(
        False,
        alias="async",
        description="write checkpoints in the background: the step waits only while the state is copied to CPU "
        "memory; the manifest (the commit marker) is written once every rank's write finished (DCP states only: "
        "not with parallel.zero)",
    )
    save_timeout_s: PositiveFloat = Field(
        1800.0,
        description="a save still writing after this many seconds counts as failed (a stalled filesystem); its "
        "partial directory is removed and training goes on",
    )
    max_failed_saves: PositiveInt = Field(
        3,
        description="consecutive failed saves (disk full, permissions, object store errors, timeouts) after which "
        "the job stops, keeping its last good checkpoint; fewer are reported and training goes on",
    )


class TrackingSpec(Section):
    wandb_project: str = Field("shardyard", min_length=1, description="wandb project")
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="wandb mode; metrics.jsonl is always written"
    )
    run_name: str | None = Field(None, description="wandb run name (default: the job name)")
    tags: list[str] = Field(default_factory=list, description="wandb tags")
    step_anatomy: bool = Field(
        True, description="time each step's parts (data, forward, backward, optimizer) on every rank; logged as time/*"
    )
    expert_heatmap_every: NonNegInt = Field(
        100,
        description="steps between wandb heatmap images of expert load (0 = never; the per-expert counts always go "
        "to expert_load.bin)",
    )


class EnvVarSpec(Section):
    """A worker environment variable whose value is read from the environment of `shardyard run|submit`."""

    from_env: str = Field(
        ...,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="name of the variable in the submitting shell's environment that holds the value",
    )
    secret: bool = Field(
        False,
        description="the value travels only in the Ray runtime env: never printed, logged, stored in the run "
        "directory, the metrics or the wandb config",
    )


class JobSpec(Section):
    name: str = Field(
        ...,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="job name: the run directory's and the Ray job's name",
    )
    seed: NonNegInt = Field(0, description="seed for weights, data order and routing noise")
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    env: dict[str, str | EnvVarSpec] = Field(
        default_factory=dict,
        description="environment variables for the workers: NAME: value (plain, stored with the spec) or NAME: "
        "{from_env: VAR, secret: true} (the value of $VAR where the job is started; secrets never appear "
        "in output, logs, the run directory or wandb). WANDB_API_KEY is forwarded as a secret without an "
        "entry",
    )

    @model_validator(mode="after")
    def _check_env(self) -> JobSpec:
        for name in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"env: {name!r} is not an environment variable name (letters, digits, _)")
            if name.startswith(("SHARDYARD_", "RAY_")) or name in (
                "PATH",
                "PYTHONPATH",
                "LD_PRELOAD",
                "LD_LIBRARY_PATH",
            ):
                raise ValueError(
                    f"env: {name} is set by shardyard or Ray (or changes what code runs); choose another name"
                )
        return self

    @model_validator(mode="after")
    def _cross_section(self) -> JobSpec:
        self._check_elastic()
        ep = self.parallel.expert_parallel
        res = self.resources
        self._check_pipeline()
        if ep != "auto" and ep > 1:
            if self.model.kind != "moe":
                raise ValueError(
                    f"parallel.expert_parallel: {ep} but model.kind is {self.model.kind!r}: only MoE models have "
                    f"experts to shard"
                )
            for workers in res.worker_counts:
                if workers % ep:
                    raise ValueError(
                        f"parallel.expert_parallel: {ep} must divide resources.workers ({workers})"
                        + ("; an elastic job can use parallel.expert_parallel: auto" if res.elastic else "")
                    )
            stage_workers = min(res.worker_counts) // self.parallel.pipeline_parallel
            if any((w // self.parallel.pipeline_parallel) % ep for w in res.worker_counts):
                # EP groups hold distinct tokens: data-parallel or tensor-parallel ranks
                raise ValueError(
                    f"parallel.expert_parallel: {ep} must divide the workers of a pipeline stage "
                    f"({stage_workers} = resources.workers / parallel.pipeline_parallel)"
                )
            if self.model.moe and self.model.moe.num_experts % ep:
                raise ValueError(
                    f"parallel.expert_parallel: {ep} must divide model.moe.num_experts ({self.model.moe.num_experts})"
                )
        tp_problem = self.tensor_parallel_problem()
        if tp_problem:
            raise ValueError(tp_problem)
        galore = self.optim.galore
        seq_len_problem = self.model.seq_len_problem(self.data.seq_len)
        if seq_len_problem:
            raise ValueError(seq_len_problem)
        if self.parallel.zero and ep != 1:
            raise ValueError(
                f"parallel.zero: DeepSpeed ZeRO ({self.parallel.zero}) does not combine with expert "
                f"parallelism ({ep}); use parallel.shard: full (FSDP2) with parallel.zero: 0"
            )
        if self.parallel.zero and self.parallel.shard != "none":
            raise ValueError(
                f"parallel.shard: {self.parallel.shard!r} and parallel.zero: {self.parallel.zero} both "
                "shard the model; choose one (parallel.shard composes with expert parallelism)"
            )
        if self.parallel.shard != "none" and self.optim.kind not in ("adamw", "sgd"):
            raise ValueError(
                f"parallel.shard: {self.parallel.shard!r} shards each weight across workers, but "
                f"{self.optim.kind} projects whole gradient matrices; use parallel.shard: none with it"
            )
        if self.training.activation_checkpointing != "none" and self.model.stages:
            raise ValueError(
                f"training.activation_checkpointing applies to flat models; a {self.model.kind} model "
                "checkpoints per stage with model.stages[i].checkpoint_chunks"
            )
        if self.parallel.zero and galore is not None:
            raise ValueError(
                f"parallel.zero: DeepSpeed ZeRO ({self.parallel.zero}) flattens parameters into 1-D partitions, "
                f"so optim.kind {self.optim.kind} would find no matrix to project; use parallel.zero: 0 "
                "(GaLore already keeps the optimizer state low-rank) or optim.kind: adamw"
            )
        if self.checkpoint.async_ and self.parallel.zero:
            raise ValueError(
                f"checkpoint.async: DeepSpeed ZeRO ({self.parallel.zero}) writes its own checkpoint format "
                "synchronously; use checkpoint.async: false, or parallel.shard (FSDP2) with parallel.zero: 0"
            )
        if self.data.tokenizer != "bytes" and self.model.stages:
            raise ValueError(
                f"data.tokenizer: {self.data.tokenizer!r}, but a {self.model.kind} model reads bytes "
                "(its stages patch byte sequences); use data.tokenizer: bytes or a flat model (dense | moe)"
            )
        return self

    def tensor_parallel_problem(self) -> str | None:
        """Why parallel.tensor_parallel does not fit this job (None when it does): tensor parallelism
        splits heads, dense MLP hidden units and the sequence over its ranks (docs/parallelism.md)."""
        tp, m = self.parallel.tensor_parallel, self.model
        if tp == 1:
            return None
        field = f"parallel.tensor_parallel: {tp}"
        for workers in self.resources.worker_counts:
            if workers % tp:
                return f"{field} must divide resources.workers ({workers})"
        if m.kind not in ("dense", "moe"):
            return f"{field} applies to the flat models (model.kind dense | moe), not model.kind {m.kind!r}"
        if m.heads % tp or m.attn_kv_heads % tp:
            return (
                f"{field} must divide model.heads ({m.heads}) and model.kv_heads ({m.attn_kv_heads}): each rank "
                "holds whole query heads and the key/value heads they read"
            )
        if m.qk_norm == "full":
            return f"{field}: model.qk_norm full normalises across every head's query; use model.qk_norm: head"
        dense_blocks = m.moe is None or any(not m.moe.is_moe_block(i) for i in range(m.depth))
        if dense_blocks and m.ffn.kind == "lowrank":
            return f"{field} has no plan for model.ffn.kind lowrank (factored weights); use swiglu or gelu"
        if dense_blocks and m.ffn_hidden % tp:
            return f"{field} must divide the dense MLP's hidden size, model.ffn.hidden ({m.ffn_hidden})"
        if self.data.seq_len % tp:
            return (
                f"{field} must divide data.seq_len ({self.data.seq_len}): norms and the residual stream are "
                "split along the sequence"
            )
        if self.parallel.zero:
            return (
                f"{field} and parallel.zero: {self.parallel.zero}: DeepSpeed ZeRO flattens the weights tensor "
                "parallelism splits; use parallel.shard (FSDP2) with it"
            )
        if self.optim.kind not in ("adamw", "sgd"):
            return (
                f"{field} splits weight matrices over ranks, but optim.kind {self.optim.kind} projects whole "
                "gradient matrices; use adamw or sgd"
            )
        if m.init_from or m.upcycle_from:
            which = "model.init_from" if m.init_from else "model.upcycle_from"
            return (
                f"{field}: {which} is not supported with tensor parallelism yet; start the run at "
                f"tensor_parallel 1 and resume it at {tp}"
            )
        return None

    def _check_elastic(self) -> None:
        """Worker counts are positive, the global batch splits at every one of them, and an elastic group
        can resume after each resize."""
        res, t = self.resources, self.training
        if isinstance(res.workers, int) and res.workers < 1:
            raise ValueError(f"resources.workers: {res.workers} must be greater than 0")
        if isinstance(res.workers, WorkerRange):
            low, high = res.workers.min, res.workers.max
            if low < 1:
                raise ValueError(f"resources.workers: min is {low}; an elastic group needs at least 1 worker to train")
            if low > high:
                raise ValueError(f"resources.workers: min ({low}) exceeds max ({high})")
        pp = self.parallel.pipeline_parallel
        if pp > 1 and (res.elastic or t.global_batch is not None):
            field = "resources.workers" if res.elastic else "training.global_batch"
            raise ValueError(
                f"{field}: pipeline parallelism (parallel.pipeline_parallel {pp}) is not built for "
                f"{'elastic groups' if res.elastic else 'a derived global batch'} yet; use a fixed "
                "resources.workers with training.batch_size and training.grad_accum"
            )
        if pp > 1 and self.model.moe is not None and self.model.moe.balance_scope == "global":
            raise ValueError(
                "model.moe.balance_scope: global counts the step's routing in a forward pre-pass, which the "
                f"pipeline schedule (parallel.pipeline_parallel {pp}) does not run; use micro with pipeline parallelism"
            )
        if t.global_batch is not None:
            if t.grad_accum != 1:
                raise ValueError(
                    f"training.grad_accum: {t.grad_accum} and training.global_batch: {t.global_batch} both set the "
                    "step's size; with global_batch the accumulation is derived from the worker count (leave "
                    "grad_accum at 1 and bound the micro-batch with training.batch_size)"
                )
            uneven = [n for n in res.worker_counts if t.global_batch % n]
            if uneven:
                counts = f"{res.min_workers}-{res.max_workers}" if res.elastic else str(res.min_workers)
                whole = math.lcm(*res.worker_counts)
                raise ValueError(
                    f"training.global_batch: {t.global_batch} sequences do not split evenly over "
                    f"{', '.join(map(str, uneven))} workers (resources.workers: {counts}); use a multiple of {whole}"
                )
        if res.elastic and self.parallel.zero:
            raise ValueError(
                f"parallel.zero: DeepSpeed ZeRO ({self.parallel.zero}) checkpoints resume only at the worker count "
                f"that wrote them, so an elastic group (resources.workers: {{min: {res.min_workers}, max: "
                f"{res.max_workers}}}) could not continue after a resize; use parallel.shard: zero2 or full "
                "(FSDP2 checkpoints reshard) with parallel.zero: 0, or a fixed resources.workers"
            )

    @property
    def balance_scope(self) -> str:
        """The MoE load-balancing loss's scope: model.moe.balance_scope, or global for elastic jobs."""
        moe = self.model.moe
        chosen = moe.balance_scope if moe is not None else None
        return chosen or ("global" if self.resources.elastic else "micro")

    def batch_layout(self, workers: int) -> tuple[int, int]:
        """(micro-batch per worker, gradient accumulation) at `workers` data-parallel ranks: as given, or
        training.global_batch split into the fewest micro-batches of at most training.batch_size."""
        t = self.training
        if t.global_batch is None:
            return t.batch_size, t.grad_accum
        if t.global_batch % workers:
            raise ValueError(f"training.global_batch: {t.global_batch} does not split evenly over {workers} workers")
        per_worker = t.global_batch // workers
        accum = next(a for a in range(1, per_worker + 1) if per_worker % a == 0 and per_worker // a <= t.batch_size)
        return per_worker // accum, accum

    def sequences_per_step(self, workers: int) -> int:
        """Sequences trained on per optimizer step at `workers` data-parallel workers."""
        micro, accum = self.batch_layout(workers)
        return micro * accum * workers

    def _check_pipeline(self) -> None:
        """parallel.pipeline_parallel and parallel.pipeline against the rest of the job."""
        pp, pipe = self.parallel.pipeline_parallel, self.parallel.pipeline
        if pp == 1:
            return
        workers = self.resources.min_workers  # one count: _check_elastic refuses a pipeline in an elastic group
        if workers % pp:
            raise ValueError(f"parallel.pipeline_parallel: {pp} must divide resources.workers ({workers})")
        if self.model.kind not in ("dense", "moe"):
            raise ValueError(
                f"parallel.pipeline_parallel: {pp} splits a flat model's blocks into stages; model.kind "
                f"{self.model.kind!r} is not a flat model (dense | moe)"
            )
        if self.parallel.zero:
            raise ValueError(
                f"parallel.zero: DeepSpeed ZeRO ({self.parallel.zero}) does not combine with "
                f"parallel.pipeline_parallel ({pp}); use parallel.shard (FSDP2) with pipeline parallelism"
            )
        if self.optim.galore is not None:
            raise ValueError(
                f"optim.kind: {self.optim.kind} steps from gradient hooks, which a pipeline schedule does not "
                f"run in order; use optim.kind: adamw with parallel.pipeline_parallel ({pp})"
            )
        if self.model.tie_embeddings:
            raise ValueError(
                f"model.tie_embeddings: the embedding (first stage) and the head (last stage) would share one "
                f"weight across parallel.pipeline_parallel ({pp}) ranks; untie them"
            )
        stages = pp * pipe.virtual_stages
        if pipe.layers_per_stage is not None:
            if (
                len(pipe.layers_per_stage) != stages
                or sum(pipe.layers_per_stage) != self.model.depth
                or min(pipe.layers_per_stage) < 1
            ):
                raise ValueError(
                    f"parallel.pipeline.layers_per_stage: {pipe.layers_per_stage} must have one entry (>= 1) per "
                    f"stage ({stages} = pipeline_parallel x stages_per_rank) summing to model.depth "
                    f"({self.model.depth})"
                )
        elif self.model.depth < stages:
            raise ValueError(
                f"parallel.pipeline_parallel: {pp} x stages_per_rank {pipe.virtual_stages} = {stages} stages, but "
                f"model.depth is {self.model.depth}: every stage needs a block"
            )
        if pipe.schedule != "interleaved_1f1b" and pipe.stages_per_rank not in (None, 1):
            raise ValueError(
                f"parallel.pipeline.stages_per_rank: {pipe.stages_per_rank} needs schedule interleaved_1f1b "
                f"(a {pipe.schedule} schedule runs one stage per rank)"
            )
        if self.training.batch_size % pipe.microbatches:
            raise ValueError(
                f"parallel.pipeline.microbatches: {pipe.microbatches} must divide training.batch_size "
                f"({self.training.batch_size}, the sequences of one data-parallel replica's micro-step)"
            )
        if pipe.schedule == "1f1b" and pipe.microbatches < pp:
            raise ValueError(
                f"parallel.pipeline.microbatches: {pipe.microbatches} is fewer than the {pp} stages; schedule 1f1b "
                f"keeps every stage busy only with at least one micro-batch per stage (use >= {pp}, or gpipe)"
            )
        rounds = max(1, pipe.microbatches // pp)
        if pipe.schedule == "interleaved_1f1b" and pipe.microbatches % rounds:
            raise ValueError(
                f"parallel.pipeline.microbatches: {pipe.microbatches} must be a multiple of its rounds "
                f"({rounds} = microbatches // pipeline_parallel) for schedule interleaved_1f1b"
            )

    def data_parallel_workers(self, workers: int | None = None) -> int:
        """Workers reading their own batches at `workers` (default resources.workers, its max for an elastic
        group): the ranks of one pipeline, and of one tensor-parallel group, share one."""
        return (workers or self.resources.max_workers) // (
            self.parallel.pipeline_parallel * self.parallel.tensor_parallel
        )

    def notes(self) -> list[str]:
        """Settings that are moot for this job (often after `--set training.steps=...`): the job runs,
        and `validate` / `run` say what happens instead."""
        t, warmup = self.training, self.optim.schedule.warmup
        out = []
        if t.eval_every and t.eval_every > t.steps:
            out.append(
                f"training.eval_every: {t.eval_every} exceeds training.steps ({t.steps}): "
                f"evaluating once, at the end (step {t.steps})"
            )
        if self.checkpoint.every and self.checkpoint.every > t.steps:
            out.append(
                f"checkpoint.every: {self.checkpoint.every} exceeds training.steps ({t.steps}): "
                f"one checkpoint, at the end (step {t.steps})"
            )
        if warmup >= t.steps and t.steps > 1:
            out.append(
                f"optim.schedule.warmup: {warmup} is not below training.steps ({t.steps}): the learning "
                f"rate ends the run at {t.steps / warmup:.0%} of optim.lr, with no decay"
            )
        if self.resources.elastic and self.training.global_batch is None:
            out.append(
                "resources.workers is a range but training.global_batch is unset: each worker keeps "
                "training.batch_size, so the sequences per step (and the loss curve) change with the worker count; "
                "set training.global_batch to keep them fixed"
            )
        return out

    def tokens_per_step(self, workers: int | None = None) -> int:
        """Bytes trained on per optimizer step, over all data-parallel workers and micro-batches (at
        `workers`; default resources.workers, its max for an elastic group)."""
        return self.sequences_per_step(self.data_parallel_workers(workers)) * self.data.seq_len
