"""A latency-bandwidth cost model of flat, hierarchical and leader all-to-all, fitted to the testbed.

One `dispatch` (count exchange + rows) of B bytes per rank over N nodes x L ranks per node costs

    T = a_stage * stages                      synchronising collective stages (wake-ups, barriers)
      + a_intra * m_intra + b_intra * v_intra  intra-node messages / bytes on a rank's critical path
      + a_inter * m_inter + b_inter * v_inter  inter-node messages per rank / bytes per node uplink
      + b_copy * v_copy                        local block reordering (memory copies)

with, for uniform routing (each rank sends B/P to each of the P = N*L ranks):

    algorithm     stages  m_intra     m_inter      v_intra         v_inter          v_copy
    flat          2       2(L-1)      2L(N-1)      B(L-1)/P        L*B*(N-1)/N      0
    hierarchical  4       2(L-1)      2(N-1)       B(L-1)/L        L*B*(N-1)/N      2B
    leader        6       4(L-1)      2(N-1)       2(L-1)B         L*B*(N-1)/N      2LB

(factors of 2: the count exchange takes the same path as the rows.) Every algorithm puts the same
bytes on a node's uplink; hierarchical and leader trade L-fold fewer, L-fold larger inter-node
messages for an extra intra-node stage. Hence hierarchical wins when messages are small and many:
small B, many nodes, a high per-message latency.

On the testbed every process shares 2 CPU cores, so the stage and message terms are multiplied by
ranks per core (`cpu_share`); on a cluster (a core per rank) the factor is 1.

The constants come from the testbed (`alltoall_cost_model.json` beside this module, package data):
benchmarks/alltoall_fit.py fits them by weighted non-negative least squares to the measurements of
benchmarks/alltoall.py and writes that file; `b_inter` is fitted as an efficiency factor times
1/link rate, so one fit covers all link rates. `plan` turns a JobSpec into a table of predicted
times and a recommendation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shardyard.comm.alltoall import ALGORITHMS
from shardyard.comm.groups import largest_expert_parallel
from shardyard.comm.topology import Topology

TERMS = ("stage", "intra_msg", "intra_byte", "inter_msg", "inter_byte", "copy_byte")
CONSTANTS_PATH = Path(__file__).with_name("alltoall_cost_model.json")  # package data


@dataclass(frozen=True)
class LinkParams:
    """Seconds per stage / message / byte. beta_inter is per byte on one node's uplink."""

    alpha_stage: float
    alpha_intra: float
    beta_intra: float
    alpha_inter: float
    beta_inter: float
    beta_copy: float
    name: str = "custom"

    def vector(self) -> np.ndarray:
        return np.array(
            [self.alpha_stage, self.alpha_intra, self.beta_intra, self.alpha_inter, self.beta_inter, self.beta_copy]
        )


@dataclass
class Fit:
    """The fitted constants (benchmarks/alltoall_fit.py); `points` holds the fit's measurements there."""

    alpha_stage: float
    alpha_intra: float
    beta_intra: float
    alpha_inter: float
    inter_efficiency: float  # beta_inter = inter_efficiency / (link rate in bytes/s)
    beta_copy: float
    rate_mbit: float = 1000.0  # the link rate `link()` assumes by default
    points: list[dict[str, Any]] = field(default_factory=list)

    def link(self, rate_mbit: float | None = None) -> LinkParams:
        rate = (rate_mbit or self.rate_mbit) * 1e6 / 8
        return LinkParams(
            self.alpha_stage,
            self.alpha_intra,
            self.beta_intra,
            self.alpha_inter,
            self.inter_efficiency / rate,
            self.beta_copy,
            f"testbed fit @ {rate_mbit or self.rate_mbit:g} Mbit/s",
        )

    def constants(self) -> dict[str, Any]:
        """What the package data file holds: the constants without the measurements."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "points"}


def load_fit(path: Path | None = None) -> Fit:
    """The constants in `path` (default: the package's alltoall_cost_model.json)."""
    data = json.loads((path or CONSTANTS_PATH).read_text())
    return Fit(**{k: v for k, v in data.items() if k in Fit.__dataclass_fields__})


# An assumption, not a measurement: 8 GPUs/node, NVLink inside (~150 GB/s per GPU, ~3 us per
# message), 8 x 400 Gbit/s NICs per node (~400 GB/s per node, ~10 us per message), ~20 us per
# collective stage, HBM copies at ~1 TB/s. For what-if tables only.
GPU_CLUSTER = LinkParams(20e-6, 3e-6, 1 / 150e9, 10e-6, 1 / 400e9, 1 / 1e12, "gpu-cluster (assumed)")


CPU_TERMS = (0, 1, 3)  # per-stage and per-message costs: each needs a process scheduled on a core


def features(algo: str, nodes: int, ranks_per_node: int, bytes_per_rank: float, cpu_share: float = 1.0) -> np.ndarray:
    """Counts of each TERMS quantity for one dispatch (see the module docstring).

    `cpu_share` = ranks per CPU core (>= 1): on the testbed all P ranks share 2 cores, so every
    wake-up (stage, message) waits for P/2 processes' turns; on a cluster each rank has its own
    core(s): 1. (Scaling the byte terms too fitted the testbed worse: 74% vs 75% of points within
    25%, max error 74% vs 69%.)
    """
    f = _features(algo, nodes, ranks_per_node, bytes_per_rank)
    f[list(CPU_TERMS)] *= max(1.0, cpu_share)
    return f


def _features(algo: str, nodes: int, ranks_per_node: int, bytes_per_rank: float) -> np.ndarray:
    n, l, b = nodes, ranks_per_node, float(bytes_per_rank)
    p = n * l
    inter = l * b * (n - 1) / n
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo!r}")
    if algo == "flat" or n == 1 or l == 1:  # one node, or one rank per node: all are flat
        return np.array([2, 2 * (l - 1), b * (l - 1) / p, 2 * l * (n - 1), inter, 0.0])
    if algo == "hierarchical":
        return np.array([4, 2 * (l - 1), b * (l - 1) / l, 2 * (n - 1), inter, 2 * b])
    return np.array([6, 4 * (l - 1), 2 * (l - 1) * b, 2 * (n - 1), inter, 2 * l * b])  # leader


def predict(
    algo: str, nodes: int, ranks_per_node: int, bytes_per_rank: float, link: LinkParams, cpu_share: float = 1.0
) -> float:
    return float(features(algo, nodes, ranks_per_node, bytes_per_rank, cpu_share) @ link.vector())


def crossover_bytes(
    nodes: int, ranks_per_node: int, link: LinkParams, algo: str = "hierarchical", cpu_share: float = 1.0
) -> float | None:
    """Bytes per rank below which `algo` is predicted faster than flat (None: never; inf: always)."""
    f0, f1 = (features(a, nodes, ranks_per_node, 0.0, cpu_share) for a in ("flat", algo))
    g0 = features("flat", nodes, ranks_per_node, 1.0, cpu_share) - f0
    g1 = features(algo, nodes, ranks_per_node, 1.0, cpu_share) - f1
    v = link.vector()
    a_flat, a_alg, s_flat, s_alg = f0 @ v, f1 @ v, g0 @ v, g1 @ v
    if a_alg >= a_flat:  # per-byte cost is never lower than flat's (same uplink bytes, more copies)
        return None
    if s_alg <= s_flat:
        return math.inf
    return float((a_flat - a_alg) / (s_alg - s_flat))


# ------------------------------------------------------------------------------------------ plan
def recommend(times: dict[str, float], margin: float = 0.9) -> str:
    """flat unless another algorithm is predicted to take at most `margin` of flat's time."""
    best = min(times, key=times.__getitem__)
    return best if best != "flat" and times[best] <= margin * times["flat"] else "flat"


@dataclass
class PlanResult:
    nodes: int
    gpus_per_node: int
    expert_parallel: int
    bytes_per_rank: int
    exchanges_per_step: int
    link: LinkParams
    rows: list[dict[str, Any]]  # per algorithm: seconds per dispatch and per step
    recommendation: str
    reason: str
    notes: list[str] = field(default_factory=list)


def plan(
    spec: Any,
    nodes: int,
    gpus_per_node: int,
    link: LinkParams | None = None,
    expert_parallel: int | None = None,
    margin: float = 0.9,
    constants: Path | None = None,
) -> PlanResult:
    """Predict flat / hierarchical / leader for `spec` (a JobSpec) on nodes x gpus_per_node ranks.

    The EP group is `expert_parallel` (default spec.parallel.expert_parallel; when that is 1 the
    whole world, as a what-if). Bytes per rank per dispatch = batch_size * seq_len * top_k * width *
    (2 for bf16, 4 for fp32); a step runs 4 dispatch-sized exchanges per MoE layer (dispatch and
    combine, forward and backward). `link` defaults to the testbed fit (the package's
    alltoall_cost_model.json, or the `constants` file given). A non-flat algorithm is recommended only when
    predicted to take at most `margin` of flat's time; otherwise flat (the robust default).
    """
    world = nodes * gpus_per_node
    notes: list[str] = []
    ep = expert_parallel or spec.parallel.expert_parallel
    if ep == "auto":  # what an elastic group at this world size would pick
        experts = spec.model.moe.num_experts if spec.model.moe else 1
        ep = largest_expert_parallel(Topology.from_rank(0, world, gpus_per_node), experts)
        notes.append(f"parallel.expert_parallel auto: EP {ep} at {nodes} x {gpus_per_node} ranks")
    if ep <= 1:
        ep = world
        notes.append(
            f"the spec has parallel.expert_parallel 1 (no all-to-all); planned EP over all {world} ranks as a what-if"
        )
    if world % ep:
        raise ValueError(f"expert_parallel ({ep}) must divide nodes x gpus_per_node ({world})")
    link = link or load_fit(constants).link()
    moe = spec.model.moe
    if moe and moe.num_experts % ep:
        notes.append(
            f"model.moe.num_experts ({moe.num_experts}) is not a multiple of expert_parallel ({ep}): "
            "the job as written cannot use this EP degree"
        )
    top_k = moe.top_k if moe else 1
    moe_layers = spec.model.depth // (moe.every if moe else 1)
    elem = 2 if spec.training.precision == "bf16" else 4
    b = spec.training.batch_size * spec.data.seq_len * top_k * spec.model.width * elem
    per_node = min(gpus_per_node, ep)
    ep_nodes = ep // per_node
    rows = []
    for a in ALGORITHMS:
        t = predict(a, ep_nodes, per_node, b, link)
        rows.append({"algo": a, "dispatch_s": t, "step_s": t * 4 * moe_layers})
    times = {r["algo"]: r["dispatch_s"] for r in rows}
    best = min(ALGORITHMS, key=times.__getitem__)
    if ep_nodes == 1:
        rec, reason = "flat", "the EP group fits in one node: all three algorithms are the same exchange"
    elif recommend(times, margin) != "flat":
        rec, reason = best, f"predicted {times[best] / times['flat']:.2f}x flat's time"
    elif best == "flat":
        rec, reason = "flat", "flat is predicted fastest"
    else:
        rec, reason = (
            "flat",
            (f"no algorithm predicted below {margin:.2f}x flat (best {best}: {times[best] / times['flat']:.2f}x)"),
        )
    return PlanResult(nodes, gpus_per_node, ep, b, 4 * moe_layers, link, rows, rec, reason, notes)
