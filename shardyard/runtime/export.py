"""Consolidate any checkpoint (replicated, expert-parallel, FSDP2-sharded, ZeRO 1-3: any state format) into
one single-worker model: for `shardyard export` (one safetensors file plus the resolved spec),
`generate` and `eval`. Runs in one process; DCP reads every rank's chunks into full tensors."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from shardyard.data.tokenize import vocab_size_for
from shardyard.models import build_model
from shardyard.platform.errors import UserError
from shardyard.platform.run_dir import SPEC_FILE
from shardyard.platform.schema import JobSpec
from shardyard.platform.spec import load_spec
from shardyard.runtime import checkpoint as ckpt

WEIGHTS_FILE = "model.safetensors"


def resolve_checkpoint(target: Path, step: int | None = None) -> Path:
    """A checkpoint directory from a run directory (newest complete, or the one at `step`) or itself."""
    target = Path(target)
    if (target / ckpt.META_FILE).exists():
        problem = ckpt.verify_checkpoint(target, full=False)
        if problem:
            raise UserError(f"{target}: incomplete checkpoint ({problem})")
        return target
    if step is not None:
        for found_step, path in ckpt.checkpoints_newest_first(target):
            if found_step == step and ckpt.verify_checkpoint(path, full=False) is None:
                return path
        raise UserError(f"{target}: no complete checkpoint at step {step}")
    latest = ckpt.find_latest_checkpoint(target)
    if latest is None:
        raise UserError(f"{target}: neither a checkpoint directory nor a run directory holding a complete one")
    return latest


def _spec_for(checkpoint: Path) -> JobSpec:
    for candidate in (checkpoint / SPEC_FILE, checkpoint.parent / SPEC_FILE):
        if candidate.exists():
            return load_spec(candidate)
    raise UserError(
        f"{checkpoint.parent / SPEC_FILE}: missing; a run directory keeps the resolved spec beside its checkpoints"
    )


def consolidated_state(checkpoint: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of `model` (single-worker names) read from `checkpoint`, whatever wrote it."""
    from shardyard.runtime.parallel import consolidated_weights

    return consolidated_weights(checkpoint, ckpt.read_meta(checkpoint)["layout"], model)


def load_for_inference(target: Path, step: int | None = None) -> tuple[JobSpec, nn.Module]:
    """(spec, model on CPU in eval mode) from a run directory, a checkpoint, or an export directory."""
    target = Path(target)
    if (target / WEIGHTS_FILE).exists():
        from safetensors.torch import load_file

        spec = load_spec(target / SPEC_FILE)
        model = build_model(spec.model, spec.data.seq_len, vocab_size_for(spec.data))
        model.load_state_dict(load_file(str(target / WEIGHTS_FILE)))
        return spec, model.eval()
    checkpoint = resolve_checkpoint(target, step)
    spec = _spec_for(checkpoint)
    model = build_model(spec.model, spec.data.seq_len, vocab_size_for(spec.data))
    model.load_state_dict(consolidated_state(checkpoint, model))
    return spec, model.eval()


def export(target: Path, out: Path, step: int | None = None) -> Path:
    """Write `out/model.safetensors` (full single-worker weights) and `out/spec.yaml`."""
    from safetensors.torch import save_file

    checkpoint = resolve_checkpoint(target, step)
    spec, model = load_for_inference(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out / WEIGHTS_FILE),
        metadata={"step": str(ckpt.read_meta(checkpoint)["step"]), "source": str(checkpoint)},
    )
    spec_src = checkpoint / SPEC_FILE if (checkpoint / SPEC_FILE).exists() else checkpoint.parent / SPEC_FILE
    shutil.copyfile(spec_src, out / SPEC_FILE)
    return out / WEIGHTS_FILE


def export_hf(
    target: Path,
    out: Path,
    family: str = "auto",
    dtype: str = "fp32",
    step: int | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> tuple[str, list[Path]]:
    """Write a Hugging Face model directory (config.json, generation_config.json, safetensors, the
    tokenizer) that transformers loads with no custom code. Tensors stream one at a time from the
    checkpoint, whatever state format wrote it (runtime.parallel.open_weights). Returns (family, files)."""
    from shardyard.interop import Unsupported, pick_family
    from shardyard.interop.hf_dir import byte_tokenizer_json, write_hf, write_tokenizer

    checkpoint = resolve_checkpoint(target, step)
    spec = _spec_for(checkpoint)
    try:
        fam = pick_family(spec.model, family)
    except Unsupported as err:
        raise UserError(f"export --format hf: {err}") from None
    vocab = vocab_size_for(spec.data)
    with torch.device("meta"):
        meta_model = build_model(spec.model, spec.data.seq_len, vocab)
    like = meta_model.state_dict()
    meta = ckpt.read_meta(checkpoint)
    from shardyard.runtime.parallel import open_weights

    source = open_weights(checkpoint, meta["layout"])

    def read(key: str) -> torch.Tensor:
        return source.read(key, like[key])

    try:
        files = write_hf(
            out,
            fam,
            spec.model,
            {k: tuple(v.shape) for k, v in like.items()},
            read,
            vocab_size=vocab,
            seq_len=spec.data.seq_len,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            metadata={"step": str(meta["step"]), "source": str(checkpoint)},
        )
    finally:
        source.close()
    if spec.data.tokenizer == "bytes":
        write_tokenizer(out, byte_tokenizer_json())
    elif spec.data.tokenizer.startswith("bpe:"):
        write_tokenizer(out, trained_tokenizer_json(spec))
    else:
        from shardyard.data.tokenize import read_tokenizer_file

        write_tokenizer(out, read_tokenizer_file(spec.data.tokenizer))
    return fam.name, files


def trained_tokenizer_json(spec: JobSpec) -> str:
    """The BPE tokenizer a `bpe:N` run trained on: the one its prepared data holds (prepared again, with
    the same deterministic training, if the cache was cleared)."""
    from shardyard.data.prepare import ensure_prepared

    tokenizer = ensure_prepared(spec.data, parallel="local").tokenizer()
    if tokenizer.hf_json is None:
        raise UserError(f"data.tokenizer: {spec.data.tokenizer!r}, but the prepared data holds no tokenizer.json")
    return tokenizer.hf_json
