"""The `shardyard` command: validate | prepare | run | submit | status | logs | stop | list | report | sync | eval | schema | cluster."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from shardyard import envvars
from shardyard.platform.errors import UserError
from shardyard.platform.schema import JobSpec, parse_size
from shardyard.platform.spec import json_schema, load_spec


def _fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def spec_summary(spec: JobSpec, source: str, memory=None) -> str:
    """One screen about a job: model size, active parameters, resources, steps, where it writes."""
    from shardyard.data.corpus import resolve_files
    from shardyard.data.sources import resolve_units
    from shardyard.data.tokenize import vocab_size_for
    from shardyard.models import count_parameters
    from shardyard.models.flops import training_flops_per_token
    from shardyard.runtime.entry import run_directory
    from shardyard.runtime.worker_memory import build_meta_model

    model = build_meta_model(spec, source)
    total, active = count_parameters(model)
    flops = training_flops_per_token(spec.model, spec.data.seq_len, vocab_size_for(spec.data))
    # fails here, not on the cluster, when a path matches nothing
    files = resolve_units(spec.data) if spec.data.prepared else resolve_files(spec.data)
    corpus_bytes = sum(u.size for u in files) if spec.data.prepared else sum(f.stat().st_size for f, _ in files)
    if spec.data.max_bytes is not None:
        corpus_bytes = min(corpus_bytes, spec.data.max_bytes)
    m, r, t = spec.model, spec.resources, spec.training
    lines = [f"job        {spec.name}  ({source})"]
    if m.stages:
        lines.append(f"model      {m.kind}: {len(m.stages)} stages, context {m.context} bytes (global first)")
        for i, st in enumerate(m.stages):
            moe = f", MoE {st.moe.num_experts} experts top-{st.moe.top_k}" if st.moe else ""
            lines.append(
                f"  stage {i}  width {st.width}, depth {st.depth}, heads {st.heads}, patch {st.patch_size}, "
                f"ffn {st.hidden}{moe}, checkpoint chunks {st.checkpoint_chunks}"
            )
    else:
        lines.append(
            f"model      {m.kind}: width {m.width}, depth {m.depth}, heads {m.heads}, ffn {m.ffn.kind} {m.ffn_hidden}"
        )
        options = [
            f"{m.attn_kv_heads} kv heads" if m.kv_heads else "",
            f"head dim {m.head_dim}" if m.head_dim else "",
            f"rope theta {m.rope_theta:g}" if m.rope_theta != 10000.0 else "",
            f"rope scaling {m.rope_scaling.type} x{m.rope_scaling.factor:g}" if m.rope_scaling else "",
            f"qk-norm {m.qk_norm}" if m.qk_norm != "none" else "",
            "qkv bias" if m.qkv_bias else "",
            "tied embeddings" if m.tie_embeddings else "",
            f"norm eps {m.norm_eps:g}" if m.norm_eps != 1e-6 else "",
            f"init from {m.init_from}" if m.init_from else "",
            f"upcycled from {m.upcycle_from}" if m.upcycle_from else "",
        ]
        if any(options):
            lines.append(f"options    {', '.join(o for o in options if o)}")
    if m.moe is not None:
        cap = "dropless" if m.moe.capacity_factor is None else f"capacity factor {m.moe.capacity_factor}"
        lines.append(
            f"experts    {m.moe.num_experts} per MoE layer, top-{m.moe.top_k} {m.moe.router}, {cap}, "
            f"backend {m.moe.backend}, aux {m.moe.aux_loss} z {m.moe.z_loss}"
        )
        moe = m.moe
        extra = [
            f"expert hidden {moe.expert_hidden}" if moe.expert_hidden else "",
            f"{moe.num_shared} shared x {moe.shared_hidden or m.expert_hidden}{' gated' if moe.shared_gate else ''}"
            if moe.num_shared
            else "",
            f"first {moe.first_dense_layers} blocks dense" if moe.first_dense_layers else "",
            f"{moe.score} scores" if moe.score != "softmax" else "",
            f"renormalize {moe.renormalize}" if moe.renormalize is not None else "",
            f"routed scale {moe.routed_scale:g}" if moe.routed_scale != 1.0 else "",
        ]
        if any(extra):
            lines.append(f"           {', '.join(e for e in extra if e)}")
    lines += [
        f"parameters {_fmt_count(total)} total, {_fmt_count(active)} active per token",
        f"compute    {_fmt_count(flops)}FLOP per token (forward + backward, counted on the meta device), "
        f"{_fmt_count(flops * spec.tokens_per_step())}FLOP per step: the MFU numerator",
        f"data       {', '.join(s.path for s in spec.data.sources) if spec.data.sources else ', '.join(spec.data.paths)}: "
        f"{len(files)} files, {_fmt_count(corpus_bytes)}B; sequences of {spec.data.seq_len} tokens, tokenizer "
        f"{spec.data.tokenizer}",
        f"training   {t.steps} steps x {t.batch_size} seq/worker x {r.workers} workers = "
        if spec.parallel.tensor_parallel == 1
        else f"training   {t.steps} steps x {t.batch_size} seq/replica x {spec.data_parallel} data-parallel replicas "
        f"(tensor_parallel {spec.parallel.tensor_parallel}) = "
        f"{_fmt_count(spec.tokens_per_step())} bytes/step, {_fmt_count(spec.tokens_per_step() * t.steps)} bytes "
        f"total; {t.precision}",
        f"optimizer  {spec.optim.kind} lr {spec.optim.lr:g}, warm-up {spec.optim.schedule.warmup}, "
        f"{spec.optim.schedule.decay} decay, clip {spec.optim.grad_clip}",
        f"resources  {r.workers} workers x ({r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU); "
        f"max failures {r.max_failures}; parallel: ep {spec.parallel.expert_parallel}, a2a {spec.parallel.a2a}, "
        f"zero {spec.parallel.zero}, tp {spec.parallel.tensor_parallel}, shard {spec.parallel.shard}",
        f"run dir    {run_directory(spec)}  (checkpoints every {spec.checkpoint.every} steps, keep "
        f"{spec.checkpoint.keep})",
        f"tracking   wandb {spec.tracking.mode} project {spec.tracking.wandb_project}; metrics.jsonl in the run dir",
    ]
    if memory is not None:  # runtime.worker_memory.MemoryPrediction
        lines += ["memory per worker (training state):", "  " + memory.report().replace("\n", "\n  ")]
    lines += [f"note       {note}" for note in spec.notes()]
    return "\n".join(lines)


def set_test_hooks(args: argparse.Namespace) -> None:
    """`--fault-step N` (hidden, tests only) sets envvars.FAULT_STEP here; the embedded cluster and
    job submission forward every SHARDYARD_* variable to the workers, which read it where it acts."""
    if args.fault_step is not None:
        os.environ[envvars.FAULT_STEP] = str(args.fault_step)


# ------------------------------------------------------------------------------------------ commands
def cmd_validate(args: argparse.Namespace) -> int:
    from shardyard.runtime.preemption import checkpoint_warning
    from shardyard.runtime.worker_memory import check_spec_memory

    spec = load_spec(args.spec, args.set)
    memory = check_spec_memory(spec, args.spec)
    print(spec_summary(spec, args.spec, memory))
    print(f"predicted memory per worker {memory.render()}")
    if checkpoint_warning(spec):
        print(checkpoint_warning(spec))
    print("spec OK")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from shardyard.cluster.local import cpus_needed, existing_cluster, local_cluster
    from shardyard.cluster.secret_env import runtime_env_vars
    from shardyard.runtime.entry import latest_step, refuse_conflicting_resume, run_directory, run_training
    from shardyard.runtime.preemption import checkpoint_warning
    from shardyard.runtime.worker_memory import check_spec_memory
    from shardyard.tracking.live import LiveStatus

    spec = load_spec(args.spec, args.set)
    print(spec_summary(spec, args.spec, check_spec_memory(spec, args.spec)), flush=True)
    if checkpoint_warning(spec):
        print(checkpoint_warning(spec), file=sys.stderr, flush=True)
    run_dir = run_directory(spec)
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
            math.ceil(spec.resources.workers * spec.resources.gpus_per_worker) or None,
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
    print(result.summary(spec, resume_hint=again))
    _write_run_report(run_dir)
    return result.exit_code


def _write_run_report(run_dir: Path) -> None:
    """The page a finished (or failed) run ends with; a report problem never fails the run."""
    from shardyard.tracking.report import write_report

    try:
        print(f"   report {write_report([run_dir])}  (open it in a browser; compare runs: shardyard report RUN RUN)")
    except Exception as err:  # the run's own outcome is already printed
        print(f"   (no report: {type(err).__name__}: {err})")


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


def cmd_submit(args: argparse.Namespace) -> int:
    from shardyard.cluster import jobs
    from shardyard.runtime.entry import run_directory
    from shardyard.runtime.worker_memory import check_spec_memory

    spec = load_spec(args.spec, args.set)
    check_spec_memory(spec, args.spec)
    set_test_hooks(args)
    run_dir = Path(args.run_dir).resolve() if args.run_dir else run_directory(spec)
    job_id = jobs.submit(spec, run_dir, args.address)
    print(job_id)
    print(f"follow it with: shardyard logs {job_id} --follow", file=sys.stderr)
    if args.wait:
        state = jobs.wait(job_id, args.address, args.wait)
        print(state)
        return 0 if state == "SUCCEEDED" else 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from shardyard.cluster import jobs

    state, message = jobs.status(args.job_id, args.address)
    print(state if not message else f"{state}: {message}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from shardyard.cluster import jobs

    if args.follow:
        from shardyard.tracking.live import fold_progress

        fold_progress(jobs.follow_logs(args.job_id, args.address))
    else:
        sys.stdout.write(jobs.logs(args.job_id, args.address))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """A run directory (or a job name under ./runs) gets a stop request file: its workers checkpoint and
    exit at the next step boundary. Anything else is a Ray job id, stopped through Ray Jobs (its
    entrypoint gets SIGTERM, which does the same)."""
    from shardyard.runtime.preemption import request_stop

    run_dir = _local_run_dir(args.job_id)
    if run_dir is not None:
        request_stop(run_dir, "shardyard stop")
        print(f"stop requested: {run_dir.name} checkpoints and exits at its next step boundary")
        return 0
    from shardyard.cluster import jobs

    stopped = jobs.stop(args.job_id, args.address)
    print(
        "stop requested (the job checkpoints and exits at its next step boundary)"
        if stopped
        else "job already finished"
    )
    return 0


def _local_run_dir(name: str) -> Path | None:
    """`name` as a run directory (it holds the run's spec.yaml), or ./runs/<name>."""
    for candidate in (Path(name), Path("runs") / name):
        if (candidate / "spec.yaml").is_file():
            return candidate.resolve()
    return None


def cmd_list(args: argparse.Namespace) -> int:
    from shardyard.cluster import jobs

    rows = jobs.list_jobs(args.address)
    if not rows:
        print("no jobs")
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["start"] / 1000)) if r["start"] else "-"
        print(f"{r['id']:<40} {r['status']:<10} {started}  {r['name']}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    if args.markdown:
        from shardyard.platform.specdoc import schema_markdown

        print(schema_markdown())
    else:
        print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from shardyard.tracking.sync import sync_command, sync_run

    run_dir = Path(args.run_dir)
    if args.dry_run:
        print(" ".join(sync_command(run_dir, args.project, args.entity)))
        return 0
    return sync_run(run_dir, args.project, args.entity)


def cmd_report(args: argparse.Namespace) -> int:
    from shardyard.tracking.report import write_report

    out = write_report([Path(d) for d in args.run_dirs], Path(args.out) if args.out else None)
    print(f"report written: {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from shardyard.models.bytes.generate import generate
    from shardyard.runtime.export import load_for_inference

    spec, model = load_for_inference(Path(args.run_or_checkpoint), args.step)
    prompt = args.prompt.encode("utf-8")
    start = time.perf_counter()
    out = generate(model, prompt, args.bytes, args.temperature, args.top_k, not args.no_cache, args.seed)
    elapsed = time.perf_counter() - start
    sys.stdout.buffer.write(prompt + out + b"\n")
    sys.stdout.flush()
    print(
        f"[{len(out)} bytes in {elapsed:.2f} s ({len(out) / max(elapsed, 1e-9):.0f} bytes/s) from {spec.name}, "
        f"{'with' if not args.no_cache else 'without'} cache]",
        file=sys.stderr,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "hf":
        from shardyard.runtime.export import export_hf

        try:
            max_shard = parse_size(args.max_shard_size, "--max-shard-size")
        except ValueError as err:
            raise UserError(str(err)) from None
        start = time.perf_counter()
        family, files = export_hf(
            Path(args.run_or_checkpoint), Path(args.out), args.target, args.dtype, args.step, max_shard
        )
        size = sum(f.stat().st_size for f in files)
        print(
            f"exported {family} ({args.dtype}) to {args.out}: {len(files)} safetensors file(s), {size / 1e6:.2f} MB, "
            f"config.json, generation_config.json, tokenizer ({time.perf_counter() - start:.1f} s)"
        )
        return 0
    if args.target != "auto" or args.dtype != "fp32":
        raise UserError("--target and --dtype apply to --format hf")
    from shardyard.runtime.export import export

    weights = export(Path(args.run_or_checkpoint), Path(args.out), args.step)
    print(f"exported {weights} ({weights.stat().st_size / 1e6:.2f} MB) and {weights.parent / 'spec.yaml'}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from shardyard.runtime.hf_import import job_spec_from_hf

    out = Path(args.out)
    text = job_spec_from_hf(Path(args.hf_dir), out.stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}: model from {args.hf_dir}/config.json, init_from set; fill in data and training")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from shardyard.runtime.evaluation import evaluate_run

    start = time.perf_counter()
    spec, result = evaluate_run(Path(args.run_dir), args.data or None, args.step, args.set)
    where = ", ".join(args.data) if args.data else f"the held-out split of {', '.join(spec.data.paths)}"
    print(
        f"{result}  on {where}  [{spec.name}, step {args.step if args.step is not None else 'newest'}, "
        f"{time.perf_counter() - start:.1f} s]"
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
    print(result.render())
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from shardyard.cluster.head import cluster_down, cluster_up

    if args.action == "up":
        print(cluster_up(args.num_cpus, args.port, args.dashboard_port))
    else:
        print(cluster_down(args.port))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardyard", description="Train MoE, byte and low-rank models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_spec(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", help="job spec YAML file")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="override a field, e.g. --set training.steps=50 (repeatable)",
        )

    def with_address(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--address",
            default=None,
            help=f"Ray Jobs address (default ${envvars.ADDRESS}, $RAY_ADDRESS or http://127.0.0.1:8265)",
        )

    p = sub.add_parser("validate", help="check a job spec and print its summary (no cluster needed)")
    with_spec(p)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("run", help="train a job on an embedded local Ray cluster")
    with_spec(p)
    p.add_argument(
        "--address",
        default=None,
        help="use a running Ray cluster (`auto` on one of its nodes, or GCS host:port) instead of an embedded one",
    )
    p.add_argument("--fault-step", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser(
        "prepare", help="tokenize and pack the spec's data into token shards (Ray Data over the cluster's CPUs)"
    )
    with_spec(p)
    p.add_argument(
        "--address",
        default=None,
        help="use a running Ray cluster (`auto`, or GCS host:port) instead of an embedded one",
    )
    p.add_argument("--local", action="store_true", help="one process, no Ray")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("submit", help="send a job to a Ray cluster through Ray Jobs; prints the job id")
    with_spec(p)
    with_address(p)
    p.add_argument(
        "--run-dir", default=None, help="run directory on the cluster (default: <checkpoint.dir>/<name>, resolved here)"
    )
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait for the job to finish")
    p.add_argument("--fault-step", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_submit)

    for name, fn, text in (
        ("status", cmd_status, "state of a submitted job"),
        ("stop", cmd_stop, "stop a run (its directory or name) or a submitted job (its id) with a checkpoint"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        with_address(p)
        p.set_defaults(fn=fn)

    p = sub.add_parser("logs", help="logs of a submitted job")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    with_address(p)
    p.set_defaults(fn=cmd_logs)

    p = sub.add_parser("list", help="jobs on the cluster")
    with_address(p)
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("schema", help="print the job spec's JSON schema")
    p.add_argument("--markdown", action="store_true", help="print the reference as Markdown (docs/spec.md)")
    p.set_defaults(fn=cmd_schema)

    p = sub.add_parser("sync", help="push a run's offline wandb runs (every restart) to wandb as one run")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (runs/<job name>)")
    p.add_argument("--project", help="wandb project (default: the one in the run's spec)")
    p.add_argument("--entity", help="wandb entity (default: your wandb default)")
    p.add_argument("--dry-run", action="store_true", help="print the wandb command instead of running it")
    p.set_defaults(fn=cmd_sync)

    p = sub.add_parser("report", help="one self-contained HTML page about a run, or comparing runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (runs/<job name>)")
    p.add_argument("--out", help="where to write the page (default: RUN_DIR/report.html, or ./report-A-vs-B.html)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("generate", help="continue a byte prompt with a trained model")
    p.add_argument("run_or_checkpoint", help="a run directory (newest checkpoint) or a checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue (UTF-8)")
    p.add_argument("--bytes", type=int, default=256, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="re-run the whole model per byte (slow; for comparison)")
    p.add_argument(
        "--step", type=int, default=None, help="the checkpoint at this step (default: the newest complete one)"
    )
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser(
        "export",
        help="consolidate a checkpoint of any layout into one safetensors file plus its spec, or (--format hf) a "
        "Hugging Face model directory",
    )
    p.add_argument("run_or_checkpoint", help="a run directory (newest complete checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="output directory (model.safetensors, spec.yaml)")
    p.add_argument(
        "--step", type=int, default=None, help="the checkpoint at this step (default: the newest complete one)"
    )
    p.add_argument("--format", choices=["shardyard", "hf"], default="shardyard", help="hf: transformers' layout")
    p.add_argument(
        "--target",
        default="auto",
        help="hf family: auto (the one that holds the spec exactly) | llama | qwen3 | mixtral | qwen3_moe | olmoe | "
        "qwen2_moe | ernie4_5_moe",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="hf: tensor dtype")
    p.add_argument("--max-shard-size", default="2GiB", help="hf: split safetensors above this size (with an index)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("import", help="write a job spec from a Hugging Face model directory's config.json")
    p.add_argument("hf_dir", help="a Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="the job spec to write, e.g. jobs/NAME.yaml")
    p.set_defaults(fn=cmd_import)

    p = sub.add_parser("eval", help="bits per byte (+- standard error) of a trained run on held-out text")
    p.add_argument("run_dir", help="a run directory")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="PATH",
        help="file, directory or glob to evaluate on, repeatable (default: the run's held-out split)",
    )
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the run's spec, e.g. --set training.eval_bytes=1000000 or "
        "--set data.extensions=[.txt] (repeatable)",
    )
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("plan", help="predict all-to-all time per step (flat / hierarchical / leader) at a cluster size")
    with_spec(p)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--expert-parallel", type=int, default=None, help="EP degree (default: the spec's, or all ranks)")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("cluster", help="start or stop a local Ray head with token authentication")
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.set_defaults(fn=cmd_cluster)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
        if args.command == "run" and argv is None:
            _exit_now(code)
        return code
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _exit_now(code: int) -> None:
    """After a Ray driver session the interpreter's teardown can crash inside Ray's C++ threads
    (seen as SIGSEGV after a finished run, under load): everything is written and flushed, so skip it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
