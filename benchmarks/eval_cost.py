"""What validation costs in the shipped job specs, and how precise it is.

Runs every spec under jobs/ (or those named) with `shardyard run` as a user would (embedded Ray
cluster, the spec's own workers; wandb off, checkpoints to a scratch directory) and reads the run's
metrics.jsonl: seconds spent in training steps (time/step_ms x steps), seconds spent in validation
passes (eval_s), their ratio, and the final validation figure with its standard error.

    python benchmarks/eval_cost.py [--out DIR] [jobs/moe-tiny.yaml ...] [--set FIELD=VALUE ...]
    python benchmarks/eval_cost.py --smoke   # jobs/moe-tiny.yaml shrunk to seconds (1 worker), temp dir

Exits 1 when a run failed (its row says why).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_spec(spec: Path, out: Path, overrides: list[str]) -> dict:
    name = spec.stem
    shutil.rmtree(out / name, ignore_errors=True)  # a finished run would be resumed, not retrained
    command = [
        sys.executable,
        "-m",
        "shardyard.cli",
        "run",
        str(spec),
        "--set",
        f"name={name}",
        "--set",
        f"checkpoint.dir={out}",
        "--set",
        "tracking.mode=disabled",
    ]
    for override in overrides:
        command += ["--set", override]
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, cwd=out)
    wall = time.time() - start
    if done.returncode != 0:
        return {"spec": name, "error": (done.stdout + done.stderr)[-800:]}
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    train_s, last_step = 0.0, 0
    for record in train:
        train_s += record["time/step_ms"] * (record["step"] - last_step) / 1000.0
        last_step = record["step"]
    eval_s = sum(r["eval_s"] for r in evals)
    final = evals[-1]
    return {
        "spec": name,
        "steps": last_step,
        "train_s": train_s,
        "evals": len(evals),
        "eval_s": eval_s,
        "ratio": eval_s / train_s,
        "bpb": final["val_bpb"],
        "stderr": final["val_bpb_stderr"],
        "windows": final["val_windows"],
        "control_gain": final.get("val_control_gain", 1.0),
        "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=Path("/tmp/shardyard-eval-cost"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--smoke", action="store_true", help="jobs/moe-tiny.yaml shrunk to seconds, one worker, in a temp dir"
    )
    args = parser.parse_args()
    if args.smoke:
        sys.path.insert(0, str(ROOT))
        from benchmarks.smoke import TINY_JOB, hermetic_ray, smoke_dir

        args.out = smoke_dir("eval_cost")
        hermetic_ray(args.out)
        args.specs = args.specs or [ROOT / "jobs" / "moe-tiny.yaml"]
        args.overrides = [*TINY_JOB, *args.overrides]
    specs = args.specs or sorted((ROOT / "jobs").glob("*.yaml"))
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}")
    print(
        "| spec | steps | training s (steps) | eval passes | eval s | eval / training | final bpb +- s.e. | "
        "windows | control gain | job wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    failed = 0
    for spec in specs:
        row = run_spec(spec.resolve(), args.out, args.overrides)
        if "error" in row:
            print(f"| {row['spec']} | failed: {row['error'][-300:]!r} |", flush=True)
            failed += 1
            continue
        print(
            f"| {row['spec']} | {row['steps']} | {row['train_s']:.1f} | {row['evals']} | {row['eval_s']:.2f} | "
            f"{row['ratio']:.1%} | {row['bpb']:.4f} +- {row['stderr']:.4f} | {row['windows']} | "
            f"{row['control_gain']:.1f} | {row['wall_s']:.0f} |",
            flush=True,
        )
    print(f"# load after: {os.getloadavg()[0]:.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
