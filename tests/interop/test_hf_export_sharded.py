"""HF export from sharded checkpoints: an EP 2 and an FSDP2 checkpoint (gloo, 2 ranks) export tensor by
tensor with every expert shard present, and transformers' logits equal the consolidated model's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardyard.runtime.export import export_hf, load_for_inference
from tests.interop.test_hf_export import load_hf
from tests.runtime.test_parallel_plans import job, run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
pytest.importorskip("transformers")


@pytest.mark.parametrize(("ep", "shard"), [(2, "none"), (1, "full")], ids=["ep2", "fsdp2"])
def test_export_from_a_sharded_checkpoint(tmp_path: Path, ep: int, shard: str) -> None:
    spec = job(tmp_path, "sharded", 2, ep, shard, 2, 2)
    run(spec, tmp_path / "run")
    name, _ = export_hf(tmp_path / "run", tmp_path / "hf")
    assert name == "mixtral"
    hf = load_hf(tmp_path / "hf")
    _, model = load_for_inference(tmp_path / "run")
    experts = model.stack.blocks[0].ffn.experts.w_up
    assert experts[0].abs().sum() > 0 and experts[-1].abs().sum() > 0  # both ranks' expert shards
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(input_ids=x).logits - model(x)[0]).abs().max().item() <= 1e-5
