"""Cost model: features, fit recovers known constants, crossover, plan() on a JobSpec."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from shardyard.comm import cost_model as cm
from shardyard.platform.schema import JobSpec

TRUE = cm.LinkParams(2e-3, 3e-4, 2e-9, 6e-4, 1.1 / (200e6 / 8), 1e-9)


def _points(link: cm.LinkParams) -> list[dict]:
    pts = []
    for algo in cm.ALGORITHMS:
        for nodes in (2, 4):
            for b in (16 * 1024, 256 * 1024, 4 * 2**20):
                pts.append({"algo": algo, "nodes": nodes, "rpn": 2, "rate_mbit": 200.0, "bytes_per_rank": b,
                            "median_s": cm.predict(algo, nodes, 2, b, link), "q1_s": 0, "q3_s": 0})
    return pts


def test_features_degenerate_to_flat() -> None:
    for algo in cm.ALGORITHMS:
        assert (cm.features(algo, 1, 8, 1e6) == cm.features("flat", 1, 8, 1e6)).all()
        assert (cm.features(algo, 4, 1, 1e6) == cm.features("flat", 4, 1, 1e6)).all()
    with pytest.raises(ValueError):
        cm.features("ring", 2, 2, 1.0)


def test_fit_recovers_constants() -> None:
    fit = cm.fit(_points(TRUE), rate_mbit=200.0)
    assert max(abs(p["rel_error"]) for p in fit.points) < 1e-6
    assert fit.link().vector() == pytest.approx(TRUE.vector(), rel=1e-4, abs=1e-12)


def test_crossover_matches_predictions() -> None:
    c = cm.crossover_bytes(64, 8, cm.GPU_CLUSTER)
    assert c is not None and math.isfinite(c)
    below = cm.predict("hierarchical", 64, 8, 0.5 * c, cm.GPU_CLUSTER) < cm.predict("flat", 64, 8, 0.5 * c, cm.GPU_CLUSTER)
    above = cm.predict("hierarchical", 64, 8, 2 * c, cm.GPU_CLUSTER) > cm.predict("flat", 64, 8, 2 * c, cm.GPU_CLUSTER)
    assert below and above


def test_plan(tmp_path: Path) -> None:
    spec = JobSpec(name="p", model={"kind": "moe", "width": 1024, "heads": 8, "depth": 4,
                                    "moe": {"num_experts": 64, "top_k": 2}},
                   training={"batch_size": 1, "precision": "bf16"},
                   data={"seq_len": 1024}, parallel={"expert_parallel": 64}, resources={"workers": 512})
    res = cm.plan(spec, nodes=64, gpus_per_node=8, link=cm.GPU_CLUSTER)
    assert res.bytes_per_rank == 1024 * 2 * 1024 * 2
    assert res.expert_parallel == 64 and res.exchanges_per_step == 16
    assert {r["algo"] for r in res.rows} == set(cm.ALGORITHMS)
    assert res.recommendation in cm.ALGORITHMS and "recommendation" in res.render()
    # an EP group inside one node: nothing to choose
    assert cm.plan(spec, 64, 8, link=cm.GPU_CLUSTER, expert_parallel=8).recommendation == "flat"
    # constants file absent -> built-in defaults; present -> loaded
    assert cm.plan(spec, 8, 8, constants=tmp_path / "none.json").link.name.startswith("testbed")
    f = cm.fit(_points(TRUE), rate_mbit=200.0)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(f.to_json()))
    assert cm.load_fit(path).alpha_inter == pytest.approx(TRUE.alpha_inter, rel=1e-4)
