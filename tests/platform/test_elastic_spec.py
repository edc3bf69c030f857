"""Elastic job specs: the global batch split at every worker count, the EP degree `auto` picks, and
the validation messages (each names its field, the file and the line)."""

from __future__ import annotations

import pytest

from shardyard.comm.groups import largest_expert_parallel
from shardyard.comm.topology import Topology
from shardyard.platform.errors import SpecError
from shardyard.platform.spec import load_spec_text
from tests.helpers import tiny_spec_yaml

ELASTIC = "{workers: {min: 2, max: 4}, cpus_per_worker: 1, max_failures: 1}"


def spec(*overrides: str, resources: str = ELASTIC, training: str | None = None):
    sections = {"resources": resources}
    if training:
        sections["training"] = training
    return load_spec_text(tiny_spec_yaml("elastic", "/tmp/unused", **sections), "job.yaml", list(overrides))


def test_the_global_batch_splits_into_the_fewest_micro_batches_that_fit_batch_size() -> None:
    s = spec(training="{steps: 8, batch_size: 3, global_batch: 12}")
    assert [s.batch_layout(n) for n in (2, 3, 4)] == [(3, 2), (2, 2), (3, 1)]
    assert all(s.sequences_per_step(n) == 12 for n in (2, 3, 4))
    big = spec(training="{steps: 8, batch_size: 8, global_batch: 24}")
    assert [big.batch_layout(n) for n in (2, 3, 4)] == [(6, 2), (8, 1), (6, 1)]
    fixed = spec(resources="{workers: 2}", training="{steps: 8, batch_size: 4, grad_accum: 3}")
    assert fixed.batch_layout(2) == (4, 3) and fixed.tokens_per_step() == 2 * 4 * 3 * 64


def test_expert_parallel_auto_takes_the_largest_degree_the_world_experts_and_nodes_allow() -> None:
    def auto(world: int, per_node: int, experts: int) -> int:
        return largest_expert_parallel(Topology.from_rank(0, world, per_node), experts)

    assert [auto(4, 2, 4), auto(2, 2, 4), auto(3, 3, 4), auto(4, 2, 8), auto(6, 2, 4)] == [4, 2, 1, 4, 2]
    assert auto(8, 4, 6) == 2 and auto(1, 1, 8) == 1
    assert auto(6, 3, 6) == 6 and auto(4, 4, 2) == 2  # ep and ranks per node divide one another


def test_the_balance_scope_defaults_to_global_for_elastic_jobs_only() -> None:
    assert spec().balance_scope == "global"
    assert spec(resources="{workers: 2}").balance_scope == "micro"
    assert spec("model.moe.balance_scope=micro").balance_scope == "micro"


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (["resources.workers={min: 4, max: 2}"], "resources.workers", "min (4) exceeds max (2)"),
        (["resources.workers={min: 0, max: 2}"], "resources.workers", "min is 0"),
        (["resources.workers=0"], "resources.workers", "must be greater than 0"),
        (
            ["training.global_batch=10"],
            "training.global_batch",
            "10 sequences do not split evenly over 3, 4 workers (resources.workers: 2-4); use a multiple of 12",
        ),
        (["training.global_batch=12", "training.grad_accum=2"], "training.grad_accum", "both set the step's size"),
        (
            ["model.kind=dense", "model.moe=null", "parallel.zero=1"],
            "parallel.zero",
            "resume only at the worker count that wrote them",
        ),
        (["parallel.expert_parallel=4"], "parallel.expert_parallel", "can use parallel.expert_parallel: auto"),
    ],
)
def test_elastic_specs_that_cannot_run_are_refused_naming_the_field(
    overrides: list[str], field: str, words: str
) -> None:
    with pytest.raises(SpecError) as err:
        spec(*overrides)
    message = str(err.value)
    assert f"job.yaml (--set {overrides[-1]})" in message or "job.yaml:" in message, message
    assert f"{field}: " in message and words in message, message
