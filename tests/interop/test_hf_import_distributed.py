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
    counts = init_from_hf(trainer.plan.model, spec, 256)  # what the Trainer did, counted (same values)
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
