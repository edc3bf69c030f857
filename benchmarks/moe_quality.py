"""Does MoE pay? Dense vs MoE at equal active compute, and router / capacity variants, on held-out bpb.

    nice -n 10 python benchmarks/moe_quality.py run --steps 500 --out /tmp/moe-quality   # ~35 CPU-minutes
    python benchmarks/moe_quality.py report --out /tmp/moe-quality \
        --md benchmarks/results/moe-quality-2026-11-25.md

`run` trains every configuration through the CLI (`shardyard run jobs/compare-{dense,moe}.yaml --set
...`, one worker each, `--parallel` of them at a time) and reads only the run directory afterwards:
metrics.jsonl for the curves and expert loads, the final checkpoint for one full evaluation on the
whole held-out split (the `shardyard eval` path: shardyard.runtime.evaluation), which also keeps
every window's bits per byte. All runs score the same windows, so differences between two models are
judged window by window (paired standard error), much tighter than their separate error bars.

Equal active compute: dense FFN hidden h = 384 (the tiny preset's) against 8 experts of hidden 384
top-1 (switch router: a renormalised softmax top-1 has weight 1 and gives its router no gradient)
and 8 experts of hidden 192 top-2. Same data order (seed), steps and learning-rate schedule.
`report` renders the Markdown and one plot from results.json.

    python benchmarks/moe_quality.py --smoke   # run (--local, 5 steps, depth 1, 3 configs, seed 0),
                                               # steptime and report, all in a temp dir
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLI = [sys.executable, "-m", "shardyard.cli"]  # the `shardyard` command of this interpreter
DENSE, MOE = ROOT / "jobs/compare-dense.yaml", ROOT / "jobs/compare-moe.yaml"

# name -> (base spec, overrides, seeds): dense, top-2 and aux-free with up to 3 seeds, switch with 2, the other variants seed 0.
TOP1 = ["model.ffn.hidden=384", "model.moe.top_k=1", "model.moe.router=switch"]
CONFIGS: dict[str, tuple[Path, list[str], tuple[int, ...]]] = {
    "dense h384": (DENSE, [], (0, 1, 2)),
    "moe 8x384 top-1 switch": (MOE, TOP1, (0, 1)),
    "moe 8x192 top-2 softmax": (MOE, [], (0, 1, 2)),
    "moe 8x192 top-2 aux-free": (MOE, ["model.moe.router=aux_free", "model.moe.aux_loss=0"], (0, 1, 2)),
    "moe 8x192 top-2 expert-choice": (MOE, ["model.moe.router=expert_choice"], (0,)),
    "moe 8x192 top-2 softmax cf1.25": (MOE, ["model.moe.capacity_factor=1.25"], (0,)),
}


SMOKE_SETS: list[str] = []  # --smoke: overrides that shrink every run to seconds
MAX_ATTEMPTS = 3  # --smoke: 1 (a failure must show, not be retried)


def slug(name: str, seed: int) -> str:
    return name.replace(" ", "_").replace(".", "") + f"_s{seed}"


def launch(
    out: Path, name: str, base: Path, overrides: list[str], seed: int, steps: int, local: bool = False
) -> subprocess.Popen:
    run = slug(name, seed)
    sets = [
        f"name={run}",
        f"seed={seed}",
        f"training.steps={steps}",
        f"training.eval_every={steps // 5}",
        f"checkpoint.dir={out / 'runs'}",
        "tracking.mode=disabled",
        *overrides,
        *SMOKE_SETS,
    ]
    runner = [sys.executable, str(ROOT / "benchmarks" / "train_local.py")] if local else [*CLI, "run"]
    cmd = [*runner, str(base), *[a for s in sets for a in ("--set", s)]]
    log = open(out / "logs" / f"{run}.log", "a")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(["nice", "-n", "10", *cmd], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def train_seconds(records: list[dict[str, Any]], tokens_per_step: int) -> dict[int, float]:
    """Cumulative training time (evaluation and checkpoints excluded) at each logged step."""
    elapsed, last, out = 0.0, 0, {}
    for r in records:
        if r.get("kind") == "train":
            elapsed += (r["step"] - last) * tokens_per_step / max(r["tokens_per_s"], 1e-9)
            last = r["step"]
            out[last] = elapsed
    return out


def summarize_run(out: Path, name: str, seed: int) -> dict[str, Any]:
    import torch

    from shardyard.data.corpus import load_corpus
    from shardyard.data.validation import all_batches, held_out_split
    from shardyard.runtime.evaluation import autocast_for, per_window_bits, summarize
    from shardyard.runtime.export import load_for_inference
    from shardyard.tracking.logger import read_metrics

    run_dir = out / "runs" / slug(name, seed)
    records = read_metrics(run_dir)
    spec, model = load_for_inference(run_dir)
    torch.set_num_threads(1)
    text = held_out_split(load_corpus(spec.data))
    batches = all_batches(text, spec.data.seq_len, 10**9, 32, 1)  # every window of the split
    device = torch.device("cpu")
    start = time.perf_counter()
    bits = per_window_bits(model, batches, device, autocast_for(spec, device))
    final = summarize(len(bits), float(bits.sum()), float((bits**2).sum()), spec.data.seq_len)
    np.save(out / "windows" / f"{slug(name, seed)}.npy", bits)
    tps = spec.tokens_per_step()
    times = train_seconds(records, tps)
    evals = [
        {"step": r["step"], "bpb": r["val_bpb"], "stderr": r["val_bpb_stderr"], "train_s": times.get(r["step"])}
        for r in records
        if r.get("kind") == "eval"
    ]
    trains = [r for r in records if r.get("kind") == "train"]
    tail = trains[-max(1, len(trains) // 5) :]  # last fifth of training
    load: dict[str, float] = {}
    if any("moe/layer0/util_max" in r for r in tail):
        layers = sorted({k.split("/")[1] for r in tail for k in r if k.startswith("moe/layer")})
        experts = spec.model.moe.num_experts  # utilisation = share x experts
        load = {
            "max_share": float(np.mean([r[f"moe/{layer}/util_max"] for r in tail for layer in layers])) / experts,
            "min_share": float(np.mean([r[f"moe/{layer}/util_min"] for r in tail for layer in layers])) / experts,
            "balance_loss": float(np.mean([r[f"moe/{layer}/balance_loss"] for r in tail for layer in layers])),
            "dropped_fraction": float(np.mean([r[f"moe/{layer}/dropped_fraction"] for r in tail for layer in layers])),
        }
    return {
        "name": name,
        "seed": seed,
        "final": final.__dict__,
        "full_eval_s": time.perf_counter() - start,
        "evals": evals,
        "train_s": max(times.values()),
        "train_bpb_tail": float(np.mean([r["bpb"] for r in tail])),
        "load": load,
        "steps": spec.training.steps,
    }


def cmd_run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for sub in ("runs", "logs", "windows"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    jobs = [
        (name, base, overrides, seed)
        for name, (base, overrides, seeds) in CONFIGS.items()
        for seed in seeds[: args.seeds]
        if not args.only or name in args.only
    ]
    jobs.sort(key=lambda job: job[3])  # seed-major: every finished seed gives a complete paired comparison
    meta = {
        "command": " ".join(sys.argv),
        "start": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "steps": args.steps,
    }
    results_file = out / "results.json"
    done = json.loads(results_file.read_text())["runs"] if results_file.exists() else []
    finished = {(r["name"], r["seed"]) for r in done}
    pending = [j for j in jobs if (j[0], j[3]) not in finished]
    running: list[tuple[subprocess.Popen, tuple[str, Path, list[str], int]]] = []
    attempts: dict[tuple[str, int], int] = {}
    last_start = 0.0
    while pending or running:
        # Stagger start-ups: two embedded Ray clusters booting at once on a loaded machine time out.
        while pending and len(running) < args.parallel and (args.local or time.monotonic() - last_start > 30):
            job = pending.pop(0)
            name, base, overrides, seed = job
            attempts[(name, seed)] = attempts.get((name, seed), 0) + 1
            shutil.rmtree(out / "runs" / slug(name, seed), ignore_errors=True)
            print(f"[moe_quality] start {name} seed {seed} (attempt {attempts[(name, seed)]})", flush=True)
            running.append((launch(out, name, base, overrides, seed, args.steps, args.local), job))
            last_start = time.monotonic()
        time.sleep(2)
        for item in list(running):
            proc, job = item
            name, _, _, seed = job
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                print(f"[moe_quality] {name} seed {seed} FAILED (rc {proc.returncode}); see {out}/logs", flush=True)
                if attempts[(name, seed)] < MAX_ATTEMPTS:
                    pending.insert(0, job)
                continue
            done.append(summarize_run(out, name, seed))
            print(
                f"[moe_quality] done {name} seed {seed}: {done[-1]['final']['bpb']:.4f} "
                f"+- {done[-1]['final']['stderr']:.4f}",
                flush=True,
            )
            results_file.write_text(json.dumps({"meta": meta, "runs": done}, indent=1))
    meta["end"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    meta["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results_file.write_text(json.dumps({"meta": meta, "runs": done}, indent=1))


def cmd_steptime(args: argparse.Namespace) -> None:
    """Training-step time of every configuration, measured in interleaved rounds in one process (one
    thread), so that a loaded machine slows all of them alike: the ratio to dense is what the
    equal-wall-clock comparison uses, not the runs' own bytes/s, which followed the machine's load."""
    import statistics

    import torch

    from shardyard.models import build_model
    from shardyard.optim import build_optimizer
    from shardyard.platform.spec import load_spec

    torch.set_num_threads(1)
    torch.manual_seed(0)
    setups = {}
    for name, (base, overrides, _) in CONFIGS.items():
        spec = load_spec(base, [*overrides, *SMOKE_SETS])
        model = build_model(spec.model, spec.data.seq_len)
        setups[name] = (model, build_optimizer(spec.optim, model))
    batch = torch.randint(0, 256, (spec.training.batch_size, spec.data.seq_len + 1))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    times: dict[str, list[float]] = {name: [] for name in setups}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, (model, optimizer) in setups.items():
            start = time.perf_counter()
            for _ in range(args.steps_per_round):
                _, loss = model(inputs, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if round_:
                times[name].append((time.perf_counter() - start) / args.steps_per_round)
    out = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)} for name, t in times.items()}
    out["_meta"] = {
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    Path(args.out, "steptime.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


# ------------------------------------------------------------------------------------------ report
def paired(out: Path, a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """Mean of (b - a) over the same windows and its standard error."""
    wa = np.load(out / "windows" / f"{slug(a['name'], a['seed'])}.npy")
    wb = np.load(out / "windows" / f"{slug(b['name'], b['seed'])}.npy")
    d = wb - wa
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def cmd_report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    data = json.loads((out / "results.json").read_text())
    runs, meta = data["runs"], data["meta"]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_name.setdefault(r["name"], []).append(r)
    dense = {r["seed"]: r for r in by_name.get("dense h384", [])}
    lines = [
        "# MoE vs dense at equal active compute (held-out bits per byte)",
        "",
        f"- command: `{meta['command']}` (then `python benchmarks/moe_quality.py report --out {args.out} --md ...`)",
        f"- date: {meta['start']} to {meta.get('end', '?')}; machine: 2 shared CPU cores, torch threads 1 per run, "
        f"runs under `nice -n 10`",
        f"- load: before `{meta['uptime_before']}`; after `{meta.get('uptime_after', '?')}`",
        f"- every run: tiny preset (width 128, depth 4, heads 4), seq_len 128, batch 8, {meta['steps']} steps "
        f"({meta['steps'] * 1024 / 1e3:.0f} KB of training bytes), AdamW lr 3e-3, 20 warm-up steps, cosine to 0.1; "
        "one worker; base specs `jobs/compare-dense.yaml`, `jobs/compare-moe.yaml`",
        "- final bpb: every window of the stdlib held-out split (22 files, 482 KB, 3765 windows of 128 bytes), "
        "the `shardyard eval` path; mid-run points: 512 windows (64 KiB) each",
        "",
        "## At equal steps (final checkpoint)",
        "",
        "| configuration | seed | held-out bpb +- s.e. | minus dense (same seed), paired s.e. | z | train bpb "
        "(last 20%) | train s | bytes/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rs in by_name.items():
        for r in sorted(rs, key=lambda r: r["seed"]):
            f = r["final"]
            ref = dense.get(r["seed"], dense.get(0))
            if ref is not None and ref is not r:
                d, se = paired(out, ref, r)
                diff = f"{d:+.4f} +- {se:.4f}"
                z = f"{d / se:+.1f}"
            else:
                diff, z = "-", "-"
            lines.append(
                f"| {name} | {r['seed']} | {f['bpb']:.4f} +- {f['stderr']:.4f} | {diff} | {z} | "
                f"{r['train_bpb_tail']:.3f} | {r['train_s']:.0f} | {r['steps'] * 1024 / r['train_s']:.0f} |"
            )
    for name, rs in by_name.items():
        seeds = {r["seed"]: r for r in rs}
        if 0 in seeds and 1 in seeds:
            d, se = paired(out, seeds[0], seeds[1])
            lines.append(
                f"\nTraining noise, {name}: seed 1 minus seed 0 on the same windows = {d:+.4f} +- {se:.4f} "
                "(evaluation s.e.): the evaluation error bar does not cover the seed-to-seed spread."
            )
    lines += [
        "",
        "Over seeds (the error that counts: training noise between seeds plus evaluation noise; with 2 "
        "seeds the standard deviation is a crude estimate):",
        "",
        "| configuration | seeds | mean bpb | seed s.d. | mean minus dense mean +- s.e. | z |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    dense_vals = [r["final"]["bpb"] for r in dense.values()]
    for name, rs in by_name.items():
        vals = [r["final"]["bpb"] for r in rs]
        sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
        if name == "dense h384" or len(vals) < 2 or len(dense_vals) < 2:
            lines.append(f"| {name} | {len(rs)} | {np.mean(vals):.4f} | {sd:.4f} | - | - |")
            continue
        d = float(np.mean(vals) - np.mean(dense_vals))
        se = math.sqrt(np.var(vals, ddof=1) / len(vals) + np.var(dense_vals, ddof=1) / len(dense_vals))
        lines.append(f"| {name} | {len(rs)} | {np.mean(vals):.4f} | {sd:.4f} | {d:+.4f} +- {se:.4f} | {d / se:+.1f} |")
    steptime_file = out / "steptime.json"
    if steptime_file.exists():
        st = json.loads(steptime_file.read_text())
        t_dense = st["dense h384"]["min_s"]
        lines += [
            "",
            "## At equal wall clock",
            "",
            f"Step times measured in one process, one thread, {st['_meta']['rounds']} interleaved rounds of "
            f"{st['_meta']['steps_per_round']} steps (`moe_quality.py steptime`; load `{st['_meta']['uptime']}`), "
            "so load slows every configuration alike; the ratio uses each configuration's fastest round (the least "
            "disturbed; medians on a loaded machine measure the load). A configuration slower per step than dense gets "
            "proportionally fewer steps in the dense run's time; its bpb there is read off its mid-run curve "
            "(64 KiB points, +-~0.03, linear interpolation; same 512 windows for every run).",
            "",
            "| configuration | ms/step fastest round (median) | vs dense | steps in dense's 500-step time | bpb "
            "then (seed 0) | dense bpb at 500 (seed 0, same windows) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, rs in by_name.items():
            if name not in st:
                continue
            t = st[name]["min_s"]
            r0 = next((r for r in rs if r["seed"] == 0), rs[0])
            steps_eq = r0["steps"] * t_dense / t
            pts = [(e["step"], e["bpb"]) for e in r0["evals"]]
            xs, ys = zip(*pts)
            at = float(np.interp(min(steps_eq, xs[-1]), xs, ys))
            note = "" if steps_eq <= 1.02 * xs[-1] else f" (at {xs[-1]}: the run stopped there)"
            dense_end = dense[0]["evals"][-1]["bpb"] if 0 in dense else float("nan")
            lines.append(
                f"| {name} | {1000 * t:.1f} ({1000 * st[name]['median_s']:.1f}) | "
                f"{t / t_dense:.2f}x | {steps_eq:.0f} | {at:.4f}{note} | {dense_end:.4f} |"
            )
    lines += [
        "",
        "## Expert load (last 20% of training, mean over layers)",
        "",
        "| configuration | seed | max expert share | min expert share | balance loss (1 = even) | dropped fraction |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, rs in by_name.items():
        for r in sorted(rs, key=lambda r: r["seed"]):
            if r["load"]:
                ld = r["load"]
                lines.append(
                    f"| {name} | {r['seed']} | {ld['max_share']:.3f} | {ld['min_share']:.3f} | "
                    f"{ld['balance_loss']:.3f} | {ld['dropped_fraction']:.3f} |"
                )
    if args.plot:
        step_s = (
            {n: v["min_s"] for n, v in json.loads(steptime_file.read_text()).items() if n != "_meta"}
            if steptime_file.exists()
            else {}
        )
        plot(by_name, Path(args.plot), step_s)
        lines += ["", f"![held-out bpb curves]({Path(args.plot).name})"]
    text = "\n".join(lines) + "\n"
    if args.md:
        Path(args.md).write_text(text)
    print(text)


def plot(by_name: dict[str, list[dict[str, Any]]], path: Path, step_s: dict[str, float]) -> None:
    """Held-out bpb against steps and against training time (step x measured step time when
    `moe_quality.py steptime` ran, else the run's own, load-dependent, time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, (name, rs) in enumerate(by_name.items()):
        color = f"C{i}"
        for r in rs:
            ev = r["evals"]
            style = "-" if r["seed"] == 0 else "--"
            ax_step.errorbar(
                [e["step"] for e in ev],
                [e["bpb"] for e in ev],
                yerr=[e["stderr"] for e in ev],
                fmt="o" + style,
                color=color,
                ms=3,
                capsize=2,
                label=name if r["seed"] == 0 else None,
            )
            xs = [e["step"] * step_s[name] if name in step_s else e["train_s"] for e in ev]
            ax_time.plot(xs, [e["bpb"] for e in ev], "o" + style, color=color, ms=3)
    ax_step.set_xlabel("step")
    ax_time.set_xlabel(
        "training seconds (steps x interleaved step time, one thread)"
        if step_s
        else "training seconds (shared 2-core CPU)"
    )
    ax_step.set_ylabel("held-out bits per byte (512 windows, +- s.e.)")
    ax_step.legend(fontsize=8)
    ax_step.set_title("equal steps (solid seed 0, dashed seed 1)")
    ax_time.set_title("equal wall clock")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def smoke() -> None:
    """run (train_local.py, three configurations once at 5 steps of a depth-1 model), steptime (every
    configuration) and report with its plot, in a temp dir; fails when any run failed."""
    global MAX_ATTEMPTS
    from benchmarks.smoke import smoke_dir

    out = smoke_dir("moe_quality")
    SMOKE_SETS[:] = [
        "model.depth=1",
        "data.max_bytes=3000000",
        "training.batch_size=4",
        "training.eval_bytes=2048",
        "training.log_every=1",
    ]
    MAX_ATTEMPTS = 1
    only = ["dense h384", "moe 8x384 top-1 switch", "moe 8x192 top-2 softmax cf1.25"]  # dense, top-1, drops
    cmd_run(argparse.Namespace(out=str(out), steps=5, seeds=1, parallel=2, only=only, local=True))
    runs = json.loads((out / "results.json").read_text())["runs"]
    if len(runs) != len(only):
        failed = sorted(set(only) - {r["name"] for r in runs})
        for name in failed:
            print((out / "logs" / f"{slug(name, 0)}.log").read_text()[-3000:], file=sys.stderr)
        raise SystemExit(f"moe_quality smoke: runs failed: {failed}")
    cmd_steptime(argparse.Namespace(out=str(out), rounds=1, steps_per_round=1))
    cmd_report(argparse.Namespace(out=str(out), md=str(out / "report.md"), plot=str(out / "report.png")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="run, steptime and report at seconds-long sizes")
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("run")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seeds", type=int, default=2, help="seeds of the dense/MoE comparison set (variants: seed 0)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (each one worker, one thread)")
    p.add_argument("--only", action="append", default=[], help="run only this configuration (repeatable)")
    p.add_argument("--local", action="store_true", help="train in-process (benchmarks/train_local.py), not via Ray")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("steptime")
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=10)
    p.set_defaults(fn=cmd_steptime)
    p = sub.add_parser("report")
    p.add_argument("--out", required=True)
    p.add_argument("--md", default=None)
    p.add_argument("--plot", default=None)
    p.set_defaults(fn=cmd_report)
    args = parser.parse_args()
    if args.smoke:
        smoke()
    elif args.cmd is None:
        parser.error("a command is required: run, steptime or report (or --smoke)")
    else:
        args.fn(args)


if __name__ == "__main__":
    main()
