"""Does MoE pay? MoE recipes against dense at equal active compute, and sparse upcycling against
continued dense training, on held-out bits per byte over paired seeds.

    OMP_NUM_THREADS=1 python benchmarks/moe_quality.py run --local --seeds 3 --out /work/bench/mq \
        --only dense --only top2-8x192 --only fine32x48-top7-s1-sigmoid-auxfree --upcycle
    python benchmarks/moe_quality.py steptime --out /work/bench/mq
    python benchmarks/moe_quality.py report --out /work/bench/mq --md benchmarks/results/moe-quality-2026-12-05.md
    python benchmarks/moe_quality.py flops              # every configuration's active FLOPs per byte

Arms (CONFIGS, built from the scale's dense FFN hidden H): every MoE runs the same FFN FLOPs per byte
as the dense model (k routed experts of hidden h plus shared experts, k*h + shared = H; the router adds
width x E) and the active FLOPs are counted (shardyard.models.flops) and printed. Same seed = same data
order and the same initial embedding, attention, norms and head in every arm (the flat model draws
those from a generator of their own: models/transformer.py init_common_first), so differences are
judged per seed (benchmarks/paired.py: mean paired difference, over-seed standard error, and the
smallest effect the design detects at 3 standard errors).

`--upcycle`: per seed, once the dense arm has finished, its final weights are exported (HF layout)
and two continuations train `--cont-steps` from them with a fresh optimizer and schedule and the
same new data order (seed + 1000): dense (`model.init_from`) and an upcycled switch MoE
(`model.upcycle_from`: 8 copies of the dense MLP, top-1 with routed_scale 8 so the step-0 output is
about the dense model's and the router gets gradients; equal active compute).

Runs train through `shardyard run` (one worker) or, with `--local`, in-process with the workers' own
Trainer (benchmarks/train_local.py); `--parallel` of them at a time. `--device cuda` trains and
evaluates on the GPU (bf16 autocast); `--scale gpu` is the larger regime for it (below).
    python benchmarks/moe_quality.py --smoke   # run (--local, 4 steps, depth 1), steptime and report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.paired import CALL_AT, Z_POWER_80, paired  # noqa: E402

CLI = [sys.executable, "-m", "shardyard.cli"]  # the `shardyard` command of this interpreter
DENSE, MOE = ROOT / "jobs/compare-dense.yaml", ROOT / "jobs/compare-moe.yaml"


@dataclass(frozen=True)
class Scale:
    width: int
    depth: int
    heads: int
    hidden: int  # the dense FFN's hidden width H (3 x width)
    seq_len: int
    batch: int
    steps: int
    cont_steps: int  # --upcycle continuations
    lr: float

    def overrides(self) -> list[str]:
        return [
            f"model.width={self.width}",
            f"model.depth={self.depth}",
            f"model.heads={self.heads}",
            f"data.seq_len={self.seq_len}",
            f"training.batch_size={self.batch}",
            f"optim.lr={self.lr}",
        ]


# cpu: 4 KB per step (32 x 128 bytes), where a single-seed check found the MoE ahead (NOTES.md), 300
# steps (1.2 MB) from scratch and 100 continued, at width 64 and depth 2: the size at which 12 runs fit
# ~50 minutes of a 2-core machine shared at a load of 40-60 (width 128 ran 8 steps a minute there).
# gpu: a 27M-active-parameter model at 16 KB per step for 3000 steps (49 MB, 1.4 passes over the stdlib
# corpus); Krajewski et al. 2024 (fine-grained MoE scaling laws) and Dai et al. 2024 (DeepSeekMoE) find
# fine-grained MoE with shared experts ahead of dense at equal active compute at every size they
# trained, from ~100M total parameters and ~1B tokens up.
# cpu128: the tiny preset's width and depth (128 x 4), 4 KB per step for 600 steps, where NOTES.md saw
# the top-2 MoE ahead of dense by ~0.06 bpb on two seeds; ~4-6 min per run on a quiet core.
SCALES = {
    "cpu": Scale(width=64, depth=2, heads=4, hidden=192, seq_len=128, batch=32, steps=300, cont_steps=100, lr=3e-3),
    "cpu128": Scale(width=128, depth=4, heads=4, hidden=384, seq_len=128, batch=32, steps=600, cont_steps=300, lr=3e-3),
    "gpu": Scale(width=512, depth=8, heads=8, hidden=1536, seq_len=256, batch=64, steps=3000, cont_steps=1500, lr=1e-3),
}


def expert_layout(h: int, experts: int, top_k: int, hidden: int, shared: int = 0, scale: float = 1.0) -> list[str]:
    """An MoE arm's overrides at dense hidden `h` with every expert-layout field spelled out, whatever
    the base spec's MoE block says (the base spec may change between runs)."""
    e = "model.moe."
    return [
        f"model.ffn.hidden={h}",
        f"{e}num_experts={experts}",
        f"{e}top_k={top_k}",
        f"{e}expert_hidden={hidden}",
        f"{e}shared_experts={shared}",
        f"{e}routed_scale={scale}",
    ]


def configs(h: int) -> dict[str, tuple[Path, list[str]]]:
    """name -> (base spec, overrides) at dense hidden `h`; every MoE's routed + shared hidden is h."""
    e = "model.moe."

    def moe(experts: int, top_k: int, hidden: int, shared: int = 0, scale: float = 1.0) -> list[str]:
        return expert_layout(h, experts, top_k, hidden, shared, scale)

    fine = moe(32, 7, h // 8, shared=1, scale=7.0)
    return {
        "dense": (DENSE, [f"model.ffn.hidden={h}"]),
        # 8 experts of h/2, top-2, renormalised softmax weights (Mixtral)
        f"top2-8x{h // 2}": (MOE, moe(8, 2, h // 2)),
        # fine-grained (1/4 of top-2's expert width) with one shared expert of the same width (DeepSeekMoE);
        # routed_scale = top_k makes the renormalised routed sum the size of a dense FFN at initialisation
        f"fine32x{h // 8}-top7-s1": (MOE, fine),
        # the same with DeepSeek-V3's router: sigmoid scores, aux-loss-free balancing by a selection bias
        f"fine32x{h // 8}-top7-s1-sigmoid-auxfree": (
            MOE,
            [*fine, f"{e}score=sigmoid", f"{e}router=aux_free", f"{e}aux_loss=0.0"],
        ),
        f"fine16x{h // 4}-top3-s1": (MOE, moe(16, 3, h // 4, shared=1, scale=3.0)),
        # switch top-1 and expert choice, their ~1/E router probabilities scaled back up by E
        f"switch-8x{h}-scale8": (MOE, [*moe(8, 1, h, scale=8.0), f"{e}router=switch"]),
        f"expert-choice-8x{h // 2}-scale8": (MOE, [*moe(8, 2, h // 2, scale=8.0), f"{e}router=expert_choice"]),
    }


def upcycle_configs(h: int, weights: Path) -> dict[str, tuple[Path, list[str]]]:
    """The continuation pair from the dense arm's exported `weights`."""
    return {
        "cont-dense": (DENSE, [f"model.ffn.hidden={h}", f"model.init_from={weights}"]),
        f"cont-upcycled-switch-8x{h}": (
            MOE,
            [*expert_layout(h, 8, 1, h, scale=8.0), "model.moe.router=switch", f"model.upcycle_from={weights}"],
        ),
    }


CONT_SEED = 1000  # continuations see a new data order (seed + CONT_SEED), the same in both arms
SMOKE_SETS: list[str] = []  # --smoke: overrides that shrink every run to seconds
MAX_ATTEMPTS = 3  # --smoke: 1 (a failure must show, not be retried)


def slug(name: str, seed: int) -> str:
    return name.replace(" ", "_").replace(".", "") + f"_s{seed}"


def device_sets(device: str) -> list[str]:
    return ["resources.gpus_per_worker=1", "training.precision=bf16"] if device == "cuda" else []


def child_env(device: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # workers pick a GPU whenever one is visible
    return env


@dataclass
class Job:
    name: str
    base: Path
    overrides: list[str]
    seed: int  # the pairing seed
    steps: int
    after: str | None = None  # the dense arm this continuation starts from


def launch(out: Path, job: Job, args: argparse.Namespace) -> subprocess.Popen:
    run = slug(job.name, job.seed)
    data_seed = job.seed + (CONT_SEED if job.after else 0)
    scale = SCALES[args.scale]
    sets = [
        f"name={run}",
        f"seed={data_seed}",
        f"training.steps={job.steps}",
        f"training.eval_every={max(1, job.steps // 5)}",
        "training.eval_bytes=32768",  # mid-run points: 256 windows (the final one scores --eval-bytes)
        f"checkpoint.dir={out / 'runs'}",
        f"checkpoint.every={job.steps}",
        "tracking.mode=disabled",
        *scale.overrides(),
        *([f"optim.lr={args.cont_lr}"] if job.after and args.cont_lr else []),
        *job.overrides,
        *device_sets(args.device),
        *SMOKE_SETS,
    ]
    runner = [sys.executable, str(ROOT / "benchmarks" / "train_local.py")] if args.local else [*CLI, "run"]
    cmd = [*runner, str(job.base), *[a for s in sets for a in ("--set", s)]]
    log = open(out / "logs" / f"{run}.log", "a")
    return subprocess.Popen(
        ["nice", "-n", str(args.nice), *cmd], stdout=log, stderr=subprocess.STDOUT, env=child_env(args.device), cwd=ROOT
    )


def train_seconds(records: list[dict[str, Any]], tokens_per_step: int) -> dict[int, float]:
    """Cumulative training time (evaluation and checkpoints excluded) at each logged step."""
    elapsed, last, out = 0.0, 0, {}
    for r in records:
        if r.get("kind") == "train":
            elapsed += (r["step"] - last) * tokens_per_step / max(r["tokens_per_s"], 1e-9)
            last = r["step"]
            out[last] = elapsed
    return out


def summarize_run(out: Path, name: str, seed: int, device_name: str, eval_bytes: int) -> dict[str, Any]:
    """One evaluation of the final checkpoint on `eval_bytes` of held-out windows spread over the split
    (the `shardyard eval` path); every window's bits are kept for the per-seed paired evaluation error."""
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
    device = torch.device(device_name)
    model.to(device)
    text = held_out_split(load_corpus(spec.data))
    batches = all_batches(text, spec.data.seq_len, eval_bytes, 32, 1)  # the same windows for every run
    start = time.perf_counter()
    bits = per_window_bits(model, batches, device, autocast_for(spec, device))
    final = summarize(len(bits), float(bits.sum()), float((bits**2).sum()), spec.data.seq_len)
    np.save(out / "windows" / f"{slug(name, seed)}.npy", bits)
    times = train_seconds(records, spec.tokens_per_step())
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

        def mean(key: str) -> float:
            return float(np.mean([r[f"moe/{layer}/{key}"] for r in tail for layer in layers]))

        load = {
            "max_share": mean("util_max") / experts,
            "min_share": mean("util_min") / experts,
            "balance_loss": mean("balance_loss"),
            "dropped_fraction": mean("dropped_fraction"),
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
        "bytes_per_step": spec.tokens_per_step(),
    }


def export_dense(out: Path, seed: int) -> Path:
    """The dense arm's final weights in HF layout (what both continuations start from)."""
    from shardyard.runtime.export import export_hf

    target = out / "hf" / f"dense_s{seed}"
    if not (target / "config.json").exists():
        shutil.rmtree(target, ignore_errors=True)
        export_hf(out / "runs" / slug("dense", seed), target)
    return target


def plan(args: argparse.Namespace) -> list[Job]:
    """Seed-major: every finished seed gives a complete paired comparison."""
    scale = SCALES[args.scale]
    names = args.only or ["dense", *list(configs(scale.hidden))[1:3]]
    unknown = sorted(set(names) - set(configs(scale.hidden)))
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; available: {list(configs(scale.hidden))}")
    if args.upcycle and "dense" not in names:
        raise SystemExit("--upcycle continues the dense arm: add --only dense")
    jobs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name in names:
            base, overrides = configs(scale.hidden)[name]
            jobs.append(Job(name, base, overrides, seed, args.steps or scale.steps))
        if args.upcycle:
            for name, (base, overrides) in upcycle_configs(scale.hidden, Path("<export>")).items():
                jobs.append(Job(name, base, overrides, seed, args.cont_steps or scale.cont_steps, after="dense"))
    return jobs


def cmd_run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for sub in ("runs", "logs", "windows", "hf"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no GPU is visible here")
    results_file = out / "results.json"
    saved = json.loads(results_file.read_text()) if results_file.exists() else {}
    done: list[dict[str, Any]] = saved.get("runs", [])
    meta = saved.get("meta") or {
        "commands": [],
        "start": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    meta["commands"].append(" ".join(sys.argv))
    meta.update(scale=args.scale, device=args.device, eval_bytes=args.eval_bytes, cont_lr=args.cont_lr or None)
    finished = {(r["name"], r["seed"]) for r in done}
    pending = [j for j in plan(args) if (j.name, j.seed) not in finished]
    running: list[tuple[subprocess.Popen, Job]] = []
    attempts: dict[tuple[str, int], int] = {}
    last_start = 0.0
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    children_cpu = used.ru_utime + used.ru_stime  # a run's CPU time: the increase when it is reaped

    def ready(job: Job) -> bool:
        return job.after is None or (job.after, job.seed) in finished

    while pending or running:
        # Stagger start-ups: two embedded Ray clusters booting at once on a loaded machine time out.
        while len(running) < args.parallel and (args.local or time.monotonic() - last_start > 30):
            job = next((j for j in pending if ready(j)), None)
            if job is None:
                break
            pending.remove(job)
            if job.after:  # the continuation's weights: the finished dense arm of this seed, exported
                weights = export_dense(out, job.seed)
                job.overrides = [o.replace("<export>", str(weights)) for o in job.overrides]
            attempts[(job.name, job.seed)] = attempts.get((job.name, job.seed), 0) + 1
            shutil.rmtree(out / "runs" / slug(job.name, job.seed), ignore_errors=True)
            print(
                f"[moe_quality] start {job.name} seed {job.seed} (attempt {attempts[(job.name, job.seed)]})", flush=True
            )
            running.append((launch(out, job, args), job))
            last_start = time.monotonic()
        if not running and pending:
            raise SystemExit(f"[moe_quality] {len(pending)} runs wait on a dense arm that failed")
        time.sleep(2)
        for item in list(running):
            proc, job = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                used = resource.getrusage(resource.RUSAGE_CHILDREN)
                children_cpu = used.ru_utime + used.ru_stime
                print(
                    f"[moe_quality] {job.name} seed {job.seed} FAILED (rc {proc.returncode}); see {out}/logs",
                    flush=True,
                )
                if attempts[(job.name, job.seed)] < MAX_ATTEMPTS:
                    pending.insert(0, job)
                continue
            used = resource.getrusage(resource.RUSAGE_CHILDREN)  # poll() reaped it: its time is in now
            done.append(summarize_run(out, job.name, job.seed, args.device, args.eval_bytes))
            done[-1]["cpu_s"] = used.ru_utime + used.ru_stime - children_cpu
            children_cpu = used.ru_utime + used.ru_stime
            finished.add((job.name, job.seed))
            f = done[-1]["final"]
            print(f"[moe_quality] done {job.name} seed {job.seed}: {f['bpb']:.4f} +- {f['stderr']:.4f}", flush=True)
            results_file.write_text(json.dumps({"meta": meta, "runs": done}, indent=1))
    meta["end"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    meta["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results_file.write_text(json.dumps({"meta": meta, "runs": done}, indent=1))


def flops_table(scale: Scale) -> list[dict[str, Any]]:
    """Every configuration's counted training FLOPs per byte (forward + backward) and parameters."""
    import torch

    from shardyard.models import build_model, count_parameters
    from shardyard.models.flops import training_flops_per_token
    from shardyard.platform.spec import load_spec

    rows = []
    for name, (base, overrides) in configs(scale.hidden).items():
        spec = load_spec(base, [*scale.overrides(), *overrides])
        with torch.device("meta"):
            total, active = count_parameters(build_model(spec.model, spec.data.seq_len))
        rows.append(
            {
                "name": name,
                "flops_per_byte": training_flops_per_token(spec.model, spec.data.seq_len),
                "params": total,
                "active_params": active,
            }
        )
    return rows


def cmd_flops(args: argparse.Namespace) -> None:
    rows = flops_table(SCALES[args.scale])
    dense = rows[0]["flops_per_byte"]
    print(f"{'configuration':40s} {'train MFLOP/byte':>17s} {'vs dense':>9s} {'params':>10s} {'active':>10s}")
    for r in rows:
        print(
            f"{r['name']:40s} {r['flops_per_byte'] / 1e6:17.3f} {r['flops_per_byte'] / dense:9.4f} "
            f"{r['params']:10d} {r['active_params']:10d}"
        )


def cmd_steptime(args: argparse.Namespace) -> None:
    """Training-step time of every configuration, in interleaved rounds in one process (one thread),
    so a loaded machine slows all of them alike: the ratio to dense is what equal wall clock uses."""
    import statistics

    import torch

    from shardyard.models import build_model
    from shardyard.optim import build_optimizer
    from shardyard.platform.spec import load_spec

    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device(args.device)
    scale = SCALES[args.scale]
    names = args.only or list(configs(scale.hidden))
    setups = {}
    for name in names:
        base, overrides = configs(scale.hidden)[name]
        spec = load_spec(base, [*scale.overrides(), *overrides, *device_sets(args.device), *SMOKE_SETS])
        model = build_model(spec.model, spec.data.seq_len).to(device)
        setups[name] = (model, build_optimizer(spec.optim, model))
    batch = torch.randint(0, 256, (spec.training.batch_size, spec.data.seq_len + 1), device=device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.device == "cuda")
    times: dict[str, list[float]] = {name: [] for name in setups}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, (model, optimizer) in setups.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps_per_round):
                with autocast:
                    _, loss = model(inputs, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                times[name].append((time.perf_counter() - start) / args.steps_per_round)
    out = {
        name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "rounds_s": t}
        for name, t in times.items()
    }
    out["_meta"] = {
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "device": args.device,
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    Path(args.out, "steptime.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "_meta"}, indent=1))


# ------------------------------------------------------------------------------------------ report
def window_paired(out: Path, a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """Mean of (b - a) over the same held-out windows and its standard error: the evaluation noise
    of one seed's difference (training noise between seeds is not in it)."""
    wa = np.load(out / "windows" / f"{slug(a['name'], a['seed'])}.npy")
    wb = np.load(out / "windows" / f"{slug(b['name'], b['seed'])}.npy")
    d = wb - wa
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def bpb_at(run: dict[str, Any], step: float) -> float:
    """Held-out bpb at `step` read off the run's mid-run evaluations (linear interpolation)."""
    xs, ys = zip(*[(e["step"], e["bpb"]) for e in run["evals"]])
    return float(np.interp(min(step, xs[-1]), xs, ys))


def comparison_lines(out: Path, by_name: dict[str, list[dict[str, Any]]], ref: str, names: list[str]) -> list[str]:
    base = {r["seed"]: r for r in by_name[ref]}
    lines = [
        f"| configuration | seed | held-out bpb +- s.e. | minus {ref} (same seed) +- window s.e. | train bpb (last 20%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in [ref, *names]:
        for r in sorted(by_name[name], key=lambda r: r["seed"]):
            f = r["final"]
            if name != ref and r["seed"] in base:
                d, se = window_paired(out, base[r["seed"]], r)
                diff = f"{d:+.4f} +- {se:.4f}"
            else:
                diff = "-"
            lines.append(
                f"| {name} | {r['seed']} | {f['bpb']:.4f} +- {f['stderr']:.4f} | {diff} | {r['train_bpb_tail']:.3f} |"
            )
    lines += [
        "",
        f"Paired over seeds (d = configuration - {ref} per seed; SE = sd(d)/sqrt(n); detectable = {CALL_AT:g} SE, "
        f"with 80% power = {CALL_AT + Z_POWER_80:.2f} SE):",
        "",
        "| configuration | n | per-seed d | mean d +- SE | z | sd(d) | detectable at 3 SE | 80% power | "
        "beats by >= 3 SE |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in names:
        p = paired(
            {s: r["final"]["bpb"] for s, r in base.items()}, {r["seed"]: r["final"]["bpb"] for r in by_name[name]}
        )
        lines.append(
            f"| {name} | {len(p.seeds)} | {', '.join(f'{d:+.4f}' for d in p.diffs)} | {p.mean:+.4f} +- {p.se:.4f} | "
            f"{p.z:+.1f} | {p.sd:.4f} | {p.detectable:.4f} | {p.detectable_80:.4f} | "
            f"{'yes' if p.called and p.mean < 0 else 'no'} |"
        )
    return lines


def cmd_report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    data = json.loads((out / "results.json").read_text())
    runs, meta = data["runs"], data["meta"]
    scale = SCALES[meta["scale"]]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_name.setdefault(r["name"], []).append(r)
    scratch = [n for n in configs(scale.hidden) if n in by_name and n != "dense"]
    cont = [n for n in by_name if n.startswith("cont-") and n != "cont-dense"]
    run_s = sum(r["train_s"] + r["full_eval_s"] for r in runs)
    cpu_s = sum(r.get("cpu_s", 0.0) for r in runs)
    cpu = f"{cpu_s / 60:.0f} CPU-minutes (process time), " if cpu_s else ""
    # what the runs did (--steps / --cont-steps / --cont-lr override the scale's)
    scratch_steps = max((r["steps"] for r in runs if not r["name"].startswith("cont-")), default=scale.steps)
    cont_steps = max((r["steps"] for r in runs if r["name"].startswith("cont-")), default=scale.cont_steps)
    cont_lr = meta.get("cont_lr") or scale.lr
    lines = [
        "# MoE vs dense at equal active compute, paired seeds (held-out bits per byte)",
        "",
        *[f"- command: `python benchmarks/moe_quality.py {' '.join(c.split()[1:])}`" for c in meta["commands"]],
        f"- date: {meta['start']} to {meta.get('end', '?')}; device: {meta['device']}; load before "
        f"`{meta['uptime_before']}`, after `{meta.get('uptime_after', '?')}`",
        f"- scale `{meta['scale']}`: width {scale.width}, depth {scale.depth}, heads {scale.heads}, dense FFN hidden "
        f"{scale.hidden}, seq_len {scale.seq_len}, batch {scale.batch} ({scale.batch * scale.seq_len} bytes per step), "
        f"{scratch_steps} steps from scratch, {cont_steps} continued; AdamW lr {scale.lr:g} from scratch, "
        f"{cont_lr:g} continued, 20 warm-up steps, cosine to 0.1; one worker per run; base specs "
        "`jobs/compare-dense.yaml`, `jobs/compare-moe.yaml` (every expert-layout field set by the arm)",
        f"- final bpb: {meta['eval_bytes'] // scale.seq_len} held-out windows spread over the split (the `shardyard "
        "eval` path; the same windows for every run); same seed = same data order "
        "and the same initial embedding, attention, norms and head in every arm",
        f"- cost: {cpu}{run_s / 60:.0f} minutes of wall clock (under the load above) over {len(runs)} runs of one "
        "thread each",
        "",
    ]
    if args.flops:
        lines += ["## Active compute per byte (counted by shardyard.models.flops)", ""]
        rows = flops_table(scale)
        dense = rows[0]["flops_per_byte"]
        lines += [
            "| configuration | training MFLOP/byte | vs dense | parameters | active parameters |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['name']} | {r['flops_per_byte'] / 1e6:.3f} | {r['flops_per_byte'] / dense:.4f} | "
                f"{r['params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M |"
            )
        lines.append("")
    if "dense" in by_name:
        lines += ["## From scratch, equal steps", "", *comparison_lines(out, by_name, "dense", scratch), ""]
    if "cont-dense" in by_name and cont:
        lines += [
            f"## Upcycled vs dense, both continued {cont_steps} steps from the dense arm's final weights",
            "",
            *comparison_lines(out, by_name, "cont-dense", cont),
            "",
        ]
    steptime_file = out / "steptime.json"
    if steptime_file.exists() and "dense" in by_name:
        st = json.loads(steptime_file.read_text())
        t_dense = statistics_min(st["dense"])
        lines += [
            "## At equal wall clock",
            "",
            f"Step times in one process, one thread, {st['_meta']['rounds']} interleaved rounds of "
            f"{st['_meta']['steps_per_round']} steps (`moe_quality.py steptime`; load `{st['_meta']['uptime']}`); "
            "the ratio uses each configuration's fastest round (the least disturbed). A configuration slower per "
            "step than dense gets proportionally fewer steps in dense's time; its bpb there is read off its mid-run "
            "evaluations (linear interpolation), mean over seeds.",
            "",
            "| configuration | ms/step fastest (median) | vs dense | steps in dense's time | bpb then | dense bpb |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        dense_end = float(np.mean([r["evals"][-1]["bpb"] for r in by_name["dense"]]))
        for name in ["dense", *scratch]:
            if name not in st:
                continue
            t = statistics_min(st[name])
            rs = by_name[name]
            steps_eq = rs[0]["steps"] * t_dense / t
            at = float(np.mean([bpb_at(r, steps_eq) for r in rs]))
            note = " (run ended)" if steps_eq > rs[0]["steps"] * 1.02 else ""
            lines.append(
                f"| {name} | {1000 * t:.1f} ({1000 * st[name]['median_s']:.1f}) | {t / t_dense:.2f}x | "
                f"{steps_eq:.0f}{note} | {at:.4f} | {dense_end:.4f} |"
            )
        timed = [(r, timing_name(r["name"])) for r in runs if timing_name(r["name"]) in st]
        quiet_s = sum(r["steps"] * statistics_min(st[name]) for r, name in timed)
        lines += [
            "",
            f"Training compute at the fastest rounds' step times: {quiet_s / 60:.1f} CPU-minutes for the steps of "
            f"{len(timed)} of the {len(runs)} runs (a continuation timed as its from-scratch architecture; "
            "evaluation not included).",
        ]
        lines.append("")
    lines += [
        "## Expert load (last 20% of training, mean over layers and seeds)",
        "",
        "| configuration | max expert share | min expert share | even share | balance loss (1 = even) | dropped |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, rs in by_name.items():
        loads = [r["load"] for r in rs if r["load"]]
        if loads:
            experts = configs_experts(name)
            lines.append(
                f"| {name} | {np.mean([ld['max_share'] for ld in loads]):.3f} | "
                f"{np.mean([ld['min_share'] for ld in loads]):.3f} | {1 / experts if experts else float('nan'):.3f} | "
                f"{np.mean([ld['balance_loss'] for ld in loads]):.3f} | "
                f"{np.mean([ld['dropped_fraction'] for ld in loads]):.3f} |"
            )
    if args.plot:
        plot(by_name, Path(args.plot))
        lines += ["", f"![held-out bpb curves]({Path(args.plot).name})"]
    text = "\n".join(lines) + "\n"
    if args.md:
        Path(args.md).write_text(text)
    print(text)


def timing_name(name: str) -> str:
    """The steptime entry that times a run: a continuation is timed as its from-scratch architecture."""
    if name == "cont-dense":
        return "dense"
    if name.startswith("cont-upcycled-switch-"):
        return name.removeprefix("cont-upcycled-") + "-scale8"
    return name


def statistics_min(entry: dict[str, Any]) -> float:
    return float(entry["min_s"])


def configs_experts(name: str) -> int:
    """Routed experts per layer, from the configuration's name (NxH)."""
    for part in name.split("-"):
        head = part.removeprefix("fine").split("x")[0]
        if "x" in part and head.isdigit():
            return int(head)
    return 0


def plot(by_name: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Held-out bpb against steps (mid-run evaluations), every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, rs) in enumerate(by_name.items()):
        for r in rs:
            ev = r["evals"]
            ax.plot(
                [e["step"] for e in ev],
                [e["bpb"] for e in ev],
                "o-" if not name.startswith("cont-") else "s--",
                color=f"C{i}",
                ms=3,
                label=name if r["seed"] == min(x["seed"] for x in rs) else None,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("held-out bits per byte (mid-run windows)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def smoke() -> None:
    """run (--local: dense, top-2 and the upcycling pair at 4 steps of a depth-1 model, one seed),
    steptime and report with its plot, in a temp dir; fails when any run failed."""
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
    only = [name for name in configs(SCALES["cpu"].hidden) if name == "dense" or name.endswith("sigmoid-auxfree")]
    run_args = dict(
        out=str(out),
        steps=4,
        cont_steps=4,
        cont_lr=0.0,
        seeds=1,
        first_seed=0,
        parallel=2,
        only=only,
        local=True,
        scale="cpu",
        nice=0,
    )
    run_args["eval_bytes"] = 4096
    cmd_run(argparse.Namespace(**run_args, upcycle=True, device=SMOKE_DEVICE))
    runs = json.loads((out / "results.json").read_text())["runs"]
    if len(runs) != 4:
        names = {r["name"] for r in runs}
        for log in (out / "logs").glob("*.log"):
            if not any(log.name.startswith(slug(n, 0)) for n in names):
                print(log.read_text()[-3000:], file=sys.stderr)
        raise SystemExit(f"moe_quality smoke: runs failed; finished {sorted(names)}")
    cmd_steptime(
        argparse.Namespace(out=str(out), rounds=1, steps_per_round=1, only=only, scale="cpu", device=SMOKE_DEVICE)
    )
    cmd_report(argparse.Namespace(out=str(out), md=str(out / "report.md"), plot=str(out / "report.png"), flops=True))


SMOKE_DEVICE = "cpu"


def main() -> None:
    global SMOKE_DEVICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="run, steptime and report at seconds-long sizes")
    parser.add_argument("--smoke-device", choices=["cpu", "cuda"], default="cpu")
    sub = parser.add_subparsers(dest="cmd")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--scale", choices=list(SCALES), default="cpu")
        p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")

    p = sub.add_parser("run")
    common(p)
    p.add_argument("--steps", type=int, default=0, help="steps from scratch (0 = the scale's)")
    p.add_argument("--cont-steps", type=int, default=0, help="--upcycle continuation steps (0 = the scale's)")
    p.add_argument("--cont-lr", type=float, default=0.0, help="--upcycle continuations' peak lr (0 = the scale's)")
    p.add_argument("--seeds", type=int, default=3, help="paired seeds 0..n-1 of every configuration")
    p.add_argument("--first-seed", type=int, default=0, help="seeds first..first+n-1 (runs split over out dirs)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (each one worker, one thread)")
    p.add_argument("--only", action="append", default=[], help="this configuration (repeatable); default: 3")
    p.add_argument("--upcycle", action="store_true", help="also the upcycled-vs-continued-dense pair per seed")
    p.add_argument("--local", action="store_true", help="train in-process (benchmarks/train_local.py), not via Ray")
    p.add_argument("--nice", type=int, default=0, help="niceness of the training processes")
    p.add_argument("--eval-bytes", type=int, default=131072, help="final evaluation: held-out bytes (10**9 = all)")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("steptime")
    common(p)
    p.add_argument("--out", required=True)
    p.add_argument("--only", action="append", default=[])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.set_defaults(fn=cmd_steptime)
    p = sub.add_parser("flops")
    common(p)
    p.set_defaults(fn=cmd_flops)
    p = sub.add_parser("report")
    p.add_argument("--out", required=True)
    p.add_argument("--md", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--flops", action="store_true", help="add the counted active-compute table")
    p.set_defaults(fn=cmd_report)
    args = parser.parse_args()
    if args.smoke:
        SMOKE_DEVICE = args.smoke_device
        smoke()
    elif args.cmd is None:
        parser.error("a command is required: run, steptime, flops or report (or --smoke)")
    else:
        args.fn(args)


if __name__ == "__main__":
    main()
