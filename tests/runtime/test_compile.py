"""training.compile: compiled training equals eager training, and dense / local-MoE blocks compile as
one graph, as do the final norm, the head and the loss.

The runs drive the Trainer's own step (`Trainer.train_step`: parallelize with compile, the gradient
step, the optimizer) for 20 steps and compare the loss and the gradient norm before clipping of every
step with an eager single worker's, within 1e-4. Compile time dominates (inductor builds C++ kernels),
so the model is tiny and one compiled configuration covers several things at once: activation
checkpointing (the recompute runs the compiled block again) and the MoE aux loss in one worker, DDP
over 2 gloo ranks in the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shardyard.platform.spec import load_spec_text, spec_from_json
from shardyard.runtime.worker import LocalReporter, Trainer
from tests.helpers import assert_same_series, tiny_spec_yaml

STEPS, GLOBAL_BATCH = 20, 8
MOE = "{{kind: moe, width: 32, depth: 2, heads: 2, ffn: {{hidden: 64}}, moe: {{num_experts: 4, top_k: 2, aux_loss: {aux}, z_loss: {z}}}}}"


def job(
    storage: Path,
    name: str,
    world: int,
    compile_: bool,
    aux: bool,
    checkpointing: str = "none",
    tp: int = 1,
    shard: str = "none",
):
    text = tiny_spec_yaml(
        name,
        storage,
        model=MOE.format(aux=0.01 if aux else 0.0, z=0.001 if aux else 0.0),
        data="{paths: [stdlib], seq_len: 32, max_bytes: 1000000}",
        training=f"{{steps: {STEPS}, batch_size: {GLOBAL_BATCH * tp // world}, eval_every: 0, eval_bytes: 1024, "
        f"compile: {str(compile_).lower()}, activation_checkpointing: {checkpointing}}}",
        resources=f"{{workers: {world}, cpus_per_worker: 1, max_failures: 0}}",
    )
    return load_spec_text(text, overrides=[f"parallel.tensor_parallel={tp}", f"parallel.shard={shard}"])


def train(spec, run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """step -> loss and step -> grad norm (before clipping) of STEPS Trainer steps (this rank's loss)."""
    trainer = Trainer(spec, run_dir, LocalReporter(run_dir, 1))
    losses, norms = {}, {}
    for step in range(1, STEPS + 1):
        out = trainer.train_step()
        losses[step], norms[step] = float(out["ce"]), float(out["grad_norm"])
    return losses, norms


def _rank(topology, spec_json: str, out: str) -> None:
    import torch.distributed as dist

    spec = spec_from_json(spec_json)
    losses, norms = train(spec, Path(out) / spec.name)
    mean = torch.tensor([losses[s] for s in sorted(losses)], dtype=torch.float64)
    dist.all_reduce(mean)  # the global batch's loss: the mean of the ranks' (equal batch sizes)
    if topology.rank == 0:
        losses = {s: float(v) / topology.world_size for s, v in zip(sorted(losses), mean)}
        from torch._dynamo.utils import counters

        breaks = dict(counters["graph_break"])  # this rank's, whole run
        (Path(out) / "series.json").write_text(json.dumps({"loss": losses, "grad_norm": norms, "breaks": breaks}))


def train_on_ranks(spec, out: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Losses (the global batch's) and gradient norms of a run on real gloo ranks; rank 0's graph breaks
    are in `out`/series.json."""
    from shardyard.comm.launch import spawn

    spawn(_rank, spec.resources.workers, spec.resources.workers, spec.model_dump_json(), str(out))
    series = json.loads((out / "series.json").read_text())
    return tuple({int(k): v for k, v in series[key].items()} for key in ("loss", "grad_norm"))  # type: ignore[return-value]


def graph_breaks(out: Path) -> dict[str, int]:
    return json.loads((out / "series.json").read_text())["breaks"]


@pytest.mark.slow
def test_compiled_run_with_checkpointing_and_aux_loss_equals_eager(tmp_path: Path) -> None:
    eager_loss, eager_norm = train(job(tmp_path, "eager", 1, False, aux=True), tmp_path / "eager")
    spec = job(tmp_path, "compiled", 1, True, aux=True, checkpointing="full")
    loss, norm = train(spec, tmp_path / "compiled")
    assert eager_loss[STEPS] < eager_loss[1]  # it learns
    assert_same_series(loss, eager_loss, 1e-4, "loss")
    assert_same_series(norm, eager_norm, 1e-4, "grad_norm")


@pytest.mark.slow
@pytest.mark.distributed
def test_compiled_ddp2_equals_one_eager_worker(tmp_path: Path) -> None:
    # aux/z losses off: they depend on how the global batch is split between ranks
    eager_loss, eager_norm = train(job(tmp_path, "eager", 1, False, aux=False), tmp_path / "eager")
    loss, norm = train_on_ranks(job(tmp_path, "ddp2", 2, True, aux=False), tmp_path)
    assert_same_series(loss, eager_loss, 1e-4, "loss")
    assert_same_series(norm, eager_norm, 1e-4, "grad_norm")


@pytest.mark.slow
@pytest.mark.distributed
def test_compiled_fsdp2_equals_one_eager_worker(tmp_path: Path) -> None:
    """FSDP2 after compile: the per-block all-gathers and reduce-scatters run outside the compiled
    blocks, and the root's (embedding, final norm, head) around the compiled output graph."""
    eager_loss, eager_norm = train(job(tmp_path, "eager", 1, False, aux=False), tmp_path / "eager")
    loss, norm = train_on_ranks(job(tmp_path, "fsdp2", 2, True, aux=False, shard="full"), tmp_path)
    assert_same_series(loss, eager_loss, 1e-4, "loss")
    assert_same_series(norm, eager_norm, 1e-4, "grad_norm")
    assert graph_breaks(tmp_path) == {}


@pytest.mark.slow
@pytest.mark.distributed
def test_compiled_tp2_equals_one_eager_worker_moe_losses_included(tmp_path: Path) -> None:
    """Tensor parallelism, then compile (torchtitan's order): each block compiles with its DTensor
    weights and the sequence-parallel gathers and reduce-scatters in the graph; both ranks read the one
    batch, so the aux and z losses (averaged over the pair) are the single worker's."""
    eager_loss, eager_norm = train(job(tmp_path, "eager", 1, False, aux=True), tmp_path / "eager")
    loss, norm = train_on_ranks(job(tmp_path, "tp2", 2, True, aux=True, tp=2), tmp_path)
    assert_same_series(loss, eager_loss, 1e-4, "loss")
    assert_same_series(norm, eager_norm, 1e-4, "grad_norm")
    assert graph_breaks(tmp_path) == {}


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_blocks_compile_without_graph_breaks(kind: str) -> None:
    """Every op of a dense block and of an MoE block with the local dispatcher (router, expert
    counts, permutation, the expert MLP operator, the aux-loss bookkeeping) is in one graph; the
    model's output (final norm, head, cross-entropy) in another."""
    from shardyard.models import build_model
    from shardyard.models.transformer import Block

    spec = job(Path("unused"), kind, 1, True, aux=True)
    if kind == "dense":
        spec = load_spec_text(
            tiny_spec_yaml(
                "dense", Path("unused"), model="{kind: dense, width: 32, depth: 1, heads: 2, ffn: {hidden: 64}}"
            )
        )
    model = build_model(spec.model, 32, 256)
    block = next(m for m in model.modules() if isinstance(m, Block))
    rope = (model.stack.rope_cos, model.stack.rope_sin)
    x = torch.randn(2, 32, 32, requires_grad=True)
    targets = torch.randint(0, 256, (2, 32))
    for train_mode in (True, False):
        model.train(train_mode)
        for part, args in ((block, (x, rope)), (model.output, (x, targets))):  # a block; final norm, head, loss
            explained = torch._dynamo.explain(part)(*args)
            reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
            assert explained.graph_break_count == 0 and explained.graph_count == 1, (kind, train_mode, reasons)


def test_a_transport_dispatcher_runs_eagerly_between_compiled_graphs() -> None:
    """A compressed dispatch (a transport dispatcher, here at EP 1) is not traced: apply_compile marks
    its forward eager, the block splits around it, and forward and backward equal the eager block's."""
    import copy

    from shardyard.comm.token_dispatch import TransportDispatcher, build_token_dispatcher
    from shardyard.models import build_model
    from shardyard.models.moe.layer import MoELayer
    from shardyard.models.transformer import Block
    from shardyard.platform.schema import DispatchSpec
    from shardyard.runtime.parallel.parallelize import apply_compile

    spec = job(Path("unused"), "moe", 1, True, aux=True)
    torch.manual_seed(0)
    eager = build_model(spec.model, 32, 256)
    for layer in (m for m in eager.modules() if isinstance(m, MoELayer)):
        layer.dispatcher = build_token_dispatcher(4, 32, None, DispatchSpec(payload="bf16"))
    compiled = copy.deepcopy(eager)
    apply_compile([compiled], spec.training)
    dispatcher = next(m for m in compiled.modules() if isinstance(m, TransportDispatcher))
    assert "forward" in vars(dispatcher)  # the instance's eager forward, not the class's
    block, reference = (next(m for m in model.modules() if isinstance(m, Block)) for model in (compiled, eager))
    rope = (eager.stack.rope_cos, eager.stack.rope_sin)
    x = torch.randn(2, 32, 32)
    outs = []
    for b in (block, reference):
        inp = x.clone().requires_grad_(True)
        out = b(inp, rope)
        out.square().mean().backward()
        outs.append((out.detach(), inp.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)  # inductor fuses: rounding
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)
    explained = torch._dynamo.explain(reference.__class__.forward)(reference, x, rope)
    assert explained.graph_break_count >= 1  # undisabled, the dispatcher breaks the graph on its own
