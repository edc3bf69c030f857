"""Recovery and platform overhead of `shardyard run`.

1. Recovery: a 2-worker run is SIGKILLed (one training worker, found by its pid in the heartbeat
   files) mid-run. Measured: seconds from the kill to the first step the restarted group logs,
   and to the first step beyond the one reached before the kill; steps lost (the step reached
   minus the checkpoint the restart began from; goal <= checkpoint.every); and, from the
   SAMPLE_LEDGER hook (every rank appends the window ids it draws), windows lost (drawn by the
   uninterrupted run, never by the recovered one) and windows repeated beyond the replayed steps.
   The final losses are compared with the uninterrupted run's.
2. Overhead: bytes/s of `shardyard run` (its metrics exclude evaluation and checkpoints) against a
   bare torchrun-style DDP loop (2 gloo processes, the same model built by the same registry, AdamW,
   one thread per rank as shardyard sets) on the same batch and sequence length. Goal >= 95%.

    python -m benchmarks.recovery --out benchmarks/results/recovery-2026-11-25.md
    python -m benchmarks.recovery --smoke   # every part at its smallest: 8-step runs, kill at 5 (Ray; minutes)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECOVERY_SPEC = """name: {name}
seed: 0
model: {{kind: moe, width: 64, depth: 2, heads: 2, ffn: {{hidden: 128}}, moe: {{num_experts: 4, top_k: 2}}}}
data: {{paths: [stdlib], seq_len: 64, max_bytes: 3000000}}
optim: {{lr: 3.0e-3, schedule: {{warmup: 4}}}}
training: {{steps: {steps}, batch_size: 4, eval_every: 0, eval_bytes: 2048, log_every: 1}}
resources: {{workers: 2, cpus_per_worker: 1, max_failures: 1}}
checkpoint: {{dir: {storage}, every: {every}, keep: 2}}
tracking: {{mode: disabled}}
"""

OVERHEAD_SPEC = """name: {name}
seed: 0
model: {{kind: dense, width: 128, depth: 4, heads: 4, ffn: {{hidden: 384}}}}
data: {{paths: [stdlib], seq_len: 256, max_bytes: 3000000}}
optim: {{lr: 3.0e-3, schedule: {{warmup: 4}}}}
training: {{steps: {steps}, batch_size: 8, eval_every: 0, eval_bytes: 2048, log_every: 1}}
resources: {{workers: 2, cpus_per_worker: 1, max_failures: 0}}
checkpoint: {{dir: {storage}, every: 0, keep: 2}}
tracking: {{mode: disabled}}
"""


def metric_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r for r in out if r.get("kind") == "train"]


def run(spec: Path, env: dict[str, str], out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "shardyard.cli", "run", str(spec)],
        stdout=open(out, "w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, **env},
    )


def ledger(directory: Path) -> collections.Counter:
    windows: collections.Counter = collections.Counter()
    for f in directory.glob("*.txt"):
        windows.update(tuple(map(int, line.split())) for line in f.read_text().splitlines())
    return windows


def recovery(tmp: Path, steps: int, every: int, kill_at: int) -> dict:
    from shardyard.platform.run_dir import RunDir
    from shardyard.runtime.watchdog import read_heartbeats

    results: dict = {"steps": steps, "checkpoint_every": every, "global_batch": 8}
    runs = {}
    for name in ("uninterrupted", "killed"):
        spec = tmp / f"{name}.yaml"
        spec.write_text(RECOVERY_SPEC.format(name=name, steps=steps, every=every, storage=tmp / "runs"))
        (tmp / f"ledger-{name}").mkdir()
        env = {"SHARDYARD_SAMPLE_LEDGER": str(tmp / f"ledger-{name}")}
        start = time.time()
        proc = run(spec, env, tmp / f"{name}.out")
        run_dir = tmp / "runs" / name
        if name == "killed":
            while not (
                len(read_heartbeats(RunDir(run_dir).heartbeats)) == 2
                and max((r["step"] for r in metric_records(run_dir)), default=0) >= kill_at
            ):
                time.sleep(0.02)
                if proc.poll() is not None:
                    raise RuntimeError((tmp / f"{name}.out").read_text()[-3000:])
            victim = read_heartbeats(RunDir(run_dir).heartbeats)[1]["pid"]
            reached = max(r["step"] for r in metric_records(run_dir))
            killed_at = time.time()
            os.kill(victim, signal.SIGKILL)
            results.update(step_reached_before_kill=reached)
        rc = proc.wait(timeout=900)
        if rc != 0:
            raise RuntimeError((tmp / f"{name}.out").read_text()[-3000:])
        results[f"{name}_wall_s"] = round(time.time() - start, 1)
        runs[name] = run_dir
    events = [json.loads(line) for line in (runs["killed"] / "events.jsonl").read_text().splitlines()]
    retry = next(e for e in events if e["event"] == "retry")
    # Records after the failure decision come from the restarted group (the dying one may log a step late).
    after = [r for r in metric_records(runs["killed"]) if r["time"] > retry["time"]]
    reached = results["step_reached_before_kill"]
    results.update(
        restart_step=retry["restart_step"],
        event_line=retry["message"],
        kill_to_failure_detected_s=round(retry["time"] - killed_at, 2),
        kill_to_first_step_s=round(after[0]["time"] - killed_at, 2),
        kill_to_new_progress_s=round(next(r for r in after if r["step"] > reached)["time"] - killed_at, 2),
        steps_lost=reached - retry["restart_step"],
    )
    reference, recovered = ledger(tmp / "ledger-uninterrupted"), ledger(tmp / "ledger-killed")
    lost = sum((reference - recovered).values())
    extra = sum((recovered - reference).values())
    results.update(
        windows_uninterrupted=sum(reference.values()),
        windows_lost=lost,
        windows_drawn_again=extra,
        windows_drawn_again_beyond_replayed_steps=max(0, extra - results["steps_lost"] * 8 - 8),
    )  # + the step in flight at the kill
    a = {r["step"]: r["loss"] for r in metric_records(runs["uninterrupted"])}
    b = {r["step"]: r["loss"] for r in metric_records(runs["killed"])}  # a replayed step keeps its last record
    results["max_loss_difference"] = max(abs(a[s] - b[s]) for s in a)
    return results


# ------------------------------------------------------------------------------ bare DDP loop
def _bare_rank(rank: int, world: int, store: str, spec_text: str, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from shardyard.models import build_model
    from shardyard.platform.spec import load_spec_text

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    spec = load_spec_text(spec_text)
    torch.manual_seed(spec.seed)
    # As shardyard's DDP step: no buffer broadcast in every forward (the models' buffers are constant).
    model = DistributedDataParallel(build_model(spec.model, spec.data.seq_len), forward_sync_buffers=False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.optim.lr, betas=spec.optim.betas, weight_decay=spec.optim.weight_decay
    )
    generator = torch.Generator().manual_seed(rank)
    batch, seq = spec.training.batch_size, spec.data.seq_len
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        window = torch.randint(0, 256, (batch, seq + 1), generator=generator)
        _, ce = model(window[:, :-1], window[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        ce.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optim.grad_clip)
        optimizer.step()
        loss = ce.detach().reshape(1)
        dist.all_reduce(loss)  # shardyard logs the mean loss every step (log_every 1)
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def _bare_bytes_per_s(tmp: Path, spec_text: str, steps: int, warmup: int, tag: str) -> float:
    import torch.multiprocessing as mp

    times_file = tmp / f"bare-{tag}.json"
    mp.spawn(_bare_rank, args=(2, str(tmp / f"store-{tag}"), spec_text, steps, str(times_file)), nprocs=2, join=True)
    return 2 * 8 * 256 / statistics.median(json.loads(times_file.read_text())[warmup:])


def overhead(tmp: Path, steps: int, warmup: int) -> dict:
    """Bare loop, shardyard, bare loop again (the machine's load drifts; both bare figures are kept).
    shardyard's rate is taken two ways: its own tokens_per_s metric, and the wall time between
    consecutive step records (everything the driver and workers do per step)."""
    spec_text = OVERHEAD_SPEC.format(name="overhead", steps=steps, storage=tmp / "runs")
    bare_before = _bare_bytes_per_s(tmp, spec_text, steps, warmup, "before")
    spec = tmp / "overhead.yaml"
    spec.write_text(spec_text)
    proc = run(spec, {}, tmp / "overhead.out")
    if proc.wait(timeout=900) != 0:
        raise RuntimeError((tmp / "overhead.out").read_text()[-3000:])
    records = [r for r in metric_records(tmp / "runs" / "overhead") if r["step"] > warmup]
    metric = statistics.median(r["tokens_per_s"] for r in records)
    gaps = [b["time"] - a["time"] for a, b in zip(records, records[1:])]
    wall = 2 * 8 * 256 / statistics.median(gaps)
    bare_after = _bare_bytes_per_s(tmp, spec_text, steps, warmup, "after")
    bare = (bare_before + bare_after) / 2
    return {
        "model": "dense width 128 depth 4, seq 256, batch 8/worker, 2 workers x 1 CPU",
        "steps": steps,
        "warmup_steps_skipped": warmup,
        "shardyard_metric_bytes_per_s": round(metric),
        "shardyard_wall_bytes_per_s": round(wall),
        "bare_ddp_bytes_per_s_before": round(bare_before),
        "bare_ddp_bytes_per_s_after": round(bare_after),
        "ratio_wall": round(wall / bare, 3),
        "ratio_metric": round(metric / bare, 3),
    }


def _boundary_rank(rank: int, world: int, store: str, spec_text: str, calls: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from shardyard.platform.spec import load_spec_text
    from shardyard.runtime.preemption import StepBoundary

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    spec = load_spec_text(spec_text)
    boundary = StepBoundary(spec, Path(out).parent, rank, world, torch.device("cpu"))
    times = []
    for step in range(calls):
        start = time.perf_counter()
        boundary.agree(step)
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def boundary_cost(tmp: Path, calls: int = 2000) -> dict:
    """What the reliability machinery adds to every step: StepBoundary.agree (a stat of the STOP
    file and a 2-float all_reduce) on 2 gloo ranks."""
    import torch.multiprocessing as mp

    spec_text = OVERHEAD_SPEC.format(name="boundary", steps=10, storage=tmp / "runs")
    out = tmp / "boundary.json"
    mp.spawn(_boundary_rank, args=(2, str(tmp / "store-boundary"), spec_text, calls, str(out)), nprocs=2, join=True)
    times = sorted(json.loads(out.read_text())[min(100, calls // 2) :])  # the first calls warm up
    return {
        "calls": calls,
        "median_us": round(1e6 * statistics.median(times), 1),
        "p90_us": round(1e6 * times[int(0.9 * len(times))], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10, help="checkpoint.every of the recovery runs")
    parser.add_argument("--kill-at", type=int, default=25)
    parser.add_argument("--overhead-steps", type=int, default=40)
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--only", choices=["recovery", "overhead", "boundary"], default=None)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every part at its smallest: 8-step runs, checkpoint every 4, kill at step 5, 200 boundary calls",
    )
    args = parser.parse_args()
    warmup, calls = 5, 2000
    if args.smoke:
        sys.path.insert(0, str(ROOT))
        from benchmarks.smoke import hermetic_ray, smoke_dir

        scratch = smoke_dir("recovery")
        hermetic_ray(scratch)
        args.steps, args.every, args.kill_at, args.overhead_steps, warmup, calls = 8, 4, 5, 8, 2, 200
        args.json = str(scratch / "recovery.json")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="shardyard-recovery-") as tmp:
        rec = (
            recovery(Path(tmp), args.steps, args.every, args.kill_at)
            if args.only is None or args.only == "recovery"
            else None
        )
        ovh = (
            overhead(Path(tmp), args.overhead_steps, warmup=warmup)
            if args.only not in ("recovery", "boundary")
            else None
        )
        boundary = boundary_cost(Path(tmp), calls)
    result = {
        "recovery": rec,
        "overhead": ovh,
        "step_boundary": boundary,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
