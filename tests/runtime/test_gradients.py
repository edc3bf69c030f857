"""Per-parameter gradients of every parallel and accumulation path against one worker holding the
whole batch: gradient accumulation (one process), DDP on 2 gloo ranks, expert parallelism 2, and the
composed FSDP2 x EP mode on 4 gloo ranks.

Clipping is off (optim.grad_clip 0), so the gradient the optimizer sees is the reduced gradient
itself. Under SGD the update is -lr x gradient, so a constant scale of the gradient (accumulation
not averaged, a reduction divided by the wrong size) shows in the weights too; under AdamW it does
not (Adam divides it out), which is why both run. Compared at each of the first two optimizer
steps: every parameter's gradient (elementwise, rtol 1e-4, and the norm of the whole gradient to a
relative 1e-4), the grad norm the gradient step returns (the one the worker logs as `grad_norm`, computed
before clipping), and every parameter's update.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from shardyard import envvars
from shardyard.platform.spec import load_spec_text, spec_from_json
from shardyard.runtime.worker import LocalReporter, Trainer
from tests.helpers import adam_update_bound, tiny_spec_yaml

# aux/z losses off: they depend on how the global batch is split between ranks (see test_parallel_plans).
MODEL = "{kind: moe, width: 64, depth: 2, heads: 2, ffn: {hidden: 128}, moe: {num_experts: 4, top_k: 2, aux_loss: 0.0, z_loss: 0.0}}"
GLOBAL_BATCH, STEPS = 8, 2
OPTIMIZERS = ("sgd", "adamw")
# mode -> (workers, grad_accum, expert_parallel, shard, ranks per node)
MODES = {
    "single": (1, 1, 1, "none", 1),
    "accum4": (1, 4, 1, "none", 1),
    "ddp2": (2, 1, 1, "none", 2),
    "ep2": (2, 1, 2, "none", 2),
    "ep2xfsdp4": (4, 1, 2, "full", 2),
}


def job(storage: Path, mode: str, optim: str):
    world, accum, ep, shard, _ = MODES[mode]
    text = tiny_spec_yaml(
        f"{mode}-{optim}",
        storage,
        model=MODEL,
        training=f"{{steps: {STEPS}, batch_size: {GLOBAL_BATCH // (world * accum)}, grad_accum: {accum}, "
        "eval_every: 0, eval_bytes: 2048}",
        resources=f"{{workers: {world}, cpus_per_worker: 1, max_failures: 0}}",
        # a momentum buffer makes the second SGD step depend on the first gradient's scale too
        optim=f"{{kind: {optim}, lr: 3.0e-2, grad_clip: 0{', momentum: 0.9' if optim == 'sgd' else ''}, "
        "schedule: {warmup: 1}}",
    )
    return load_spec_text(text, overrides=[f"parallel.expert_parallel={ep}", f"parallel.shard={shard}"])


def record_steps(trainer: Trainer, steps: int) -> list[dict[str, Any]]:
    """The one helper that reaches into the Trainer: run `steps` optimizer steps and return, per step,
    the gradients the optimizer saw, the weights before and after, and the grad norm the gradient
    step returned. Tensors are whole (FSDP2 shards gathered: collective) under canonical names;
    expert-parallel shards stay this rank's block, keyed "<name>@<ep rank>/<ep>"."""
    from torch.distributed.tensor import DTensor

    from shardyard.models.moe.experts import is_expert_shard

    dims = trainer.dims
    ep = dims.ep
    ep_rank = dims.expert_groups.ep_rank if dims.ep_enabled else 0

    def snapshot(kind: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in trainer.model.named_parameters():
            t = p.grad if kind == "grad" else p.detach()
            if t is None:
                continue
            t = t.full_tensor() if isinstance(t, DTensor) else t
            key = name + (f"@{ep_rank}/{ep}" if is_expert_shard(p) else "")
            out[key] = t.detach().float().clone()
        return out

    names = {id(p): name for name, p in trainer.model.named_parameters()}

    def hyper() -> dict[str, dict[str, Any]]:
        """Each parameter's optimizer settings at this step (lr, weight decay, and Adam's betas, eps)."""
        return {
            names[id(p)]: {k: group.get(k) for k in ("lr", "weight_decay", "betas", "eps")}
            for group in trainer.optimizer.param_groups
            for p in group["params"]
            if id(p) in names
        }

    records: list[dict[str, Any]] = []
    seen: list[tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]] = []
    handle = trainer.optimizer.register_step_pre_hook(lambda *_: seen.append((snapshot("grad"), hyper())))
    try:
        for _ in range(steps):
            before = snapshot("weight")
            grad_norm = float(trainer.train_step()["grad_norm"])
            records.append({"before": before, "after": snapshot("weight"), "grad_norm": grad_norm})
    finally:
        handle.remove()
    assert len(seen) == steps, "one optimizer step per training step"
    for record, (grads, settings) in zip(records, seen):
        record["grads"], record["hyper"] = grads, settings
    return records


def _rank(topology, specs: list[str], out: str) -> None:
    os.environ.update(
        RANK=str(topology.rank),
        WORLD_SIZE=str(topology.world_size),
        LOCAL_RANK=str(topology.local_rank),
        **{envvars.FAKE_RANKS_PER_NODE: str(topology.ranks_per_node)},
    )
    for spec_json in specs:
        spec = spec_from_json(spec_json)
        run_dir = Path(out) / spec.name
        records = record_steps(Trainer(spec, run_dir, LocalReporter(run_dir, 1)), STEPS)
        torch.save(records, Path(out) / f"{spec.name}-rank{topology.rank}.pt")


def run_mode(tmp_path: Path, mode: str) -> dict[str, list[list[dict[str, Any]]]]:
    """optimizer -> per rank, the records of record_steps."""
    world, *_, per_node = MODES[mode]
    specs = [job(tmp_path, mode, optim) for optim in OPTIMIZERS]
    if world == 1:
        return {
            optim: [record_steps(Trainer(spec, tmp_path / spec.name, LocalReporter(tmp_path / spec.name, 1)), STEPS)]
            for optim, spec in zip(OPTIMIZERS, specs)
        }
    from shardyard.comm.launch import spawn

    spawn(_rank, world, per_node, [s.model_dump_json() for s in specs], str(tmp_path))
    return {
        optim: [torch.load(tmp_path / f"{spec.name}-rank{r}.pt") for r in range(world)]
        for optim, spec in zip(OPTIMIZERS, specs)
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """One worker, the whole batch of 8, no accumulation: optimizer -> records."""
    runs = run_mode(tmp_path_factory.mktemp("reference"), "single")
    return {optim: ranks[0] for optim, ranks in runs.items()}


def _expected(full: torch.Tensor, key: str) -> tuple[str, torch.Tensor]:
    """The reference tensor for a record key: an expert shard "<name>@r/ep" is block r of ep (dim 0)."""
    if "@" not in key:
        return key, full
    shard = key.split("@")[1]
    r, ep = (int(x) for x in shard.split("/"))
    per = full.shape[0] // ep
    return key, full[r * per : (r + 1) * per]


def assert_same_tensors(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str, rtol: float, floor: float | None = None
) -> None:
    """Every tensor of `got` (expert shards included) equals the reference's, elementwise within rtol
    (plus an absolute floor of `floor` (default rtol) x the tensor's largest entry) and in norm within rtol."""
    assert {k.split("@")[0] for k in got} == set(want), (what, sorted(got), sorted(want))
    for key, value in got.items():
        _, expect = _expected(want[key.split("@")[0]], key)
        scale = float(expect.abs().max())
        atol = (rtol if floor is None else floor) * scale + 1e-12
        torch.testing.assert_close(value, expect, rtol=rtol, atol=atol, msg=lambda m: f"{what} {key}: {m}")
        ratio = float(value.norm()) / max(float(expect.norm()), 1e-30)
        assert abs(ratio - 1) <= rtol, (what, key, ratio)


def update_bound(got: list[dict[str, Any]], ref: list[dict[str, Any]], step: int, key: str) -> torch.Tensor:
    """adam_update_bound for one recorded tensor at `step`, with the reference's hyperparameters."""
    name = key.split("@")[0]
    settings = ref[step]["hyper"][name]
    weights = _expected(ref[step]["before"][name], key)[1]
    return adam_update_bound(
        [got[s]["grads"][key] for s in range(step + 1)],
        [_expected(ref[s]["grads"][name], key)[1] for s in range(step + 1)],
        (got[step]["before"][key] - weights).abs(),
        weights,
        **settings,
    )


def assert_adam_updates_explained(got: list[dict[str, Any]], ref: list[dict[str, Any]], step: int, what: str) -> None:
    """Every element of every AdamW update at `step` equals the reference's within adam_update_bound
    (tests.helpers): as far as the recorded gradient differences explain."""
    for key in got[step]["after"]:
        name = key.split("@")[0]
        update = (got[step]["after"][key] - got[step]["before"][key]).double()
        want = (_expected(ref[step]["after"][name], key)[1] - _expected(ref[step]["before"][name], key)[1]).double()
        excess = (update - want).abs() / update_bound(got, ref, step, key)
        worst = int(excess.argmax())
        assert float(excess.max()) <= 1.0, (
            what,
            key,
            worst,
            float(update.flatten()[worst]),
            float(want.flatten()[worst]),
        )


@pytest.mark.parametrize(
    "mode",
    [
        "accum4",
        pytest.param(
            "ddp2",
            marks=[
                pytest.mark.slow,
                pytest.mark.distributed,
            ],
        ),
        pytest.param("ep2", marks=[pytest.mark.slow, pytest.mark.distributed]),
        pytest.param("ep2xfsdp4", marks=[pytest.mark.slow, pytest.mark.distributed]),
    ],
)
def test_per_parameter_gradients_equal_the_single_worker(tmp_path: Path, reference: dict, mode: str) -> None:
    runs = run_mode(tmp_path, mode)
    for optim in OPTIMIZERS:
        want = reference[optim]
        for rank, records in enumerate(runs[optim]):
            assert len(records) == STEPS
            for step, (got, ref) in enumerate(zip(records, want)):
                what = f"{mode} {optim} rank {rank} step {step + 1}"
                assert_same_tensors(got["grads"], ref["grads"], f"{what} gradient", 1e-4)
                # the gradient step's norm (logged as grad_norm) is the whole reduced gradient's, before clipping
                whole = torch.stack([g.double().norm() for g in ref["grads"].values()]).norm()
                assert ref["grad_norm"] == pytest.approx(float(whole), rel=1e-5), what
                assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), what
                updates = {k: got["after"][k] - got["before"][k] for k in got["after"]}
                ref_updates = {k: ref["after"][k] - ref["before"][k] for k in ref["after"]}
                if optim == "sgd":  # update = -lr x (momentum of) gradient: the scale shows
                    assert_same_tensors(updates, ref_updates, f"{what} update", 1e-4)
                else:  # Adam divides the scale out: each element may differ only as its gradients explain
                    assert_adam_updates_explained(records, want, step, f"{what} update")


def test_sgd_kind_is_plain_torch_sgd() -> None:
    from shardyard.optim import build_optimizer
    from shardyard.optim.memory import optimizer_memory_report
    from shardyard.platform.schema import OptimSpec

    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(OptimSpec(kind="sgd", lr=0.5, momentum=0.9, weight_decay=0.0), model)
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.9
    before = model.weight.detach().clone()
    model.weight.grad, model.bias.grad = torch.ones(3, 4), torch.ones(3)
    opt.step()
    torch.testing.assert_close(model.weight.detach(), before - 0.5)  # -lr x gradient
    assert optimizer_memory_report(OptimSpec(kind="sgd", momentum=0.9), model)["optimizer_state_bytes"] == 15 * 4
    assert optimizer_memory_report(OptimSpec(kind="sgd"), model)["optimizer_state_bytes"] == 0
