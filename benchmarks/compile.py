"""training.compile on CPU: the Trainer's step (forward, backward, clip, AdamW) eager vs compiled, for
moe-tiny, a 46M-parameter MoE (width 384, depth 6, top-2 of 8 experts of 768; ~14M active) and a
dense model (jobs/compare-dense.yaml), one worker, one thread.

Both Trainers of a model live in this process; after the compiled one's first steps (its compile time,
reported) the two take turns, `--steps` steps each per round, so load drifts hit both alike. Reported:
the median step time (wall and CPU) over rounds, its spread, the speed-up, and whether the losses of
the two runs agree (same data, same initial weights).

    python benchmarks/compile.py [--rounds 5] [--steps 5] [--models moe-tiny,moe-46m,dense]
    python benchmarks/compile.py --smoke     # a 2-block toy, 1 round (tens of seconds: it compiles)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardyard.platform.spec import load_spec  # noqa: E402
from shardyard.runtime.worker import LocalReporter, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MOE_46M = [
    "model.preset=null",
    "model.width=384",
    "model.depth=6",
    "model.heads=6",
    "model.ffn.hidden=768",
    "model.moe.num_experts=8",  # top-2 of 8 experts of 768: the expert layout spelled out (moe-tiny's is fine-grained)
    "model.moe.top_k=2",
    "model.moe.expert_hidden=768",
    "model.moe.shared_experts=0",
    "model.moe.routed_scale=1.0",
]
MODELS: dict[str, tuple[str, list[str]]] = {
    "moe-tiny": ("jobs/moe-tiny.yaml", []),
    "moe-46m": ("jobs/moe-tiny.yaml", MOE_46M),
    "dense": ("jobs/compare-dense.yaml", []),
}
SMOKE = (
    "jobs/moe-tiny.yaml",
    ["model.preset=null", "model.width=32", "model.depth=2", "model.heads=2", "model.ffn.hidden=64"],
)
COMMON = ["resources.workers=1", "training.eval_bytes=1024", "data.max_bytes=2000000", "tracking.mode=disabled"]


def trainer(spec_path: str, overrides: list[str], compiled: bool, root: Path, name: str) -> Trainer:
    sets = [*COMMON, *overrides, f"training.compile={str(compiled).lower()}", f"name={name}", f"checkpoint.dir={root}"]
    spec = load_spec(str(ROOT / spec_path), sets)
    return Trainer(spec, root / name, LocalReporter(root / name, 1))


def timed_steps(t: Trainer, steps: int) -> tuple[list[float], list[float], list[float]]:
    walls, cpus, losses = [], [], []
    for _ in range(steps):
        w, c = time.perf_counter(), time.process_time()
        out = t.train_step()
        losses.append(float(out["ce"]))
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return walls, cpus, losses


def bench(label: str, spec_path: str, overrides: list[str], rounds: int, steps: int, root: Path) -> str:
    eager = trainer(spec_path, overrides, False, root, f"{label}-eager")
    compiled = trainer(spec_path, overrides, True, root, f"{label}-compiled")
    params = sum(p.numel() for p in eager.model.parameters())
    start = time.perf_counter()
    _, _, first_c = timed_steps(compiled, 2)  # compiles forward and backward
    compile_s = time.perf_counter() - start
    _, _, first_e = timed_steps(eager, 2)
    med: dict[str, list[float]] = {"eager": [], "compiled": []}
    cpu: dict[str, list[float]] = {"eager": [], "compiled": []}
    losses = {"eager": first_e, "compiled": first_c}
    for _ in range(rounds):
        for name, t in (("eager", eager), ("compiled", compiled)):
            walls, cpus, ls = timed_steps(t, steps)
            med[name].append(statistics.median(walls))
            cpu[name].append(statistics.median(cpus))
            losses[name] += ls
    e, c = statistics.median(med["eager"]), statistics.median(med["compiled"])
    ec, cc = statistics.median(cpu["eager"]), statistics.median(cpu["compiled"])
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses["compiled"], losses["eager"]))
    return (
        f"| {label} | {params / 1e6:.1f}M | {1e3 * e:.0f} ({1e3 * min(med['eager']):.0f}..{1e3 * max(med['eager']):.0f}) "
        f"| {1e3 * c:.0f} ({1e3 * min(med['compiled']):.0f}..{1e3 * max(med['compiled']):.0f}) | {e / c:.2f} "
        f"| {ec / cc:.2f} | {compile_s:.0f} | {diff:.1e} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {"toy": SMOKE} if args.smoke else {m: MODELS[m] for m in args.models.split(",")}
    rounds, steps = (1, 2) if args.smoke else (args.rounds, args.steps)
    print(f"torch {torch.__version__}, 1 thread, {rounds} interleaved rounds of {steps} steps; load {os.getloadavg()}")
    print(
        "\n| model | params | eager ms/step (spread of round medians) | compiled ms/step | speed-up (wall) "
        "| speed-up (CPU) | first 2 compiled steps s | max rel. loss diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="shardyard-compile-") as tmp:
        for label, (spec_path, overrides) in models.items():
            print(bench(label, spec_path, overrides, rounds, steps, Path(tmp)), flush=True)
    print(f"\nload after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
