"""Cost model: features, fit recovers known constants, crossover, plan() on a JobSpec, and its
recommendations against the testbed's measured times."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.alltoall_fit import fit, load_measurements
from shardyard.cli.output import plan_table
from shardyard.comm import cost_model as cm
from shardyard.platform.schema import JobSpec

MEASUREMENTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "alltoall-netns.jsonl"

TRUE = cm.LinkParams(2e-3, 3e-4, 2e-9, 6e-4, 1.1 / (200e6 / 8), 1e-9)


def _points(link: cm.LinkParams) -> list[dict]:
    pts = []
    for algo in cm.ALGORITHMS:
        for nodes in (2, 4):
            for b in (16 * 1024, 256 * 1024, 4 * 2**20):
                pts.append(
                    {
                        "algo": algo,
                        "nodes": nodes,
                        "rpn": 2,
                        "rate_mbit": 200.0,
                        "bytes_per_rank": b,
                        "median_s": cm.predict(algo, nodes, 2, b, link),
                        "q1_s": 0,
                        "q3_s": 0,
                    }
                )
    return pts


def test_features_degenerate_to_flat() -> None:
    for algo in cm.ALGORITHMS:
        assert (cm.features(algo, 1, 8, 1e6) == cm.features("flat", 1, 8, 1e6)).all()
        assert (cm.features(algo, 4, 1, 1e6) == cm.features("flat", 4, 1, 1e6)).all()
    with pytest.raises(ValueError):
        cm.features("ring", 2, 2, 1.0)


def test_fit_recovers_constants() -> None:
    fitted = fit(_points(TRUE), rate_mbit=200.0)
    assert max(abs(p["rel_error"]) for p in fitted.points) < 1e-6
    assert fitted.link().vector() == pytest.approx(TRUE.vector(), rel=1e-4, abs=1e-12)


def test_crossover_matches_predictions() -> None:
    c = cm.crossover_bytes(64, 8, cm.GPU_CLUSTER)
    assert c is not None and math.isfinite(c)
    below = cm.predict("hierarchical", 64, 8, 0.5 * c, cm.GPU_CLUSTER) < cm.predict(
        "flat", 64, 8, 0.5 * c, cm.GPU_CLUSTER
    )
    above = cm.predict("hierarchical", 64, 8, 2 * c, cm.GPU_CLUSTER) > cm.predict("flat", 64, 8, 2 * c, cm.GPU_CLUSTER)
    assert below and above


def test_plan(tmp_path: Path) -> None:
    spec = JobSpec(
        name="p",
        model={"kind": "moe", "width": 1024, "heads": 8, "depth": 4, "moe": {"num_experts": 64, "top_k": 2}},
        training={"batch_size": 1, "precision": "bf16"},
        data={"seq_len": 1024},
        parallel={"expert_parallel": 64},
        resources={"workers": 512},
    )
    res = cm.plan(spec, nodes=64, gpus_per_node=8, link=cm.GPU_CLUSTER)
    assert res.bytes_per_rank == 1024 * 2 * 1024 * 2
    assert res.expert_parallel == 64 and res.exchanges_per_step == 16
    assert {r["algo"] for r in res.rows} == set(cm.ALGORITHMS)
    assert "recommendation: parallel.a2a =" in plan_table(res)
    # an EP group inside one node: nothing to choose
    assert cm.plan(spec, 64, 8, link=cm.GPU_CLUSTER, expert_parallel=8).recommendation == "flat"
    # the package's fitted constants by default; a constants file when given
    assert cm.plan(spec, 8, 8).link.name.startswith("testbed")
    assert cm.load_fit().inter_efficiency > 0
    path = tmp_path / "c.json"
    path.write_text(json.dumps(fit(_points(TRUE), rate_mbit=200.0).constants()))
    assert cm.load_fit(path).alpha_inter == pytest.approx(TRUE.alpha_inter, rel=1e-4)


def _spec(width: int, seq_len: int) -> JobSpec:
    return JobSpec(
        name="p",
        model={
            "kind": "moe",
            "width": width,
            "heads": 8,
            "depth": 2,
            "moe": {"num_experts": 512, "top_k": 2, "every": 1},
        },
        training={"batch_size": 1, "precision": "bf16"},
        data={"seq_len": seq_len},
        parallel={"expert_parallel": 512},
        resources={"workers": 512},
    )


def test_plan_recommends_the_clear_winner() -> None:
    """Where one algorithm clearly wins on the model, plan picks it: small messages over 64 nodes
    (hierarchical under half of flat's time) -> hierarchical; 128 MiB per rank over 2 nodes (flat
    at most 1/1.25 of either other) -> flat."""
    for spec, nodes, expected in ((_spec(256, 64), 64, "hierarchical"), (_spec(4096, 8192), 2, "flat")):
        res = cm.plan(spec, nodes=nodes, gpus_per_node=8, link=cm.GPU_CLUSTER, expert_parallel=nodes * 8)
        times = {a: cm.predict(a, nodes, 8, res.bytes_per_rank, cm.GPU_CLUSTER) for a in cm.ALGORITHMS}
        winner = min(times, key=times.__getitem__)
        assert winner == expected
        others = [t for a, t in times.items() if a != winner]
        assert (times[winner] <= 0.5 * times["flat"]) if winner != "flat" else (1.25 * times["flat"] <= min(others)), (
            times
        )
        assert res.recommendation == winner, plan_table(res)


def test_recommendation_against_testbed_measurements() -> None:
    """The testbed's measured medians (benchmarks/results/alltoall-netns.jsonl), the package's
    fitted constants: where one algorithm was measured clearly fastest (the runner-up took >= 1.2x
    its time) the recommendation is that algorithm; elsewhere the recommended algorithm's measured
    time is within 20% of the fastest measured."""
    constants = cm.load_fit()
    cases: dict[tuple, dict[str, float]] = {}
    shares: dict[tuple, float] = {}
    for p in load_measurements(MEASUREMENTS):
        key = (p["nodes"], p["rpn"], p["rate_mbit"], p["bytes_per_rank"])
        cases.setdefault(key, {})[p["algo"]] = p["median_s"]
        shares[key] = p["cpu_share"]
    clear = 0
    for key, measured in cases.items():
        nodes, rpn, rate, size = key
        predicted = {a: cm.predict(a, nodes, rpn, size, constants.link(rate), shares[key]) for a in cm.ALGORITHMS}
        pick = cm.recommend(predicted)
        fastest = min(measured, key=measured.__getitem__)
        runner_up = sorted(measured.values())[1]
        if runner_up >= 1.2 * measured[fastest]:
            clear += 1
            assert pick == fastest, (key, measured, predicted)
        else:
            assert measured[pick] <= 1.2 * measured[fastest], (key, measured, predicted)
    assert clear >= len(cases) // 2  # the clear cases are most of the grid, not a corner
