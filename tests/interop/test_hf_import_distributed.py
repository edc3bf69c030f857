"""`model.init_from` under real gloo plans: EP 2 and FSDP2 over 2 ranks and the composed EP 2 x FSDP2
over 4 start from the HF weights (their losses equal the one-worker run's) while each rank reads only
its share of the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardyard.comm.launch import spawn
from shardyard.runtime.hf_import import init_from_hf
from shardyard.runtime.worker import LocalReporter, Trainer
from tests.helpers import train_losses
from tests.interop.test_hf_import import imported_spec, tiny_hf
from tests.runtime.test_parallel_plans import _rank_env

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _train_counting(topology, spec_json: str, run_dir: str, out: str) -> None:
    from shardyard.platform.spec import spec_from_json

    _rank_env(topology)
    spec = spec_from_json(spec_json)
    trainer = Trainer(spec, Path(run_dir), LocalReporter(Path(run_dir), 2))
    counts = init_from_hf(trainer.model, spec, 256)  # what the Trainer did, counted (same values)
    Path(out, f"rank{topology.rank}.json").write_text(json.dumps(counts))
    trainer.fit()


def run_counting(spec, run_dir: Path, ranks_per_node: int) -> tuple[list[float], list[dict]]:
    out = run_dir.parent / f"{run_dir.name}-counts"
    out.mkdir(parents=True)
    world = spec.resources.workers
    spawn(_train_counting, world, ranks_per_node, spec.model_dump_json(), str(run_dir), str(out))
    counts = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return list(train_losses(run_dir).values()), counts


def test_init_from_under_ep_fsdp_and_composed_reads_a_share_and_trains_like_one_worker(tmp_path: Path) -> None:
    hf_dir, _ = tiny_hf(tmp_path, "mixtral")
    no_aux = ["model.moe.aux_loss=0.0", "model.moe.z_loss=0.0", "optim.lr=3e-3"]
    single, (one,) = run_counting(imported_spec(tmp_path, hf_dir, 1, no_aux), tmp_path / "one", 1)
    total = one["bytes_read"]
    cases = {
        "ep2": (2, ["parallel.expert_parallel=2"], 2),
        "fsdp2": (2, ["parallel.shard=full"], 2),
        "composed": (4, ["parallel.expert_parallel=2", "parallel.shard=full"], 2),
    }
    measured = {"world1": total}
    for name, (world, overrides, per_node) in cases.items():
        spec = imported_spec(tmp_path, hf_dir, world, no_aux + overrides)
        losses, counts = run_counting(spec, tmp_path / name, per_node)
        assert losses == pytest.approx(single, rel=1e-4, abs=1e-5), name
        per_rank = [c["bytes_read"] for c in counts]
        measured[name] = per_rank
        assert sum(per_rank) < world * total  # nobody reads everything ...
        assert max(per_rank) < 0.8 * total, (name, per_rank, total)  # ... and no rank reads most of it
    assert single[-1] < single[0]
    (tmp_path / "bytes_read.json").write_text(json.dumps(measured))
    print("init_from bytes read per rank:", json.dumps(measured))


def _ep_gradients_against_transformers(topology, spec_json: str, hf_dir: str, tmp: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import transformers

    from shardyard.interop import FAMILIES, from_hf, layouts
    from shardyard.interop.hf_dir import HFCheckpoint
    from shardyard.models.moe.experts import is_expert_shard
    from shardyard.platform.spec import spec_from_json
    from shardyard.runtime.hf_import import owned_rows

    _rank_env(topology)
    spec = spec_from_json(spec_json)
    rank, world = topology.rank, topology.world_size
    trainer = Trainer(spec, Path(tmp) / f"run{rank}", LocalReporter(Path(tmp) / f"run{rank}", 2))
    model = trainer.model.eval()  # eval: no aux loss, no jitter; gradients still flow
    x = torch.randint(0, 256, (world, 64), generator=torch.Generator().manual_seed(5))
    targets = torch.roll(x, -1, 1)
    _, ce = trainer.module(x[rank : rank + 1], targets[rank : rank + 1])
    ce.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if not is_expert_shard(p):  # dense: the world-mean loss's gradient (experts: EP brought every token home)
            dist.all_reduce(g)
        grads[name] = g / world

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    loss = F.cross_entropy(hf(input_ids=x).logits.view(-1, 256), targets.reshape(-1))
    loss.backward()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.grad)
    if rank == 0:  # transformers saves from the main process only
        hf.save_pretrained(str(Path(tmp) / "grads"))
    dist.barrier()
    reference = HFCheckpoint(Path(tmp) / "grads")
    maps, _ = layouts(FAMILIES["mixtral"], spec.model, 256)
    for name, p in model.named_parameters():
        lo, hi, _ = owned_rows(model, name, p)
        want = from_hf(maps[name], reference.read, lo, hi)
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert any(is_expert_shard(p) for p in model.parameters())  # the experts really were sharded


def test_ep2_gradients_equal_transformers_reference_moe(tmp_path: Path) -> None:
    """transformers' Mixtral as an independent oracle for dispatch, grouped GEMM and the EP all-to-all:
    one backward under EP 2 on gloo (each rank half the batch) equals HF's gradients within 1e-5."""
    hf_dir, _ = tiny_hf(tmp_path, "mixtral")
    spec = imported_spec(tmp_path, hf_dir, 2, ["parallel.expert_parallel=2", "model.moe.aux_loss=0.0"])
    spawn(_ep_gradients_against_transformers, 2, 2, spec.model_dump_json(), str(hf_dir), str(tmp_path))
