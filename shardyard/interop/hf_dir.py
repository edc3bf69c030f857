"""Hugging Face model directories: write one tensor at a time (safetensors, sharded with an index
above a size limit; config.json, generation_config.json, the byte tokenizer), and read rows of one
tensor by file offset (safetensors' lazy slices), so neither direction holds the whole model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from shardyard.interop.families import Family, Layout, Rows, from_hf, hf_config, layouts, rows_of, to_hf
from shardyard.platform.schema import ModelSpec

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


# ------------------------------------------------------------------------------------------ writing
def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_hf(
    out: Path,
    family: Family,
    m: ModelSpec,
    shapes: dict[str, tuple[int, ...]],
    read: Callable[[str], torch.Tensor],
    *,
    vocab_size: int,
    seq_len: int,
    dtype: str = "fp32",
    max_shard_bytes: int = 2 * 1024**3,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write `m`'s weights in `family` to `out`, reading one shardyard tensor at a time (`read(key)`;
    `shapes`: key -> shape of every tensor the model holds). Returns the safetensors files written."""
    torch_dtype = DTYPES[dtype]
    maps, zeros = layouts(family, m, vocab_size)
    # Laid out on the meta device first: names and shapes of every HF tensor, grouped per shardyard key.
    groups: list[tuple[str | None, list[tuple[str, torch.dtype, tuple[int, ...]]]]] = []
    for key, layout in maps.items():
        meta = torch.empty(shapes[key], device="meta")
        groups.append((key, [(n, torch_dtype, tuple(t.shape)) for n, t in to_hf(layout, meta)]))
    for name, shape in zeros.items():
        groups.append((None, [(name, torch_dtype, shape)]))
    shards: list[list[int]] = [[]]
    size = 0
    element = torch.empty((), dtype=torch_dtype).element_size()
    for g, (_, entries) in enumerate(groups):
        group_bytes = sum(torch.Size(s).numel() * element for _, _, s in entries)
        if shards[-1] and size + group_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += group_bytes
    out.mkdir(parents=True, exist_ok=True)
    files = []
    weight_map: dict[str, str] = {}
    total = 0
    for s, members in enumerate(shards):
        fname = SINGLE if len(shards) == 1 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [e for g in members for e in groups[g][1]]
        with open(out / fname, "wb") as f:
            f.write(_header(entries, {"format": "pt", **(metadata or {})}))
            for g in members:
                key, expected = groups[g]
                if key is None:
                    tensors = iter([(expected[0][0], torch.zeros(expected[0][2], dtype=torch_dtype))])
                else:  # lazily: one HF piece of the tensor alive at a time
                    tensors = to_hf(maps[key], read(key).detach().to("cpu", torch.float32))
                for (name, tensor), (want, _, shape) in zip(tensors, expected, strict=True):
                    assert name == want and tuple(tensor.shape) == shape, (name, want, tensor.shape, shape)
                    data = tensor.to(torch_dtype).contiguous()
                    f.write(memoryview(data.view(torch.uint8).numpy()))  # no bytes copy
                    weight_map[name] = fname
                    total += data.numel() * data.element_size()
        files.append(out / fname)
    if len(shards) > 1:
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = hf_config(family, m, vocab_size, seq_len, DTYPE_NAMES[dtype])
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    generation = {"_from_model_config": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return files


def byte_tokenizer_json() -> dict[str, Any]:
    """A 256-token byte-level tokenizer (no merges): token id = byte value, through AutoTokenizer too."""
    from shardyard.data.tokenize import _byte_level_decoder

    vocab = dict(sorted(_byte_level_decoder().items(), key=lambda item: item[1]))  # stand-in char -> byte
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def write_tokenizer(out: Path, tokenizer_json: dict[str, Any] | str) -> None:
    """tokenizer.json (a dict, or the text of a run's own file) plus a tokenizer_config.json that makes
    AutoTokenizer load it as a PreTrainedTokenizerFast."""
    text = tokenizer_json if isinstance(tokenizer_json, str) else json.dumps(tokenizer_json, ensure_ascii=False)
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 30,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ reading
class HFCheckpoint:
    """An HF model directory opened lazily: rows of one tensor read by file offset."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        if not (self.dir / CONFIG).exists():
            raise FileNotFoundError(f"{self.dir}: no config.json (not a Hugging Face model directory)")
        self.config: dict[str, Any] = json.loads((self.dir / CONFIG).read_text())
        if (self.dir / INDEX).exists():
            self.weight_map: dict[str, str] = json.loads((self.dir / INDEX).read_text())["weight_map"]
        elif (self.dir / SINGLE).exists():
            from safetensors import safe_open

            with safe_open(str(self.dir / SINGLE), "pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise FileNotFoundError(f"{self.dir}: no {SINGLE} or {INDEX}")
        self._open: dict[str, Any] = {}
        self.bytes_read = 0

    def names(self) -> set[str]:
        return set(self.weight_map)

    def _file(self, name: str):
        from safetensors import safe_open

        fname = self.weight_map[name]
        if fname not in self._open:
            self._open[fname] = safe_open(str(self.dir / fname), "pt")
        return self._open[fname]

    def read(self, name: str, lo: int = 0, hi: int = -1) -> torch.Tensor:
        """Rows [lo, hi) of tensor `name` (hi -1: to the end), as float32."""
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {name!r} missing")
        piece = self._file(name).get_slice(name)
        t = piece[lo:] if hi == -1 else piece[lo:hi]
        self.bytes_read += t.numel() * t.element_size()
        return t.to(torch.float32)

    def close(self) -> None:
        self._open.clear()


def read_rows(ckpt: HFCheckpoint, layout: Layout, lo: int, hi: int) -> torch.Tensor:
    return from_hf(layout, ckpt.read, lo, hi)


def full_tensor(ckpt: HFCheckpoint, layout: Layout) -> torch.Tensor:
    return from_hf(layout, ckpt.read, 0, rows_of(layout))


def check_zero_tensors(ckpt: HFCheckpoint, zeros: Iterable[str]) -> None:
    """HF tensors shardyard has no place for must be zero (an o_proj bias beside q/k/v biases)."""
    for name in zeros:
        if name.endswith("shared_expert_gate.weight"):
            continue  # only written as zero by export; an imported Qwen2-MoE keeps its gate
        t = ckpt.read(name)
        if t.abs().max() > 0:
            raise ValueError(
                f"{ckpt.dir}: {name} is non-zero, but the spec has no place for it (an o_proj bias, or a "
                "selection bias without router aux_free)"
            )


__all__ = ["HFCheckpoint", "Rows", "byte_tokenizer_json", "full_tensor", "read_rows", "write_hf", "write_tokenizer"]
