"""Tokenizers: bytes (the default), a HF `tokenizers` tokenizer.json, or byte-level BPE trained here.

Bits per byte need to know how many bytes each token covers: `token_byte_lengths` gives it per id.
For byte-level tokenizers (the BPE trained here, GPT-2 style tokenizer.json files) it is exact: each
token string maps back to bytes through the ByteLevel alphabet. For other tokenizers it is the UTF-8
length of the token decoded on its own. Special tokens cover 0 bytes.

`tokenizers` is imported lazily: a byte run never loads it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardyard.data.storage import filesystem
from shardyard.platform.errors import UserError
from shardyard.platform.locations import is_remote, local_path
from shardyard.platform.schema import DataSpec

BYTES = "bytes"


def dtype_for(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def read_tokenizer_file(location: str) -> str:
    """tokenizer.json text (local path or URL)."""
    try:
        if is_remote(location):
            fs, path = filesystem(location)
            with fs.open(path, "rb") as f:
                return f.read().decode("utf-8")
        with open(local_path(location), "rb") as f:
            return f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"data.tokenizer: cannot read {location!r} ({err})") from None


def vocab_size_for(data: DataSpec) -> int:
    """The model's vocabulary for data.tokenizer: 256 for bytes, N for bpe:N (the trained tokenizer may
    use fewer ids on a small corpus; the model keeps N rows), the file's size for a tokenizer.json."""
    if data.tokenizer == BYTES:
        return 256
    if data.tokenizer.startswith("bpe:"):
        return int(data.tokenizer[4:])
    return Tokenizer.from_json(read_tokenizer_file(data.tokenizer)).vocab_size


@dataclass
class Tokenizer:
    """Bytes -> token ids. `hf_json` is None for the byte tokenizer."""

    vocab_size: int
    hf_json: str | None = None
    _hf: Any = None

    @staticmethod
    def bytes() -> Tokenizer:
        return Tokenizer(256)

    @staticmethod
    def from_json(text: str, vocab_size: int | None = None) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_str(text)
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            raise UserError(f"data.tokenizer: not a HF tokenizers tokenizer.json ({err})") from None
        size = hf.get_vocab_size(with_added_tokens=True)
        if vocab_size is not None and size > vocab_size:
            raise UserError(f"data.tokenizer: the tokenizer has {size} ids, more than the model's {vocab_size}")
        return Tokenizer(vocab_size or size, text, hf)

    @property
    def is_bytes(self) -> bool:
        return self.hf_json is None

    @property
    def dtype(self) -> np.dtype:
        return dtype_for(self.vocab_size)

    def hf(self) -> Any:
        if self._hf is None and self.hf_json is not None:
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_str(self.hf_json)
        return self._hf

    def encode(self, docs: list[bytes]) -> list[np.ndarray]:
        """Each document's token ids (documents are UTF-8 for a text tokenizer; checked by the sources)."""
        if self.is_bytes:
            return [np.frombuffer(d, dtype=np.uint8) for d in docs]
        encodings = self.hf().encode_batch([d.decode("utf-8") for d in docs], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.dtype) for e in encodings]

    def token_byte_lengths(self) -> np.ndarray:
        """int32 [vocab_size]: bytes each token id covers (0 for special and unused ids)."""
        if self.is_bytes:
            return np.ones(256, dtype=np.int32)
        from tokenizers import decoders, pre_tokenizers

        hf = self.hf()
        byte_level = isinstance(hf.pre_tokenizer, pre_tokenizers.ByteLevel) or isinstance(
            hf.decoder, decoders.ByteLevel
        )
        alphabet = _byte_level_decoder() if byte_level else {}
        special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(hf.get_vocab_size(with_added_tokens=True)):
            token = hf.id_to_token(i)
            if token is None or token in special:
                continue
            if byte_level and all(c in alphabet for c in token):
                lengths[i] = len(token)
            else:
                lengths[i] = len(hf.decode([i], skip_special_tokens=False).encode("utf-8"))
        return lengths


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values -> the byte (what ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (every byte value in the alphabet, so any text encodes) trained on `texts`;
    deterministic for the same texts in the same order."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(vocab_size, hf.to_str(), hf)
