"""MEGABYTE (Yu et al., 2023): a global transformer over patches and a local transformer per patch.

It is the two-stage case of `MultiscaleByteLM`, which implements, for stages (global, local):
  * patch embedder: a patch's P byte embeddings are concatenated and mapped linearly to the global
    width (the paper concatenates P embeddings of width D_G = width/P; the linear map generalises it);
  * global model: a causal transformer over the patches shifted right by one, a learned pad patch
    first, so patch k's global output has read patches < k only;
  * global -> local: patch k's global output is projected to P x local width, one slice per byte
    position, and added to the local model's inputs;
  * local model: a small causal transformer per patch over the patch's byte embeddings shifted right
    by one (a learned pad first), followed by the 256-way head.
Positions are rotary inside every stage (the paper used learned absolute positions).
"""

from __future__ import annotations

from shardyard.models.bytes.multiscale import MultiscaleByteLM, StageDims
from shardyard.models.transformer import FFNFactory


class MegabyteLM(MultiscaleByteLM):
    def __init__(
        self,
        global_stage: StageDims,
        local_stage: StageDims,
        global_ffn: FFNFactory,
        local_ffn: FFNFactory,
        global_len: int | None = None,
    ) -> None:
        """global_stage.patch_size = patches per context; local_stage.patch_size = bytes per patch."""
        super().__init__([global_stage, local_stage], [global_ffn, local_ffn], global_len)

    @property
    def patch_size(self) -> int:
        return self.dims[1].patch_size
