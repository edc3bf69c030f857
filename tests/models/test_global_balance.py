"""The global load-balancing loss (`model.moe.balance_scope: global`): the expert fractions f_e come
from the whole optimizer step (every micro-batch of every data-parallel rank), P_e from each
micro-batch, so the loss and its gradient equal one worker holding the whole batch.

Checked two ways: the formula against a hand computation from the router's own probabilities
(micro and global scope), and the real Trainer at 2 gloo ranks x 2 accumulated micro-batches against
one worker with the whole batch of 8: every parameter's gradient and the logged grad norm."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from shardyard import envvars
from shardyard.models.moe.accounting import moe_scope
from shardyard.models.moe.layer import MoELayer, clear_balance_counts, share_balance_counts
from shardyard.platform.spec import load_spec_text, spec_from_json
from shardyard.runtime.worker import LocalReporter, Trainer
from tests.helpers import tiny_spec_yaml
from tests.runtime.test_gradients import record_steps

E = 4


def _hand_balance(probs: torch.Tensor, counts: torch.Tensor) -> float:
    fraction = counts.double() / counts.sum()
    return float(E * (fraction * probs.double().mean(0)).sum())


def test_micro_and_global_balance_equal_the_hand_computation() -> None:
    torch.manual_seed(0)
    layer = MoELayer(width=8, hidden=16, num_experts=E, top_k=2, aux_loss_weight=1.0, z_loss_weight=0.0)
    layer.train()
    micro = [torch.randn(6, 8), torch.randn(10, 8)]  # unequal sizes: fractions weigh tokens, not batches
    probs = [torch.softmax(layer.router.gate(x), -1).detach() for x in micro]
    counts = [torch.bincount(p.topk(2, -1).indices.reshape(-1), minlength=E) for p in probs]

    for x in micro:  # micro scope: each micro-batch's own fractions, weighted 1/2 each
        with moe_scope(weight=0.5):
            layer(x).sum().backward()
    want = sum(0.5 * _hand_balance(p, c) for p, c in zip(probs, counts))
    assert abs(float(layer.take_step_stats()["balance_loss"]) - want) < 1e-6

    with torch.no_grad(), moe_scope(balance="count"):  # the trainer's pre-pass
        for x in micro:
            layer(x)
    share_balance_counts([layer])
    assert torch.equal(layer.balance_counts, (counts[0] + counts[1]).double())
    for x in micro:
        with moe_scope(weight=0.5, balance="global"):
            layer(x).sum().backward()
    total = counts[0] + counts[1]
    want_global = sum(0.5 * _hand_balance(p, total) for p in probs)
    got = float(layer.take_step_stats()["balance_loss"])
    assert abs(got - want_global) < 1e-6
    assert abs(want_global - want) > 1e-4, "the example must tell the scopes apart"
    clear_balance_counts([layer])
    assert not layer.balance_counts.any()


MODEL = (
    "{kind: moe, width: 32, depth: 2, heads: 2, ffn: {hidden: 64}, "
    "moe: {num_experts: 4, top_k: 2, aux_loss: 0.5, z_loss: 0.0, balance_scope: SCOPE}}"
)


def _spec(storage: Path, workers: int, batch_size: int, scope: str):
    text = tiny_spec_yaml(
        f"balance-{scope}-{workers}",
        storage,
        model=MODEL.replace("SCOPE", scope),
        training=f"{{steps: 2, batch_size: {batch_size}, global_batch: 8, eval_every: 0, eval_bytes: 2048}}",
        resources=f"{{workers: {workers}, cpus_per_worker: 1, max_failures: 0}}",
        optim="{kind: sgd, lr: 3.0e-2, grad_clip: 0, momentum: 0.9, schedule: {warmup: 1}}",
    )
    return load_spec_text(text)


def _rank(topology, spec_json: str, out: str) -> None:
    os.environ.update(
        RANK=str(topology.rank),
        WORLD_SIZE=str(topology.world_size),
        LOCAL_RANK=str(topology.local_rank),
        **{envvars.FAKE_RANKS_PER_NODE: str(topology.ranks_per_node)},
    )
    spec = spec_from_json(spec_json)
    run_dir = Path(out) / spec.name
    trainer = Trainer(spec, run_dir, LocalReporter(run_dir, 1))
    assert (trainer.micro_batch, trainer.accum) == (2, 2)
    torch.save(record_steps(trainer, 2), Path(out) / f"rank{topology.rank}.pt")


def test_global_balance_at_dp2_x_accum2_equals_one_worker_holding_the_batch(tmp_path: Path) -> None:
    from shardyard.comm.launch import spawn

    one = _spec(tmp_path, 1, 8, "global")
    trainer = Trainer(one, tmp_path / "one", LocalReporter(tmp_path / "one", 1))
    assert (trainer.micro_batch, trainer.accum, trainer.global_balance) == (8, 1, False)
    want = record_steps(trainer, 2)

    spawn(_rank, 2, 2, _spec(tmp_path, 2, 2, "global").model_dump_json(), str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for step in range(2):
            assert abs(got[step]["grad_norm"] - want[step]["grad_norm"]) <= 1e-4 * want[step]["grad_norm"]
            for name, grad in want[step]["grads"].items():
                torch.testing.assert_close(got[step]["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
