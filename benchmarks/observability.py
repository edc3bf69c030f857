"""What the step-anatomy timers and the observability records cost.

Trains the same small MoE in one process with `tracking.step_anatomy` on and off, interleaved
(on, off, on, off, ...) so drift in machine load hits both alike, and compares the median time of
a training step (the Trainer's own train_step, timed outside it). Also checks the losses are
bit-identical (timers read clocks only) and prints the logged record's key count and the time of
one logging call (anatomy reduce, memory, expert-load summaries and side file).

    python benchmarks/observability.py [--rounds 5] [--steps 30]
    python benchmarks/observability.py --smoke    # 1 round of 5 steps (seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shardyard.platform.spec import load_spec_text
from shardyard.runtime.worker import LocalReporter, Trainer

SPEC = """name: {name}
seed: 0
model: {{kind: moe, width: 128, depth: 4, heads: 4, ffn: {{hidden: 256}}, moe: {{num_experts: 16, top_k: 2}}}}
data: {{paths: [stdlib], seq_len: 128, max_bytes: 2000000}}
optim: {{lr: 1.0e-3, schedule: {{warmup: 2}}}}
training: {{steps: {steps}, batch_size: 8, eval_every: 0, eval_bytes: 1024, log_every: 10}}
resources: {{workers: 1, cpus_per_worker: 1, max_failures: 0}}
checkpoint: {{dir: {root}, every: 0, keep: 2}}
tracking: {{mode: disabled, step_anatomy: {anatomy}}}
"""


def one_run(root: Path, name: str, steps: int, anatomy: bool) -> tuple[list[float], list[float], float, int]:
    spec = load_spec_text(SPEC.format(name=name, steps=steps, root=root, anatomy=str(anatomy).lower()))
    run_dir = root / name
    trainer = Trainer(spec, run_dir, LocalReporter(run_dir, 2))
    step_s, losses = [], []
    log_s, keys = 0.0, 0
    for _ in range(steps):
        trainer.timer.start_step()
        start = time.perf_counter()
        out = trainer.train_step()
        step_s.append(time.perf_counter() - start)
        trainer.timer.end_step()
        trainer.expert_window.add_step()
        trainer.step += 1
        losses.append(float(out["ce"]))
    start = time.perf_counter()
    record = trainer.observe(steps, sum(step_s))
    log_s = time.perf_counter() - start
    keys = len(record)
    return step_s[3:], losses, log_s, keys  # the first steps warm up allocators


def section_cost_s(calls: int = 200_000) -> float:
    """Seconds one timed section adds (enter + exit of StepTimer.section around nothing), CPU path."""
    from shardyard.tracking.anatomy import StepTimer

    timer = StepTimer(torch.device("cpu"))
    start = time.perf_counter()
    for _ in range(calls):
        with timer.section("x"):
            pass
    timed = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(calls):
        pass
    return (timed - (time.perf_counter() - start)) / calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="1 round of 5 steps (seconds; figures meaningless)")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps = 1, 5
    torch.set_num_threads(1)
    print(f"load before: {os.getloadavg()}")
    medians: dict[bool, list[float]] = {True: [], False: []}
    losses: dict[bool, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for anatomy in (True, False):
                steps, run_losses, log_s, keys = one_run(Path(tmp), f"r{r}{int(anatomy)}", args.steps, anatomy)
                medians[anatomy].append(statistics.median(steps))
                losses.setdefault(anatomy, run_losses)
                if anatomy and r == 0:
                    print(f"one logging call: {1000 * log_s:.1f} ms, {keys} keys")
    print(f"load after: {os.getloadavg()}")
    on, off = statistics.median(medians[True]), statistics.median(medians[False])
    ratios = [a / b for a, b in zip(medians[True], medians[False])]
    print(
        f"step time, median of {args.rounds} rounds x {args.steps - 3} steps: timers on {1000 * on:.2f} ms, "
        f"off {1000 * off:.2f} ms; on/off {on / off:.4f} (per-round ratios {min(ratios):.4f}..{max(ratios):.4f})"
    )
    print(f"losses identical with timers on and off: {losses[True] == losses[False]}")
    cost = section_cost_s(20_000 if args.smoke else 200_000)
    sections = 4 + 1  # data, forward, backward per micro-batch (grad_accum 1), optimizer, and the step clock
    print(
        f"one timed section costs {1e6 * cost:.2f} us; {sections} per step = {100 * sections * cost / off:.4f}% "
        f"of this model's step ({1000 * off:.1f} ms); a 10 ms step would pay {100 * sections * cost / 0.01:.3f}%"
    )


if __name__ == "__main__":
    main()
