"""Fit the all-to-all cost model (shardyard.comm.cost_model) to benchmarks/alltoall.py's measurements,
write its constants (the package's alltoall_cost_model.json, and the results directory with the
points), and report: a markdown summary, predictions at scale and a plot.

    python benchmarks/alltoall_fit.py benchmarks/results/alltoall-netns.jsonl
    python benchmarks/alltoall_fit.py --smoke   # fits the committed measurements; writes only to a temp dir
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout's shardyard
    sys.path.insert(0, str(ROOT))

from shardyard.comm.cost_model import (  # noqa: E402 (after the sys.path set-up above)
    ALGORITHMS,
    CONSTANTS_PATH,
    GPU_CLUSTER,
    Fit,
    LinkParams,  # noqa: E402
    crossover_bytes,
    features,
    predict,
    recommend,
)

RESULTS = ROOT / "benchmarks" / "results"
RESULTS_CONSTANTS = "alltoall-cost-model.json"  # constants plus the fitted points, beside the results


def load_measurements(path: Path) -> list[dict[str, Any]]:
    """Medians per (algo, nodes, rpn, rate, size) from benchmarks/alltoall.py's JSON lines."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            t = r["total_s"]
            q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
            share = r["nodes"] * r["rpn"] / r.get("cpu_count", 2)
            out.append(
                {
                    **{k: r[k] for k in ("algo", "nodes", "rpn", "rate_mbit", "bytes_per_rank")},
                    "cpu_share": max(1.0, share),
                    "median_s": statistics.median(t),
                    "q1_s": q[0],
                    "q3_s": q[2],
                }
            )
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
    best, best_err = np.zeros(a.shape[1]), float(np.sum(y**2))
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
    f.points = [{**p, "predicted_s": float(q), "rel_error": float(q / p["median_s"] - 1)} for p, q in zip(points, pred)]
    return f


def scale_table(
    link: LinkParams,
    tokens: list[int],
    hiddens: list[int],
    nodes: tuple[int, ...] = (8, 64, 512),
    gpus_per_node: int = 8,
    top_k: int = 2,
    bytes_per_elem: int = 2,
) -> list[dict[str, Any]]:
    rows = []
    for n, tok, h in itertools.product(nodes, tokens, hiddens):
        b = tok * top_k * h * bytes_per_elem
        t = {a: predict(a, n, gpus_per_node, b, link) for a in ALGORITHMS}
        rows.append(
            {
                "nodes": n,
                "gpus_per_node": gpus_per_node,
                "tokens": tok,
                "hidden": h,
                "bytes_per_rank": b,
                **{f"{a}_s": v for a, v in t.items()},
            }
        )
    return rows


def _fmt_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| nodes x gpus | tokens/rank | hidden | MiB/rank | flat ms | hier ms | leader ms | hier/flat | best |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best = min(ALGORITHMS, key=lambda a: r[f"{a}_s"])
        out.append(
            f"| {r['nodes']}x{r['gpus_per_node']} | {r['tokens']} | {r['hidden']} | "
            f"{r['bytes_per_rank'] / 2**20:.2f} | {1e3 * r['flat_s']:.3f} | {1e3 * r['hierarchical_s']:.3f} | "
            f"{1e3 * r['leader_s']:.3f} | {r['hierarchical_s'] / r['flat_s']:.2f} | {best} |"
        )
    return "\n".join(out)


def fit_report(measurements: Path, results_dir: Path, plot: bool = True, constants_out: Path = CONSTANTS_PATH) -> str:
    """Fit, save the constants (package data, and with the points beside the results) and the plots,
    and return a markdown report."""
    points = load_measurements(measurements)
    f = fit(points)
    (results_dir / RESULTS_CONSTANTS).write_text(json.dumps(asdict(f), indent=1) + "\n")
    where = measurements.resolve()
    source = f"benchmarks/alltoall_fit.py on {where.relative_to(ROOT) if where.is_relative_to(ROOT) else where}"
    constants_out.write_text(json.dumps({"source": source, **f.constants()}, indent=1) + "\n")
    errs = [abs(p["rel_error"]) for p in f.points]
    lines = [
        "## Fitted constants",
        "",
        f"alpha_stage {f.alpha_stage * 1e3:.3f} ms, alpha_intra {f.alpha_intra * 1e3:.3f} ms/msg, "
        f"beta_intra {f.beta_intra * 1e9:.3f} ns/B ({1 / f.beta_intra / 1e6 if f.beta_intra else float('inf'):.0f} MB/s), "
        f"alpha_inter {f.alpha_inter * 1e3:.3f} ms/msg, inter efficiency {f.inter_efficiency:.3f} x line rate, "
        f"beta_copy {f.beta_copy * 1e9:.3f} ns/B",
        "",
        f"model vs measured medians: {sum(e <= 0.25 for e in errs)}/{len(errs)} points within 25%, "
        f"median |error| {100 * statistics.median(errs):.1f}%, max {100 * max(errs):.1f}%",
        "",
        "| algo | nodes x rpn | Mbit/s | KiB/rank | measured ms | model ms | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sorted(f.points, key=lambda p: (p["nodes"], p["rate_mbit"], p["bytes_per_rank"], p["algo"])):
        lines.append(
            f"| {p['algo']} | {p['nodes']}x{p['rpn']} | {p['rate_mbit']:g} | {p['bytes_per_rank'] // 1024} | "
            f"{1e3 * p['median_s']:.2f} | {1e3 * p['predicted_s']:.2f} | {100 * p['rel_error']:+.0f}% |"
        )
    lines += ["", "## Crossover (hierarchical faster than flat below this many bytes per rank)", ""]
    for n, rpn, rate in sorted({(p["nodes"], p["rpn"], p["rate_mbit"]) for p in points}):
        meas = sorted(
            (p["bytes_per_rank"], p["median_s"])
            for p in points
            if (p["nodes"], p["rpn"], p["rate_mbit"], p["algo"]) == (n, rpn, rate, "hierarchical")
        )
        flat = {
            b: t
            for b, t in (
                (p["bytes_per_rank"], p["median_s"])
                for p in points
                if (p["nodes"], p["rpn"], p["rate_mbit"], p["algo"]) == (n, rpn, rate, "flat")
            )
        }
        wins = [b // 1024 for b, t in meas if t < flat[b]]
        share = next(p["cpu_share"] for p in f.points if (p["nodes"], p["rpn"]) == (n, rpn))
        c = crossover_bytes(n, rpn, f.link(rate), cpu_share=share)
        lines.append(
            f"- {n}x{rpn} @ {rate:g} Mbit/s: measured hierarchical < flat at KiB/rank {wins or 'none'}; "
            f"model crossover {_fmt_bytes(c)}"
        )
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
        lines.append(
            f"- margin {margin}: picks {picks}; measured time of the pick / best measured: median "
            f"{statistics.median(r[0] for r in regrets):.2f}x, worst {worst[0]:.2f}x ({worst[1][0]}x{worst[1][1]} @ "
            f"{worst[1][2]:g} Mbit/s, {worst[1][3] // 1024} KiB/rank); "
            + (
                "hierarchical picked nowhere"
                if worst_hier is None
                else f"where hierarchical was picked its measured time was at most {worst_hier:.2f}x flat's"
            )
        )
    for name, link in (
        ("testbed fit @ 1 Gbit/s", f.link(1000)),
        ("testbed fit @ 100 Gbit/s", f.link(100_000)),
        (GPU_CLUSTER.name, GPU_CLUSTER),
    ):
        lines += [
            "",
            f"## Predictions at scale, {name} (top-2, bf16)",
            "",
            _fmt_table(scale_table(link, [1024, 8192], [1024, 4096])),
        ]
        lines.append("")
        lines.append(
            "crossover (hierarchical < flat below): "
            + ", ".join(f"{n}x8: {_fmt_bytes(crossover_bytes(n, 8, link))}" for n in (8, 64, 512))
        )
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
    for ax in axes[0][len(configs) + 1 :]:
        ax.remove()
    axes = [axes[0][: len(configs) + 1]]
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
            ax.plot(
                xs,
                [1e3 * predict(a, n, rpn, x, link, share) for x in xs],
                "-",
                color=colors[a],
                lw=1,
                label=f"{a} model",
            )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="bytes per rank",
            ylabel="dispatch ms",
            title=f"testbed {n} nodes x {rpn}, {rate:g} Mbit/s",
        )
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    ax = axes[0][-1]
    xs = np.logspace(np.log10(64 * 1024), np.log10(256 * 2**20), 60)
    for n, style in ((8, ":"), (64, "--"), (512, "-")):
        for a in ALGORITHMS:
            ax.plot(
                xs,
                [1e3 * predict(a, n, 8, x, GPU_CLUSTER) for x in xs],
                style,
                color=colors[a],
                lw=1,
                label=f"{a} {n}x8",
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="bytes per rank",
        ylabel="dispatch ms",
        title="predicted, gpu-cluster (assumed) constants",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = results_dir / "2026-11-25-alltoall-netns.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("measurements", type=Path, nargs="?", default=RESULTS / "alltoall-netns.jsonl")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="write the constants, points and plot to a temp dir (not the package or benchmarks/results)",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        from benchmarks.smoke import smoke_dir

        scratch = smoke_dir("alltoall_fit")
        constants = scratch / CONSTANTS_PATH.name
        print(fit_report(args.measurements, scratch, plot=not args.no_plot, constants_out=constants))
        return
    print(fit_report(args.measurements, RESULTS, plot=not args.no_plot))


if __name__ == "__main__":
    main()
