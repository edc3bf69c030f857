"""Pipeline bubble per schedule, measured against its formula, on 2 real gloo ranks (pp 2).

    python benchmarks/pipeline.py                  # dense 256 x 8 blocks, m in 2 4 8, 3 rounds (~minutes)
    python benchmarks/pipeline.py --smoke          # tiny model, one round, results to a temp dir

Each rank runs the job's own pipeline (runtime.parallel.pipeline: the model split by
split_into_stages, torch.distributed.pipelining schedules) for every (schedule, micro-batches)
configuration, configurations interleaved round-robin so drift hits all equally. A configuration's
step is timed on each rank (wall) next to the compute its stages did (the schedule's forward and
backward calls, timed by the pipeline's stages); the measured bubble of a rank is 1 - compute / wall
(waiting on the other stage and the activation transfers), averaged over the two ranks. The formula
assumes equal stages and free transfers: (p-1)/(m+p-1) for 1f1b and gpipe, (p-1)/(v m+p-1) for
interleaved_1f1b with v stages per rank. Micro-batches keep their size (the batch grows with m).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")
PP = 2


def _spec(args: argparse.Namespace, schedule: str, microbatches: int):
    from shardyard.platform.spec import load_spec_text

    text = (
        f"name: bubble\nmodel: {{kind: dense, width: {args.width}, depth: {args.depth}, heads: 4}}\n"
        f"data: {{seq_len: {args.seq_len}}}\n"
        f"training: {{batch_size: {args.micro_batch * microbatches}}}\n"
        f"parallel: {{pipeline_parallel: {PP}, pipeline: {{schedule: {schedule}, microbatches: {microbatches}}}}}\n"
        f"resources: {{workers: {PP}}}\n"
    )
    return load_spec_text(text, "bubble.yaml")


def _rank(topology, args: argparse.Namespace, out: str) -> None:
    import torch

    from shardyard.models import build_model
    from shardyard.runtime.parallel.dims import ParallelDims
    from shardyard.runtime.parallel.pipeline import Pipeline, split_into_stages

    torch.set_num_threads(1)
    dims = ParallelDims(topology, pp=PP).build("cpu")
    configs = {}
    for schedule in SCHEDULES:
        for m in args.microbatches:
            spec = _spec(args, schedule, m)
            torch.manual_seed(0)
            model = build_model(spec.model, args.seq_len)
            stages = split_into_stages(model, dims, spec.parallel.pipeline)
            configs[(schedule, m)] = (model, Pipeline(stages, dims, spec, torch.device("cpu")), spec)
    samples: dict[str, list[float]] = {f"{s} {m}": [] for s, m in configs}
    for _ in range(args.rounds):
        for (schedule, m), (model, pipeline, spec) in configs.items():
            batch = spec.training.batch_size
            x = torch.randint(0, 256, (batch, args.seq_len))
            pipeline.forward_backward(x, x, 1.0)  # warm-up (buffers, first-call costs)
            pipeline.take_compute_seconds()
            for _ in range(args.steps):
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                pipeline.forward_backward(x, x, 1.0)
                wall = time.perf_counter() - start
                compute = sum(pipeline.take_compute_seconds().values())
                samples[f"{schedule} {m}"].append(max(0.0, 1.0 - compute / wall))
    Path(out, f"rank{topology.rank}.json").write_text(json.dumps(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    parser.add_argument("--out", type=Path, default=RESULTS / f"pipeline-{time.strftime('%Y-%m-%d')}.md")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.width, args.depth, args.seq_len, args.micro_batch = 64, 4, 32, 2
        args.microbatches, args.rounds, args.steps = [2, 4], 1, 1
        args.out = Path(tempfile.mkdtemp(prefix="pipeline-smoke-")) / "pipeline.md"

    from shardyard.comm.launch import spawn
    from shardyard.runtime.parallel.pipeline import bubble_fraction

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        spawn(_rank, PP, PP, args, tmp)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(PP)]
    load_after = os.getloadavg()[0]
    lines = [
        "# Pipeline bubble per schedule against its formula",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 2-core CPU, loaded (load avg {load_before:.1f} "
        f"before, {load_after:.1f} after); 2 gloo ranks x 1 thread; dense width {args.width}, {args.depth} blocks, "
        f"seq {args.seq_len}, micro-batches of {args.micro_batch} sequences; {args.rounds} rounds x {args.steps} "
        "steps per configuration, interleaved.",
        "",
        f"Command: `python benchmarks/pipeline.py{' --smoke' if args.smoke else ''}`",
        "",
        "| schedule | m | measured bubble (median, min-max over rounds x ranks) | formula | measured / formula |",
        "|---|---|---|---|---|",
    ]
    for key in ranks[0]:
        schedule, m = key.split()
        values = [v for rank in ranks for v in rank[key]]
        formula = bubble_fraction(schedule, PP, int(m), 2)
        median = statistics.median(values)
        lines.append(
            f"| {schedule} | {m} | {median:.3f} ({min(values):.3f}-{max(values):.3f}) | {formula:.3f} | "
            f"{median / formula:.2f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
