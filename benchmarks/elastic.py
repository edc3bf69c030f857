"""Goodput of an elastic job vs a fixed-size job over a scripted node loss and return.

A real 2-node Ray cluster on this machine (two raylets of 2 CPUs, `ray.cluster_utils.Cluster`, fast
health checks). Each round runs the same MoE job (global batch 12, checkpoint every 10 steps) twice,
interleaved: `fixed` (`resources.workers: 4`) and `elastic` (`{min: 2, max: 4}`). The script: once
the job has logged `--kill-at` steps, the second node's raylet is SIGKILLed; `--away` seconds later a
new node of 2 CPUs joins. The fixed job can only wait for the node; the elastic one goes on at 2
workers, then grows back (checkpointing first).

Measured per run: wall time from the start to the end of the job, goodput = steps / wall (every step
is useful: the same steps are trained either way), seconds from the node loss to the first step
logged after it by a new group, and steps redone (the newest step logged before each resume minus the
step it resumed from). Printed as a table with the median and spread over rounds and the ratio
elastic / fixed; the machine's load average is printed with it.

`--jobs` picks the jobs of a round (default `fixed elastic`); `elastic-async` is the elastic job with
`checkpoint.async: true`. A wall time runs to the later of the job's end and the node's return (the
script waits the outage out first): a job that finishes during the outage is timed to the node's
return, and its goodput is then a lower bound.

    python -m benchmarks.elastic --out benchmarks/results/elastic-2026-12-05.md
    python -m benchmarks.elastic --jobs fixed elastic elastic-async --away 120
    python -m benchmarks.elastic --smoke   # one round of short runs (Ray; minutes)
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARDYARD = [sys.executable, "-m", "shardyard.cli"]

SPEC = """name: {name}
seed: 0
model: {{kind: moe, width: 32, depth: 2, heads: 2, ffn: {{hidden: 64}}, moe: {{num_experts: 4, top_k: 2, balance_scope: global}}}}
data: {{paths: [stdlib], seq_len: 64, max_bytes: 3000000}}
optim: {{lr: 3.0e-3, schedule: {{warmup: 4}}}}
training: {{steps: {steps}, batch_size: 3, global_batch: 12, eval_every: 0, eval_bytes: 2048, log_every: 1}}
parallel: {{expert_parallel: auto}}
resources: {{workers: {workers}, cpus_per_worker: 1, max_failures: 5, resize_interval_s: 5}}
checkpoint: {{dir: {storage}, every: 10, keep: 3, async: {background}}}
tracking: {{mode: disabled}}
"""


# job -> (resources.workers, checkpoint.async)
JOBS = {"fixed": ("4", False), "elastic": ("{min: 2, max: 4}", False), "elastic-async": ("{min: 2, max: 4}", True)}


def records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def newest_step(run_dir: Path) -> int:
    return max((r["step"] for r in records(run_dir) if r.get("kind") == "train"), default=0)


def steps_redone(run_dir: Path) -> list[int]:
    """Per resume: the newest step logged before it minus the step it resumed from."""
    out, newest = [], 0
    for record in records(run_dir):
        if record.get("kind") == "train":
            newest = max(newest, record["step"])
        elif record.get("event") == "resume":
            out.append(newest - record["step"])
    return out


def lose_node(node: Any) -> None:
    """The node's machine goes away: its raylet and every process under it (the training workers on
    it) are SIGKILLed at once. Killing the raylet alone lets its workers train on until they notice."""
    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    doomed = [raylet, *raylet.children(recursive=True)]
    for process in doomed:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def one_run(cluster: Any, tmp: Path, name: str, job: tuple[str, bool], steps: int, kill_at: int, away_s: float) -> dict:
    workers, background = job
    spec = tmp / f"{name}.yaml"
    text = SPEC.format(
        name=name, steps=steps, workers=workers, storage=tmp / "runs", background=str(background).lower()
    )
    spec.write_text(text)
    run_dir = tmp / "runs" / name
    out = tmp / f"{name}.out"
    start = time.time()
    proc = subprocess.Popen(
        [*SHARDYARD, "run", str(spec), "--address", cluster.address],
        stdout=open(out, "w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    while newest_step(run_dir) < kill_at:
        if proc.poll() is not None:
            raise RuntimeError(out.read_text()[-3000:])
        time.sleep(0.05)
    other = next(n for n in cluster.list_all_nodes() if n is not cluster.head_node)
    lost_at = time.time()
    lose_node(other)
    time.sleep(away_s)
    cluster.remove_node(other, allow_graceful=False)
    cluster.add_node(num_cpus=2, object_store_memory=120 * 1024**2)
    if proc.wait(timeout=1800) != 0:
        raise RuntimeError(out.read_text()[-3000:])
    wall = time.time() - start
    resumed = [r for r in records(run_dir) if r.get("event") == "resume"]
    after = [r for r in records(run_dir) if r.get("kind") == "train" and resumed and r["time"] > resumed[0]["time"]]
    if not after:
        raise RuntimeError(
            f"{name}: no step was trained after the node loss (resumes: {resumed}); "
            f"the job ended before the loss took effect: raise --steps above {steps}"
        )
    return {
        "wall_s": wall,
        "goodput_steps_per_s": steps / wall,
        "loss_to_training_s": after[0]["time"] - lost_at,
        "steps_redone": steps_redone(run_dir),
        "worlds": [r["world"] for r in resumed],
    }


def start_cluster() -> Any:
    import ray
    from ray.cluster_utils import Cluster

    fast_health = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "object_store_memory": 120 * 1024**2,
            "include_dashboard": False,
            "_system_config": fast_health,
        },
    )
    cluster.add_node(num_cpus=2, object_store_memory=120 * 1024**2)
    ray.init(address=cluster.address, logging_level="WARNING")
    return cluster


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one round of short runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kill-at", type=int, default=25)
    parser.add_argument("--away", type=float, default=60.0, help="seconds the lost node stays away")
    parser.add_argument("--out", type=Path, help="write the results (markdown) here")
    parser.add_argument(
        "--jobs", nargs="+", choices=list(JOBS), default=["fixed", "elastic"], help="the jobs each round runs, in order"
    )
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps, args.kill_at, args.away = 1, 60, 12, 15.0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    from shardyard.cluster.auth import ensure_token

    if args.smoke:
        from benchmarks.smoke import hermetic_ray, smoke_dir

        scratch = smoke_dir("elastic")
        hermetic_ray(scratch)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="shardyard-elastic-"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        ensure_token(generate=True)

    results: dict[str, list[dict]] = {kind: [] for kind in args.jobs}
    load_before = os.getloadavg()
    for round_ in range(args.rounds):
        for kind in args.jobs[:: 1 if round_ % 2 == 0 else -1]:
            cluster = start_cluster()  # a fresh cluster per run: both start from 2 nodes
            try:
                run = one_run(cluster, scratch, f"{kind}-{round_}", JOBS[kind], args.steps, args.kill_at, args.away)
            finally:
                ray.shutdown()
                cluster.shutdown()
            results[kind].append(run)
            print(f"round {round_} {kind}: {json.dumps(run)}", flush=True)
    load_after = os.getloadavg()
    lines = [
        "| job | wall s | goodput steps/s | node loss -> training again, s | steps redone per resume |",
        "|---|---|---|---|---|",
    ]
    for kind, runs in results.items():
        lines.append(
            f"| {kind} | {spread([r['wall_s'] for r in runs])} | {spread([r['goodput_steps_per_s'] for r in runs])} | "
            f"{spread([r['loss_to_training_s'] for r in runs])} | {[r['steps_redone'] for r in runs]} |"
        )
    lines.append("")
    for kind in (k for k in args.jobs if k != "fixed" and "fixed" in results):
        ratio = [e["goodput_steps_per_s"] / f["goodput_steps_per_s"] for f, e in zip(results["fixed"], results[kind])]
        lines.append(f"goodput {kind} / fixed: {spread(ratio)} (median [min, max] over {args.rounds} rounds)")
    lines.append(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        args.out.write_text(
            f"# Elastic vs fixed-size goodput, {time.strftime('%Y-%m-%d')}\n\n"
            f"Device: {os.cpu_count()}-core CPU; load average before {load_before[0]:.1f}, after {load_after[0]:.1f}.\n"
            f"Command: `python -m benchmarks.elastic {' '.join(sys.argv[1:])}`\n"
            f"Steps {args.steps}, node lost at step {args.kill_at}, away {args.away:.0f} s, rounds {args.rounds}.\n\n"
            f"{text}\n\nRuns:\n\n```\n{json.dumps(results, indent=1)}\n```\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
