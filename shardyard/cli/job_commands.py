"""Commands that take a job spec: validate | run | submit | prepare | plan, and schema (the spec's own
reference). Modules that import torch or Ray are imported inside the command that needs them, so that
a command that needs neither starts in a fraction of a second."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from shardyard import envvars
from shardyard.cli.arguments import add_fault_step, add_jobs_address, add_spec
from shardyard.cli.output import plan_table, spec_summary, training_summary
from shardyard.cli.preflight import preflight
from shardyard.platform.errors import UserError
from shardyard.platform.run_dir import RunDir
from shardyard.platform.spec import json_schema, load_spec


def set_test_hooks(args: argparse.Namespace) -> None:
    """`--fault-step N` (hidden, tests only) sets envvars.FAULT_STEP here; the embedded cluster and
    job submission forward every SHARDYARD_* variable to the workers, which read it where it acts."""
    if args.fault_step is not None:
        os.environ[envvars.FAULT_STEP] = str(args.fault_step)


def cmd_validate(args: argparse.Namespace) -> int:
    pre = preflight(args.spec, args.set)
    print(spec_summary(pre, RunDir.of(pre.spec).path))
    print(f"predicted memory per worker {pre.memory.render()}")
    if pre.checkpoint_warning:
        print(pre.checkpoint_warning)
    print("spec OK")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from shardyard.cluster.local import cpus_needed, existing_cluster, local_cluster
    from shardyard.cluster.secret_env import runtime_env_vars
    from shardyard.runtime.entry import latest_step, refuse_conflicting_resume, run_training
    from shardyard.tracking.live import LiveStatus

    pre = preflight(args.spec, args.set)
    spec, run_dir = pre.spec, RunDir.of(pre.spec).path
    print(spec_summary(pre, run_dir), flush=True)
    if pre.checkpoint_warning:
        print(pre.checkpoint_warning, file=sys.stderr, flush=True)
    refuse_conflicting_resume(spec, run_dir)
    start = latest_step(run_dir)
    if start:
        print(f"resuming {spec.name} from its checkpoint at step {start} (use another name to start fresh)")
    if start >= spec.training.steps:
        print(f"nothing to do: {run_dir} already reached step {start} of {spec.training.steps}")
        return 0
    set_test_hooks(args)
    worker_env = runtime_env_vars(spec)  # spec `env` and secrets: only through the Ray runtime env
    if args.address:
        print(f"connecting to the Ray cluster at {args.address}...", flush=True)
        cluster = existing_cluster(args.address, worker_env)
    else:
        print(f"starting an embedded Ray cluster ({cpus_needed(spec)} logical CPUs)...", flush=True)
        cluster = local_cluster(
            cpus_needed(spec),
            math.ceil(spec.resources.max_workers * spec.resources.gpus_per_worker) or None,
            secret_env=worker_env,
        )
    with cluster:
        live = LiveStatus(spec.training.steps, start)
        try:
            result = run_training(spec, run_dir, live)
        finally:
            live.close()
    again = " ".join(
        [
            "shardyard run",
            args.spec,
            *(f"--set {o}" for o in args.set),
            *([f"--address {args.address}"] if args.address else []),
        ]
    )
    print(training_summary(result, spec, resume_hint=again))
    _write_run_report(run_dir)
    return result.exit_code


def _write_run_report(run_dir: Path) -> None:
    """The page a finished (or failed) run ends with; a report problem never fails the run."""
    from shardyard.tracking.report import write_report

    try:
        print(f"   report {write_report([run_dir])}  (open it in a browser; compare runs: shardyard report RUN RUN)")
    except Exception as err:  # the run's own outcome is already printed
        print(f"   (no report: {type(err).__name__}: {err})")


def cmd_submit(args: argparse.Namespace) -> int:
    from shardyard.cluster import jobs

    pre = preflight(args.spec, args.set, describe=False)
    set_test_hooks(args)
    run_dir = Path(args.run_dir).resolve() if args.run_dir else RunDir.of(pre.spec).path
    job_id = jobs.submit(pre.spec, run_dir, args.address)
    print(job_id)
    print(f"follow it with: shardyard logs {job_id} --follow", file=sys.stderr)
    if args.wait:
        state = jobs.wait(job_id, args.address, args.wait)
        print(state)
        return 0 if state == "SUCCEEDED" else 1
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from shardyard.cluster.local import existing_cluster, local_cluster
    from shardyard.data.prepare import prepare

    spec = load_spec(args.spec, args.set)
    if not spec.data.prepared:
        print(
            "data.paths with data.tokenizer: bytes trains from the per-node byte cache: nothing to prepare "
            "(set data.sources, data.tokenizer or data.prepared_dir to use prepared shards)"
        )
        return 0
    if args.local:
        report = prepare(spec.data, parallel="local", show_progress=True)
    else:
        cluster = existing_cluster(args.address) if args.address else local_cluster(os.cpu_count() or 1)
        with cluster:
            report = prepare(spec.data, parallel="ray", show_progress=True)
    if report.skipped:
        print(f"already prepared: {report.directory} (fingerprint unchanged)")
    else:
        nodes = ", ".join(f"{n[:12]}: {c}" for n, c in sorted(report.units_per_node.items()))
        print(
            f"prepared {report.directory}: {report.input_bytes / 1e6:.1f} MB -> {report.tokens:,} tokens in "
            f"{report.seconds:.1f} s ({report.mb_per_s:.2f} MB/s); files per node {nodes}"
        )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from shardyard.comm.cost_model import plan

    spec = load_spec(args.spec, args.set)
    if spec.model.kind != "moe":
        raise UserError(f"{args.spec}: model.kind is {spec.model.kind!r}; the all-to-all plan is for MoE models")
    try:
        result = plan(spec, args.nodes, args.gpus_per_node, expert_parallel=args.expert_parallel)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(plan_table(result))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    if args.markdown:
        from shardyard.platform.specdoc import schema_markdown

        print(schema_markdown())
    else:
        print(json.dumps(json_schema(), indent=2))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a job spec and print its summary (no cluster needed)")
    add_spec(p)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("run", help="train a job on an embedded local Ray cluster")
    add_spec(p)
    p.add_argument(
        "--address",
        default=None,
        help="use a running Ray cluster (`auto` on one of its nodes, or GCS host:port) instead of an embedded one",
    )
    add_fault_step(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser(
        "prepare", help="tokenize and pack the spec's data into token shards (Ray Data over the cluster's CPUs)"
    )
    add_spec(p)
    p.add_argument(
        "--address",
        default=None,
        help="use a running Ray cluster (`auto`, or GCS host:port) instead of an embedded one",
    )
    p.add_argument("--local", action="store_true", help="one process, no Ray")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("submit", help="send a job to a Ray cluster through Ray Jobs; prints the job id")
    add_spec(p)
    add_jobs_address(p)
    p.add_argument(
        "--run-dir", default=None, help="run directory on the cluster (default: <checkpoint.dir>/<name>, resolved here)"
    )
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait for the job to finish")
    add_fault_step(p)
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("schema", help="print the job spec's JSON schema")
    p.add_argument("--markdown", action="store_true", help="print the reference as Markdown (docs/spec.md)")
    p.set_defaults(fn=cmd_schema)

    p = sub.add_parser("plan", help="predict all-to-all time per step (flat / hierarchical / leader) at a cluster size")
    add_spec(p)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--expert-parallel", type=int, default=None, help="EP degree (default: the spec's, or all ranks)")
    p.set_defaults(fn=cmd_plan)
