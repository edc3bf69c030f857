"""How long a checkpoint save holds the training step: synchronous vs `checkpoint.async`.

One worker (a world of one, gloo), a dense model of ~20M and ~100M parameters with AdamW (a
checkpoint holds weights and both moments: ~12 bytes per parameter), the job's own Trainer and
checkpoint writer (runtime/saving.py) storing into a run directory on the local disk. Per round
and model, interleaved: a synchronous save (the step is held for the whole write: DCP into the
staging directory, the copy into the run, fsync, manifest), then an asynchronous one (the step is
held while DCP copies the state to CPU memory, plus the later finish: one poll per step and the
manifest), training steps running until its background write is done. Blocked time per save is
the time the training thread spends inside the writer; reported: median and spread (min-max) over
rounds, and the ratio async / sync (goal < 0.20), with the machine's load.

    python -m benchmarks.save_blocking --rounds 5 --out benchmarks/results/save-blocking-2026-12-05.md
    python -m benchmarks.save_blocking --smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SPEC = """name: {name}
seed: 0
model: {{kind: dense, width: {width}, depth: {depth}, heads: 8}}
data: {{paths: [stdlib], seq_len: 64, max_bytes: 2000000}}
optim: {{lr: 1.0e-4, schedule: {{warmup: 2}}}}
training: {{steps: 100000, batch_size: 1, eval_every: 0, eval_bytes: 2048, log_every: 1000}}
resources: {{workers: 1, cpus_per_worker: 1, max_failures: 0}}
checkpoint: {{dir: {storage}, every: 0, keep: 2}}
tracking: {{mode: disabled, step_anatomy: false}}
"""

SIZES = {"20M": (512, 6), "100M": (1024, 8)}
SMOKE_SIZES = {"1M": (192, 2)}


def build_trainer(name: str, width: int, depth: int, storage: Path):
    from shardyard.platform.spec import load_spec_text
    from shardyard.runtime.worker import LocalReporter, Trainer

    spec = load_spec_text(SPEC.format(name=name, width=width, depth=depth, storage=storage))
    run_dir = storage / name
    # no rotation here: Ray Train prunes old checkpoints in its controller, not in the training thread
    return Trainer(spec, run_dir, LocalReporter(run_dir, keep=1000))


def one_save(trainer, background: bool) -> tuple[float, int]:
    """Blocked seconds of one save in the given mode, and the steps trained while it wrote."""
    writer = trainer.writer
    writer.background = background
    trainer.train_step()
    trainer.step += 1
    meta = {
        "step": trainer.step,
        "name": trainer.spec.name,
        "layout": trainer.layout(),
        "scheduler": trainer.scheduler.state_dict(),
        "data_position": trainer.loader.position(),
    }
    start = time.perf_counter()
    writer.save(trainer.step, meta, {}, {"step": trainer.step})
    blocked = time.perf_counter() - start
    overlapped = 0
    while writer.pending is not None:
        trainer.train_step()  # the training the background write overlaps
        trainer.step += 1
        overlapped += 1
        start = time.perf_counter()
        writer.poll()
        blocked += time.perf_counter() - start
    return blocked, overlapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="a ~1M model, 2 rounds")
    args = parser.parse_args()
    sizes, rounds = (SMOKE_SIZES, 2) if args.smoke else (SIZES, args.rounds)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_before = os.getloadavg()[0]
    lines = [
        "# Time the training step is blocked per checkpoint save: synchronous vs checkpoint.async",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 2-core CPU, loaded (load avg {load_before:.1f} "
        f"before), one worker, dense model + AdamW, checkpoints into a run directory on the local disk, {rounds} "
        "interleaved rounds (sync then async per round).",
        "",
        f"    python -m benchmarks.save_blocking --rounds {rounds}" + (" --smoke" if args.smoke else ""),
        "",
        "| model | parameters | checkpoint MiB | sync blocked s (median, min-max) | async blocked s (median, min-max) "
        "| async / sync | steps trained during an async write (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="save-blocking-") as tmp:
        for label, (width, depth) in sizes.items():
            trainer = build_trainer(f"m{label}", width, depth, Path(tmp))
            params = sum(p.numel() for p in trainer.model.parameters())
            one_save(trainer, background=False)  # warm-up: first allocations, page cache
            sync, background, overlapped = [], [], []
            for _ in range(rounds):
                blocked, _ = one_save(trainer, background=False)
                sync.append(blocked)
                blocked, steps = one_save(trainer, background=True)
                background.append(blocked)
                overlapped.append(steps)
                print(f"{label}: sync {sync[-1]:.3f} s, async {background[-1]:.3f} s ({steps} steps)", flush=True)
            trainer.writer.close()
            size = trainer.writer.last_size or 0
            ratio = statistics.median(background) / statistics.median(sync)
            lines.append(
                f"| {label} | {params / 1e6:.1f}M | {size / 2**20:.0f} | {statistics.median(sync):.3f} "
                f"({min(sync):.3f}-{max(sync):.3f}) | {statistics.median(background):.3f} "
                f"({min(background):.3f}-{max(background):.3f}) | {ratio:.3f} | {statistics.median(overlapped):g} |"
            )
            print(f"{label}: async/sync blocked = {ratio:.3f}", flush=True)
    lines += ["", f"Load avg after: {os.getloadavg()[0]:.1f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
