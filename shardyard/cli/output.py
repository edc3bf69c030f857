"""What the user reads: the layers below return data (a spec, facts, a memory prediction, a training
result); this module turns it into text. Nothing here computes or touches a cluster."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardyard.cli.preflight import Preflight
from shardyard.platform.schema import JobSpec

if TYPE_CHECKING:
    from shardyard.comm.cost_model import PlanResult
    from shardyard.runtime.entry import TrainingResult
    from shardyard.runtime.evaluation import EvalResult
    from shardyard.runtime.worker_memory import MemoryPrediction

MIB = 2**20


def fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _model_lines(pre: Preflight) -> list[str]:
    m = pre.spec.model
    if m.stages:
        lines = [f"model      {m.kind}: {len(m.stages)} stages, context {m.context} bytes (global first)"]
        for i, st in enumerate(m.stages):
            moe = f", MoE {st.moe.num_experts} experts top-{st.moe.top_k}" if st.moe else ""
            lines.append(
                f"  stage {i}  width {st.width}, depth {st.depth}, heads {st.heads}, patch {st.patch_size}, "
                f"ffn {st.hidden}{moe}, checkpoint chunks {st.checkpoint_chunks}"
            )
    else:
        lines = [
            f"model      {m.kind}: width {m.width}, depth {m.depth}, heads {m.heads}, ffn {m.ffn.kind} {m.ffn_hidden}"
        ]
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
        moe = m.moe
        cap = "dropless" if moe.capacity_factor is None else f"capacity factor {moe.capacity_factor}"
        lines.append(
            f"experts    {moe.num_experts} per MoE layer, top-{moe.top_k} {moe.router}, {cap}, "
            f"backend {moe.backend}, aux {moe.aux_loss} z {moe.z_loss}"
        )
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
    return lines


def _pipeline_lines(spec: JobSpec) -> list[str]:
    """The pipeline's split and its bubble (the share of a step a stage waits), with pipeline_parallel > 1."""
    from shardyard.runtime.parallel.pipeline import bubble_fraction, stage_layers

    pp, pipe = spec.parallel.pipeline_parallel, spec.parallel.pipeline
    if pp == 1:
        return []
    v = pipe.virtual_stages
    layers = [len(r) for r in stage_layers(spec.model.depth, pp * v, pipe.layers_per_stage)]
    bubble = bubble_fraction(pipe.schedule, pp, pipe.microbatches, v)
    formula = "(p-1)/(v m+p-1)" if pipe.schedule == "interleaved_1f1b" else "(p-1)/(m+p-1)"
    return [
        f"pipeline   {pp} ranks x {v} stage{'s' if v > 1 else ''} per rank, blocks per stage {layers}; "
        f"{pipe.schedule}, {pipe.microbatches} micro-batches of {spec.training.batch_size // pipe.microbatches} seq; "
        f"bubble {bubble:.0%} of a step ({formula} with equal stages)"
    ]


def _batch_phrase(spec: JobSpec) -> str:
    """How a step's sequences are split: per worker, or the global batch at every worker count."""
    t, r = spec.training, spec.resources
    if t.global_batch is None:
        accum = f" x {t.grad_accum} accum" if t.grad_accum > 1 else ""
        dp = "data-parallel " if spec.data_parallel_workers() < r.workers else ""
        return f"{t.batch_size} seq/worker{accum} x {spec.data_parallel_workers()} {dp}workers"
    splits = ", ".join(
        f"{n}: {micro} x accum {accum}" for n in r.worker_counts for micro, accum in [spec.batch_layout(n)]
    )
    return f"{t.global_batch} seq (global batch; workers: micro-batch x accum = {splits})"


def spec_summary(pre: Preflight, run_dir: Path) -> str:
    """One screen about a job: model size, active parameters, resources, steps, where it writes."""
    spec, facts = pre.spec, pre.facts
    assert facts is not None, "a summary needs preflight(..., describe=True)"
    r, t = spec.resources, spec.training
    per_step = spec.tokens_per_step()
    data = ", ".join(s.path for s in spec.data.sources) if spec.data.sources else ", ".join(spec.data.paths)
    lines = [f"job        {spec.name}  ({pre.source})", *_model_lines(pre)]
    lines += [
        f"parameters {fmt_count(facts.parameters)} total, {fmt_count(facts.active_parameters)} active per token",
        f"compute    {fmt_count(facts.flops_per_token)}FLOP per token (forward + backward, counted on the meta "
        f"device), {fmt_count(facts.flops_per_token * per_step)}FLOP per step: the MFU numerator",
        f"data       {data}: {facts.data_files} files, {fmt_count(facts.corpus_bytes)}B; sequences of "
        f"{spec.data.seq_len} tokens, tokenizer {spec.data.tokenizer}",
        f"training   {t.steps} steps x {_batch_phrase(spec)} = "
        f"{fmt_count(per_step)} bytes/step, {fmt_count(per_step * t.steps)} bytes total; {t.precision}",
        *_pipeline_lines(spec),
        f"optimizer  {spec.optim.kind} lr {spec.optim.lr:g}, warm-up {spec.optim.schedule.warmup}, "
        f"{spec.optim.schedule.decay} decay, clip {spec.optim.grad_clip}",
        f"resources  {r.describe_workers()} workers x ({r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU); "
        f"max failures {r.max_failures}; parallel: ep {spec.parallel.expert_parallel}, a2a {spec.parallel.a2a}, "
        f"zero {spec.parallel.zero}, pp {spec.parallel.pipeline_parallel}, tp {spec.parallel.tensor_parallel}",
        f"run dir    {run_dir}  (checkpoints every {spec.checkpoint.every} steps, keep {spec.checkpoint.keep})",
        f"tracking   wandb {spec.tracking.mode} project {spec.tracking.wandb_project}; metrics.jsonl in the run dir",
        "memory per worker (training state):",
        "  " + memory_report(pre.memory).replace("\n", "\n  "),
    ]
    lines += [f"note       {note}" for note in spec.notes()]
    return "\n".join(lines)


def memory_report(memory: MemoryPrediction) -> str:
    """The training-state lines of the summary (MiB), next to the same job under AdamW."""
    lines = [f"optimizer {memory.kind}: one step of the job's model and optimizer on the meta device"]
    for name, value in list(memory.parts().items())[:4]:
        lines.append(f"  {name:<16}{value / MIB:9.2f} MiB")
    if memory.adamw is not None:
        a = memory.adamw
        lines.append(
            f"  total           {memory.state / MIB:9.2f} MiB ({memory.state / a.state:.1%} of AdamW's "
            f"{a.state / MIB:.2f} MiB), before activations"
        )
    return "\n".join(lines)


def training_summary(result: TrainingResult, spec: JobSpec, resume_hint: str) -> str:
    """What a finished (or failed, or stopped) run tells its user: final losses, where its files are."""
    metrics = result.metrics
    state = "FAILED" if result.error else "stopped" if result.stopped else "done"
    lines = [f"\n== {spec.name}: {state} at step {result.final_step}/{spec.training.steps}"]
    if metrics:
        lines.append(
            f"   train loss {metrics.get('loss', float('nan')):.4f} ({metrics.get('bpb', float('nan')):.3f} "
            f"bits/byte), val {metrics.get('val_bpb', float('nan')):.4f}"
            + (f" +- {metrics['val_bpb_stderr']:.4f}" if "val_bpb_stderr" in metrics else "")
            + f" bits/byte, {metrics.get('tokens_per_s', 0):.0f} bytes/s"
        )
    lines.append(f"   run directory {result.run_dir}")
    if result.checkpoint:
        lines.append(f"   newest checkpoint {result.checkpoint}")
    wandb_runs = result.run_dir / "wandb"
    if wandb_runs.exists() and spec.tracking.mode == "offline":
        lines.append(
            f"   wandb offline runs in {wandb_runs}: push them as one run with `shardyard sync {result.run_dir}`"
        )
    if result.error:
        lines.append(f"   error: {result.error}")
    if result.stopped and not result.error:
        lines.append(
            f"   stopped ({result.stopped}) with a checkpoint at step {result.final_step}; continue with: {resume_hint}"
        )
    return "\n".join(lines)


def plan_table(result: PlanResult) -> str:
    """`shardyard plan`: predicted time per dispatch and per step of each all-to-all, and the pick."""
    lines = [
        f"all-to-all plan: {result.nodes} nodes x {result.gpus_per_node} GPUs, expert_parallel "
        f"{result.expert_parallel}, {result.bytes_per_rank / 2**20:.2f} MiB per rank per dispatch, "
        f"{result.exchanges_per_step} exchanges per step",
        f"link constants: {result.link.name}",
        "",
        f"{'algorithm':<13} {'per dispatch':>14} {'per step':>12} {'vs flat':>8}",
    ]
    flat = next(r for r in result.rows if r["algo"] == "flat")["dispatch_s"]
    for r in result.rows:
        lines.append(
            f"{r['algo']:<13} {1e3 * r['dispatch_s']:>11.3f} ms {1e3 * r['step_s']:>9.1f} ms "
            f"{r['dispatch_s'] / flat:>7.2f}x"
        )
    lines += ["", f"recommendation: parallel.a2a = {result.recommendation}  ({result.reason})"]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def eval_line(result: EvalResult) -> str:
    return f"{result.bpb:.4f} +- {result.stderr:.4f} bits/byte ({result.windows} windows, {result.bytes:,} bytes)"


def job_row(job: dict[str, Any]) -> str:
    """One line of `shardyard list`."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["start"] / 1000)) if job["start"] else "-"
    return f"{job['id']:<40} {job['status']:<10} {started}  {job['name']}"
