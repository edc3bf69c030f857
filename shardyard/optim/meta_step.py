"""One training step run on meta tensors, with its memory counted (no data, no real memory).

`MetaMemoryMode` is a TorchDispatchMode that sees every tensor created while it is active:

- live bytes: each new storage adds its bytes and subtracts them when the storage is freed (weakref
  finalizer); `peak` is the largest sum seen, relative to the tensors that existed before. This is
  what a step allocates on top of the model (activations kept for backward, recomputed blocks under
  activation checkpointing, gradients, optimizer state and the optimizer's temporaries).
- values of the small integer tensors a forward branches on: meta tensors have none, so token
  routing (`bincount` of the expert ids, i.e. the router's `expert_counts`, `.tolist()` of expert offsets,
  capacity masks) would fail.
  `bincount` returns a balanced count (every expert gets the same number of assignments, the
  expectation a memory prediction wants); ops whose inputs all carry such values are computed on the
  CPU next to the meta result ("shadows"); a boolean mask with a shadow indexes through its nonzero
  positions. Floating tensors never get shadows: their values would cost what the step costs.

`fused_attention()` makes attention on meta tensors the fused kernel a real run uses (see there).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from shardyard.models.moe.router import EXPERT_COUNTS_OP

aten = torch.ops.aten
SHADOW_LIMIT = 1 << 22  # elements: larger integer tensors stay meta-only


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def distinct_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind `tensors` (meta or real; views and ties count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _small_integral(t: torch.Tensor) -> bool:
    return (not t.is_floating_point() and not t.is_complex()) and t.numel() <= SHADOW_LIMIT


class MetaMemoryMode(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shadows: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    # ------------------------------------------------------------------------------ live bytes
    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def _track(self, out: Any, inputs: set[int]) -> None:
        """Count the new storages among `out` (views and out= results share an input's storage)."""
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._tracked or key in inputs:
                continue
            self._tracked.add(key)
            nbytes = storage.nbytes()
            self.live += nbytes
            weakref.finalize(storage, self._free, key, nbytes)
        self.peak = max(self.peak, self.live)

    # ------------------------------------------------------------------------------ values
    def _meta_of(self, value: Any) -> Any:
        def one(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            self.shadows[meta] = t
            return meta

        return tree_map(one, value)

    def _shadow(self, value: Any) -> Any:
        return tree_map(lambda t: self.shadows[t] if isinstance(t, torch.Tensor) and t in self.shadows else t, value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = self._run_op(func, args, kwargs)
        inputs = {storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        self._track(out, inputs)
        return out

    def _run_op(self, func, args: tuple, kwargs: dict) -> Any:  # noqa: ANN001
        if func in (aten.bincount.default, EXPERT_COUNTS_OP):
            ids = args[0]
            if func is EXPERT_COUNTS_OP:
                minlength = args[1]
            else:
                minlength = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
            if ids in self.shadows:
                return self._meta_of(torch.bincount(self.shadows[ids], minlength=minlength))
            bins = max(int(minlength), 1)
            n = ids.numel()
            counts = torch.full((bins,), n // bins, dtype=torch.int64)
            counts[: n % bins] += 1
            return self._meta_of(counts)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        metas = [t for t in tensors if t.device.type == "meta"]
        if metas and (
            func is aten._local_scalar_dense.default
            or (func is aten._to_copy.default and str(kwargs.get("device", "meta")) != "meta")
        ):
            if metas[0] not in self.shadows:
                raise RuntimeError(f"{func}: a value of a meta tensor without a shadow is needed")
            return func(*self._shadow(args), **self._shadow(kwargs))
        if func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool and i in self.shadows for i in args[1]
        ):
            indices: list = []
            for i in args[1]:
                if isinstance(i, torch.Tensor) and i.dtype == torch.bool and i in self.shadows:
                    indices.extend(self._meta_of(list(self.shadows[i].nonzero(as_tuple=True))))
                else:
                    indices.append(i)
            return func(args[0], indices)
        mutable = func._schema.is_mutable
        if metas and not mutable and all(t in self.shadows for t in metas):
            return self._meta_of(func(*self._shadow(args), **self._shadow(kwargs)))
        out = func(*args, **kwargs)
        if mutable:
            for t in metas:
                self.shadows.pop(t, None)
        elif not metas and isinstance(out, torch.Tensor) and out.device.type == "meta" and _small_integral(out):
            # a factory (arange, zeros) of integers: its values are known
            cpu_kwargs = dict(kwargs, device="cpu")
            try:
                return self._meta_of(func(*args, **cpu_kwargs))
            except (RuntimeError, TypeError):
                return out
        return out


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """`F.scaled_dot_product_attention` on meta tensors as the fused (flash) kernel the CPU and GPU
    backends pick for causal attention without a mask: on meta, torch would pick the math kernel,
    which keeps the T x T attention weights for backward that no real run keeps."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):  # noqa: ANN001
        gqa = kwargs.pop("enable_gqa", False)
        if query.device.type != "meta" or attn_mask is not None or kwargs or query.shape[-1] != value.shape[-1]:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=gqa, **kwargs)
        if gqa and key.shape[-3] != query.shape[-3]:  # kv heads shared by groups of query heads
            groups = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return flash(query, key, value, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
