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

`fit` finds non-negative constants by weighted least squares (relative error) on the testbed's
measurements; `b_inter` is fitted as an efficiency factor times 1/link rate, so one fit covers
all link rates. `plan` turns a JobSpec into a table of predicted times and a recommendation.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ALGORITHMS = ("flat", "hierarchical", "leader")
TERMS = ("stage", "intra_msg", "intra_byte", "inter_msg", "inter_byte", "copy_byte")
CONSTANTS_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "alltoall-cost-model.json"


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
        return np.array([self.alpha_stage, self.alpha_intra, self.beta_intra, self.alpha_inter,
                         self.beta_inter, self.beta_copy])


# Used when benchmarks/results/alltoall-cost-model.json is absent: the 2026-11-25 testbed fit
# (gloo over TCP, CPU, 1 Gbit/s links); see benchmarks/results/2026-11-25-alltoall-netns.md.
DEFAULT_FIT: dict[str, Any] = {
    "alpha_stage": 5.08e-4, "alpha_intra": 0.0, "beta_intra": 0.0, "alpha_inter": 7.62e-5,
    "inter_efficiency": 1.141, "beta_copy": 2.21e-9, "rate_mbit": 1000.0,
}

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


def predict(algo: str, nodes: int, ranks_per_node: int, bytes_per_rank: float, link: LinkParams,
            cpu_share: float = 1.0) -> float:
    return float(features(algo, nodes, ranks_per_node, bytes_per_rank, cpu_share) @ link.vector())


def crossover_bytes(nodes: int, ranks_per_node: int, link: LinkParams, algo: str = "hierarchical",
                    cpu_share: float = 1.0) -> float | None:
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


# ---------------------------------------------------------------------------------------- fitting
@dataclass
class Fit:
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
        return LinkParams(self.alpha_stage, self.alpha_intra, self.beta_intra, self.alpha_inter,
                          self.inter_efficiency / rate, self.beta_copy, f"testbed fit @ {rate_mbit or self.rate_mbit:g} Mbit/s")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_fit(path: Path | None = None) -> Fit:
    path = path or CONSTANTS_PATH
    data = json.loads(path.read_text()) if path.exists() else DEFAULT_FIT
    return Fit(**{k: v for k, v in data.items() if k in Fit.__dataclass_fields__})


def load_measurements(path: Path) -> list[dict[str, Any]]:
    """Medians per (algo, nodes, rpn, rate, size) from benchmarks/alltoall.py's JSON lines."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            t = r["total_s"]
            q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
            share = r["nodes"] * r["rpn"] / r.get("cpu_count", 2)
            out.append({**{k: r[k] for k in ("algo", "nodes", "rpn", "rate_mbit", "bytes_per_rank")},
                        "cpu_share": max(1.0, share), "median_s": statistics.median(t), "q1_s": q[0], "q3_s": q[2]})
    return out


def _design(points: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    rows = []
    for p in points:
        f = features(p["algo"], p["nodes"], p["rpn"], p["bytes_per_rank"], p.get("cpu_share", 1.0)).astype(float)
        f[4] /= p["rate_mbit"] * 1e6 / 8  # inter bytes in seconds at line rate -> efficiency factor
        rows.append(f)
    return np.array(rows), np.array([p["median_s"] for p in points])


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares by trying every support set (6 terms: 64 small solves)."""
    best, best_err = np.zeros(a.shape[1]), float(np.sum(y ** 2))
    for k in range(1, a.shape[1] + 1):
        for support in itertools.combinations(range(a.shape[1]), k):
            cols = list(support)
            coef, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if np.all(coef >= 0):
                err = float(np.sum((a[:, cols] @ coef - y) ** 2))
                if err < best_err:
                    best_err, best = err, np.zeros(a.shape[1])
                    best[cols] = coef
    return best


def fit(points: list[dict[str, Any]], rate_mbit: float = 1000.0) -> Fit:
    """Weighted (relative-error) non-negative least squares of the TERMS constants."""
    x, t = _design(points)
    scale = x.max(axis=0)
    scale[scale == 0] = 1.0
    w = 1.0 / t
    coef = _nnls((x / scale) * w[:, None], np.ones_like(t)) / scale
    f = Fit(*map(float, coef), rate_mbit=rate_mbit)
    pred = x @ coef
    f.points = [{**p, "predicted_s": float(q), "rel_error": float(q / p["median_s"] - 1)}
                for p, q in zip(points, pred)]
    return f


# --------------------------------------------------------------------------------------- reporting
def scale_table(link: LinkParams, tokens: list[int], hiddens: list[int], nodes: tuple[int, ...] = (8, 64, 512),
                gpus_per_node: int = 8, top_k: int = 2, bytes_per_elem: int = 2) -> list[dict[str, Any]]:
    rows = []
    for n, tok, h in itertools.product(nodes, tokens, hiddens):
        b = tok * top_k * h * bytes_per_elem
        t = {a: predict(a, n, gpus_per_node, b, link) for a in ALGORITHMS}
        rows.append({"nodes": n, "gpus_per_node": gpus_per_node, "tokens": tok, "hidden": h,
                     "bytes_per_rank": b, **{f"{a}_s": v for a, v in t.items()}})
    return rows


def _fmt_table(rows: list[dict[str, Any]]) -> str:
    out = ["| nodes x gpus | tokens/rank | hidden | MiB/rank | flat ms | hier ms | leader ms | hier/flat | best |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = min(ALGORITHMS, key=lambda a: r[f"{a}_s"])
        out.append(f"| {r['nodes']}x{r['gpus_per_node']} | {r['tokens']} | {r['hidden']} | "
                   f"{r['bytes_per_rank'] / 2**20:.2f} | {1e3 * r['flat_s']:.3f} | {1e3 * r['hierarchical_s']:.3f} | "
                   f"{1e3 * r['leader_s']:.3f} | {r['hierarchical_s'] / r['flat_s']:.2f} | {best} |")
    return "\n".join(out)


def fit_report(measurements: Path, results_dir: Path, plot: bool = True) -> str:
    """Fit, save the constants JSON and the plots, and return a markdown report."""
    points = load_measurements(measurements)
    f = fit(points)
    (results_dir / CONSTANTS_PATH.name).write_text(json.dumps(f.to_json(), indent=1) + "\n")
    errs = [abs(p["rel_error"]) for p in f.points]
    lines = ["## Fitted constants", "",
             f"alpha_stage {f.alpha_stage * 1e3:.3f} ms, alpha_intra {f.alpha_intra * 1e3:.3f} ms/msg, "
             f"beta_intra {f.beta_intra * 1e9:.3f} ns/B ({1 / f.beta_intra / 1e6 if f.beta_intra else float('inf'):.0f} MB/s), "
             f"alpha_inter {f.alpha_inter * 1e3:.3f} ms/msg, inter efficiency {f.inter_efficiency:.3f} x line rate, "
             f"beta_copy {f.beta_copy * 1e9:.3f} ns/B", "",
             f"model vs measured medians: {sum(e <= 0.25 for e in errs)}/{len(errs)} points within 25%, "
             f"median |error| {100 * statistics.median(errs):.1f}%, max {100 * max(errs):.1f}%", "",
             "| algo | nodes x rpn | Mbit/s | KiB/rank | measured ms | model ms | error |", "|---|---|---|---|---|---|---|"]
    for p in sorted(f.points, key=lambda p: (p["nodes"], p["rate_mbit"], p["bytes_per_rank"], p["algo"])):
        lines.append(f"| {p['algo']} | {p['nodes']}x{p['rpn']} | {p['rate_mbit']:g} | {p['bytes_per_rank'] // 1024} | "
                     f"{1e3 * p['median_s']:.2f} | {1e3 * p['predicted_s']:.2f} | {100 * p['rel_error']:+.0f}% |")
    lines += ["", "## Crossover (hierarchical faster than flat below this many bytes per rank)", ""]
    for (n, rpn, rate) in sorted({(p["nodes"], p["rpn"], p["rate_mbit"]) for p in points}):
        meas = sorted((p["bytes_per_rank"], p["median_s"]) for p in points
                      if (p["nodes"], p["rpn"], p["rate_mbit"], p["algo"]) == (n, rpn, rate, "hierarchical"))
        flat = {b: t for b, t in ((p["bytes_per_rank"], p["median_s"]) for p in points
                                  if (p["nodes"], p["rpn"], p["rate_mbit"], p["algo"]) == (n, rpn, rate, "flat"))}
        wins = [b // 1024 for b, t in meas if t < flat[b]]
        share = next(p["cpu_share"] for p in f.points if (p["nodes"], p["rpn"]) == (n, rpn))
        c = crossover_bytes(n, rpn, f.link(rate), cpu_share=share)
        lines.append(f"- {n}x{rpn} @ {rate:g} Mbit/s: measured hierarchical < flat at KiB/rank {wins or 'none'}; "
                     f"model crossover {_fmt_bytes(c)}")
    lines += ["", "## What the plan would have picked on the testbed", ""]
    keys = sorted({(p["nodes"], p["rpn"], p["rate_mbit"], p["bytes_per_rank"]) for p in f.points})
    for margin in (0.9, 1.0):
        worst_hier, regrets = None, []
        for key in keys:
            pts = {p["algo"]: p for p in f.points if (p["nodes"], p["rpn"], p["rate_mbit"], p["bytes_per_rank"]) == key}
            rec = recommend({a: q["predicted_s"] for a, q in pts.items()}, margin)
            meas = {a: q["median_s"] for a, q in pts.items()}
            regrets.append((meas[rec] / min(meas.values()), key, rec))
            if rec == "hierarchical":
                r = meas["hierarchical"] / meas["flat"]
                worst_hier = r if worst_hier is None else max(worst_hier, r)
        worst = max(regrets)
        picks = {a: sum(r[2] == a for r in regrets) for a in ALGORITHMS}
        lines.append(f"- margin {margin}: picks {picks}; measured time of the pick / best measured: median "
                     f"{statistics.median(r[0] for r in regrets):.2f}x, worst {worst[0]:.2f}x ({worst[1][0]}x{worst[1][1]} @ "
                     f"{worst[1][2]:g} Mbit/s, {worst[1][3] // 1024} KiB/rank); "
                     + ("hierarchical picked nowhere" if worst_hier is None else
                        f"where hierarchical was picked its measured time was at most {worst_hier:.2f}x flat's"))
    for name, link in (("testbed fit @ 1 Gbit/s", f.link(1000)), ("testbed fit @ 100 Gbit/s", f.link(100_000)),
                       (GPU_CLUSTER.name, GPU_CLUSTER)):
        lines += ["", f"## Predictions at scale, {name} (top-2, bf16)", "",
                  _fmt_table(scale_table(link, [1024, 8192], [1024, 4096]))]
        lines.append("")
        lines.append("crossover (hierarchical < flat below): " + ", ".join(
            f"{n}x8: {_fmt_bytes(crossover_bytes(n, 8, link))}" for n in (8, 64, 512)))
    if plot:
        lines += ["", f"plot: {plot_fit(f, results_dir)}"]
    return "\n".join(lines)


def _fmt_bytes(b: float | None) -> str:
    if b is None:
        return "never"
    if math.isinf(b):
        return "always"
    return f"{b / 1024:.0f} KiB/rank" if b < 2**20 else f"{b / 2**20:.1f} MiB/rank"


def plot_fit(f: Fit, results_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(p["nodes"], p["rpn"], p["rate_mbit"]) for p in f.points})
    ncols = 3
    nrows = math.ceil((len(configs) + 1) / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    axes = [list(grid.flat)]
    for ax in axes[0][len(configs) + 1:]:
        ax.remove()
    axes = [axes[0][:len(configs) + 1]]
    colors = {"flat": "C0", "hierarchical": "C1", "leader": "C2"}
    for ax, (n, rpn, rate) in zip(axes[0], configs):
        link = f.link(rate)
        share = next(p["cpu_share"] for p in f.points if (p["nodes"], p["rpn"]) == (n, rpn))
        xs = np.logspace(np.log10(8 * 1024), np.log10(8 * 2**20), 60)
        for a in ALGORITHMS:
            pts = [p for p in f.points if (p["nodes"], p["rpn"], p["rate_mbit"], p["algo"]) == (n, rpn, rate, a)]
            b = np.array([p["bytes_per_rank"] for p in pts])
            med = np.array([p["median_s"] for p in pts]) * 1e3
            err = np.array([[p["median_s"] - p["q1_s"], p["q3_s"] - p["median_s"]] for p in pts]).T * 1e3
            ax.errorbar(b, med, yerr=err, fmt="o", color=colors[a], ms=4, capsize=2, label=f"{a} measured")
            ax.plot(xs, [1e3 * predict(a, n, rpn, x, link, share) for x in xs], "-", color=colors[a], lw=1, label=f"{a} model")
        ax.set(xscale="log", yscale="log", xlabel="bytes per rank", ylabel="dispatch ms",
               title=f"testbed {n} nodes x {rpn}, {rate:g} Mbit/s")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    ax = axes[0][-1]
    xs = np.logspace(np.log10(64 * 1024), np.log10(256 * 2**20), 60)
    for n, style in ((8, ":"), (64, "--"), (512, "-")):
        for a in ALGORITHMS:
            ax.plot(xs, [1e3 * predict(a, n, 8, x, GPU_CLUSTER) for x in xs], style, color=colors[a],
                    lw=1, label=f"{a} {n}x8")
    ax.set(xscale="log", yscale="log", xlabel="bytes per rank", ylabel="dispatch ms",
           title="predicted, gpu-cluster (assumed) constants")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = results_dir / "2026-11-25-alltoall-netns.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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

    def render(self) -> str:
        lines = [f"all-to-all plan: {self.nodes} nodes x {self.gpus_per_node} GPUs, expert_parallel {self.expert_parallel}, "
                 f"{self.bytes_per_rank / 2**20:.2f} MiB per rank per dispatch, {self.exchanges_per_step} exchanges per step",
                 f"link constants: {self.link.name}", "",
                 f"{'algorithm':<13} {'per dispatch':>14} {'per step':>12} {'vs flat':>8}"]
        flat = next(r for r in self.rows if r["algo"] == "flat")["dispatch_s"]
        for r in self.rows:
            lines.append(f"{r['algo']:<13} {1e3 * r['dispatch_s']:>11.3f} ms {1e3 * r['step_s']:>9.1f} ms "
                         f"{r['dispatch_s'] / flat:>7.2f}x")
        lines += ["", f"recommendation: parallel.a2a = {self.recommendation}  ({self.reason})"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan(spec: Any, nodes: int, gpus_per_node: int, link: LinkParams | None = None,
         expert_parallel: int | None = None, margin: float = 0.9, constants: Path | None = None) -> PlanResult:
    """Predict flat / hierarchical / leader for `spec` (a JobSpec) on nodes x gpus_per_node ranks.

    The EP group is `expert_parallel` (default spec.parallel.expert_parallel; when that is 1 the
    whole world, as a what-if). Bytes per rank per dispatch = batch_size * seq_len * top_k * width *
    (2 for bf16, 4 for fp32); a step runs 4 dispatch-sized exchanges per MoE layer (dispatch and
    combine, forward and backward). `link` defaults to the testbed fit (benchmarks/results/
    alltoall-cost-model.json, or built-in defaults). A non-flat algorithm is recommended only when
    predicted to take at most `margin` of flat's time; otherwise flat (the robust default).
    """
    world = nodes * gpus_per_node
    notes: list[str] = []
    ep = expert_parallel or spec.parallel.expert_parallel
    if ep <= 1:
        ep = world
        notes.append(f"the spec has parallel.expert_parallel 1 (no all-to-all); planned EP over all {world} ranks as a what-if")
    if world % ep:
        raise ValueError(f"expert_parallel ({ep}) must divide nodes x gpus_per_node ({world})")
    link = link or load_fit(constants).link()
    moe = spec.model.moe
    if moe and moe.num_experts % ep:
        notes.append(f"model.moe.num_experts ({moe.num_experts}) is not a multiple of expert_parallel ({ep}): "
                     "the job as written cannot use this EP degree")
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
        rec, reason = "flat", (f"no algorithm predicted below {margin:.2f}x flat "
                               f"(best {best}: {times[best] / times['flat']:.2f}x)")
    return PlanResult(nodes, gpus_per_node, ep, b, 4 * moe_layers, link, rows, rec, reason, notes)
