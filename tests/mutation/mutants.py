"""The curated mutants: known, easy, silent slips, each with the test selection that claims to catch it.

Each mutant replaces one exact snippet of one file (the snippet must occur exactly once: a refactor
that moves or rewrites the code fails tests/mutation/test_mutants.py in the normal suite, and the
entry is then updated to the new code). `selection` is the pytest argument list run in the mutated
copy (paths relative to the repository root, `-k` expressions, and `-m "slow or not slow"` where the
covering test is slow); keep it targeted: the whole check should take a few minutes.

How to add one (docs/testing.md): plant the slip by hand, find or write the fast test that fails,
add a Mutant here, and run `python -m tests.mutation --only NAME`.
"""

from __future__ import annotations

from dataclasses import dataclass

SLOW = ["-m", "slow or not slow"]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # exact text, found exactly once in `file`
    replacement: str
    selection: list[str]  # pytest arguments that claim to cover the slip
    description: str  # one line: the slip


MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ the audit's three (issue 26)
    Mutant(
        "accum-not-averaged",
        "shardyard/runtime/worker.py",
        "self.grad_step.backward(ce / accum)",
        "self.grad_step.backward(ce)",
        ["tests/runtime/test_trainer.py", "-k", "accum"],
        "gradient accumulation sums micro-batch gradients instead of averaging them (accum x too large)",
    ),
    Mutant(
        "token-regenerated",
        "shardyard/cluster/auth.py",
        "        if path.read_text().strip():\n            return path\n",
        "        if path.read_text().strip():\n            return write_token(path)\n",
        ["tests/safety", "-k", "token"],
        "ensure_token writes a new token on every call (every client gets a token the cluster does not know)",
    ),
    Mutant(
        "per-parameter-clip-off",
        "shardyard/optim/galore.py",
        "    if max_norm > 0:\n        grad.mul_((max_norm",
        "    if max_norm < 0:\n        grad.mul_((max_norm",
        ["tests/optim", "-k", "clip or layerwise"],
        "clip_param_grad_ never clips (layer-wise GaLore's per-parameter clip silently disabled)",
    ),
    # ------------------------------------------------------------------ reduction groups and scaling
    Mutant(
        "expert-grads-wrong-group",
        "shardyard/comm/grad_sync.py",
        "all_reduce_mean_([p for p in params if is_expert_shard(p)], groups.edp, world)",
        "all_reduce_mean_([p for p in params if is_expert_shard(p)], groups.ep, world)",
        ["tests/comm/test_expert_parallel.py", "-k", "matches_single_worker"],
        "expert gradients summed over the EP group (other experts' shards) instead of the expert-data-parallel group",
    ),
    Mutant(
        "mesh-expert-grads-not-averaged",
        "shardyard/comm/grad_sync.py",
        "all_reduce_mean_([p for p in params if is_expert_shard(p)], groups.edp, world)",
        "all_reduce_mean_([p for p in params if is_expert_shard(p)], groups.edp, world // groups.ep_size)",
        ["tests/runtime/test_gradients.py", "-k", "ep2 and not fsdp", *SLOW],
        "sync_gradients divides expert gradients by the EDP size, not the world (EP x too large)",
    ),
    Mutant(
        "mesh-grad-norm-misses-ep-peers",
        "shardyard/optim/clip.py",
        "expert_sq = _sum_over(expert_sq, expert_group, device)",
        "expert_sq = expert_sq",
        ["tests/runtime/test_gradients.py", "-k", "ep2 and not fsdp", *SLOW],
        "the global grad norm counts only this rank's expert shard (clipping and grad_norm see too small a norm)",
    ),
    Mutant(
        "grad-norm-in-low-precision",
        "shardyard/optim/clip.py",
        "torch._foreach_norm(local, 2, dtype=torch.float32)",
        "torch._foreach_norm(local, 2)",
        ["tests/optim/test_clip.py"],
        "each gradient's norm accumulated in its own dtype (bf16 gradients: a norm off by ~1e-3)",
    ),
    Mutant(
        "resume-takes-saved-kernel",
        "shardyard/runtime/parallel/state.py",
        '{**group, **{key: own[key] for key in KERNEL_FLAGS if key in own}, "params": own["params"]}',
        '{**group, "params": own["params"]}',
        ["tests/runtime/test_parallel_plans.py", "-k", "resume_reshards and composed", *SLOW],
        "a resume keeps the checkpoint's fused-kernel flag, which the new layout's mixed parameters cannot run",
    ),
    # ------------------------------------------------------------------ resume: data position, RNG, manifest
    Mutant(
        "resume-skips-a-batch",
        "shardyard/data/loader.py",
        'int(position["pos"]), 0',
        'int(position["pos"]) + self.world * self.batch_size, 0',
        ["tests/data/test_data.py", "-k", "resume or position"],
        "a restored data position skips one global batch",
    ),
    Mutant(
        "rng-restore-drops-python",
        "shardyard/runtime/checkpoint.py",
        "    random.setstate((version, tuple(internal), gauss_next))\n",
        "    random.getstate()\n",
        ["tests/runtime/test_checkpoint.py", "-k", "rng"],
        "set_rng_state restores torch and numpy but not Python's random module",
    ),
    Mutant(
        "manifest-hash-unchecked",
        "shardyard/runtime/checkpoint.py",
        "    if full:\n        actual = file_digests(Path(directory))",
        "    if False:\n        actual = file_digests(Path(directory))",
        ["tests/runtime/test_checkpoint.py", "-k", "flipped"],
        "verify_checkpoint(full=True) checks sizes only: a corrupted shard of the right size passes",
    ),
    # ------------------------------------------------------------------ dispatch stages: LSH, dedup
    Mutant(
        "lsh-backward-sums-not-means",
        "shardyard/comm/lsh.py",
        "        mean /= members.unsqueeze(1).to(grad.dtype)\n",
        "",
        ["tests/comm/test_lsh.py", "-k", "backward or gradcheck"],
        "the LSH residual's backward subtracts the bucket's gradient sum instead of its mean",
    ),
    Mutant(
        "dedup-key-ignores-destination",
        "shardyard/comm/dedup.py",
        "torch.unique(dest * num_tokens + token_of, return_inverse=True)",
        "torch.unique(token_of, return_inverse=True)",
        ["tests/comm/test_dispatch.py", "-k", "4_ranks"],
        "dedup keys a row by token only: a token routed to two EP ranks is sent to one",
    ),
    # ------------------------------------------------------------------ routing, evaluation
    Mutant(
        "topk-weights-not-renormalised",
        "shardyard/models/moe/router.py",
        "            top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)\n",
        "            top_probs = top_probs\n",
        ["tests/models/test_moe_layer.py", "-k", "router_weights"],
        "softmax top-k routing weights are not renormalised over the kept experts",
    ),
    Mutant(
        "stderr-biased",
        "shardyard/runtime/evaluation.py",
        "math.sqrt(residual_sq / (n * (n - 1)))",
        "math.sqrt(residual_sq / (n * n))",
        ["tests/runtime/test_evaluation.py", "-k", "standard_error"],
        "the bits-per-byte standard error divides by n^2 instead of n(n-1) (too small)",
    ),
    # ------------------------------------------------------------------ run lease and token handling
    Mutant(
        "lease-age-sign",
        "shardyard/runtime/run_lease.py",
        '    age = now - float(lease["heartbeat"])',
        '    age = float(lease["heartbeat"]) - now',
        ["tests/safety/test_resume_guard.py", "-k", "lease"],
        "a lease's heartbeat age is negated: a dead holder on another host keeps the run forever",
    ),
    Mutant(
        "token-group-readable-accepted",
        "shardyard/cluster/auth.py",
        "    if st.st_mode & 0o077:",
        "    if st.st_mode & 0o007:",
        ["tests/safety", "-k", "token"],
        "a group-readable token file is accepted",
    ),
    # ------------------------------------------------------------------ data mixture, parallelize, watchdog, payload
    Mutant(
        "mixture-window-read-twice",
        "shardyard/data/mixture.py",
        "return source, int(self._orders[key][k % n])",
        "return source, int(self._orders[key][(k // 2) % n])",
        ["tests/data/test_prepare.py", "-k", "mixture"],
        "mixture reads each window of a source twice and skips half of them",
    ),
    Mutant(
        "mixture-resume-skips-a-period",
        "shardyard/data/mixture.py",
        'self.pos, self.taken = int(position["pos"]), 0',
        'self.pos, self.taken = int(position["pos"]) + PERIOD, 0',
        ["tests/data/test_prepare.py", "-k", "mixture"],
        "mixture resume skips a whole schedule period (same sources, other windows)",
    ),
    Mutant(
        "activation-checkpointing-not-applied",
        "shardyard/runtime/parallel/parallelize.py",
        "module.checkpoint_every = every",
        "module.checkpoint_every = 0",
        ["tests/runtime/test_trainer.py", "-k", "activation"],
        "training.activation_checkpointing silently not applied",
    ),
    Mutant(
        "manifest-size-misses-truncation",
        "shardyard/runtime/checkpoint.py",
        "if path.stat().st_size != size:",
        "if path.stat().st_size > size:",
        ["tests/safety/test_checkpoint_safety.py", "tests/runtime/test_checkpoint.py", "-k", "truncated"],
        "manifest size check misses truncated files",
    ),
    Mutant(
        "watchdog-exit-code",
        "shardyard/runtime/watchdog.py",
        "os._exit(EXIT_STALLED)",
        "os._exit(1)",
        ["tests/reliability/test_stop_and_watchdog.py", "-k", "sleeps"],
        "watchdog ends a stalled rank without the EXIT_STALLED code the failure policy recognises",
    ),
    Mutant(
        "payload-codec-dropped-under-ep",
        "shardyard/comm/token_dispatch.py",
        "self.codec = build_codec(dispatch.payload, dispatch.grad_payload)",
        'self.codec = build_codec(dispatch.payload if ep == 1 else "fp32", dispatch.grad_payload)',
        ["tests/comm/test_dispatch.py", "-k", "4_ranks"],
        "bf16/fp8 payload silently not applied when expert_parallel > 1",
    ),
    # ------------------------------------------------------------------ metrics and reports
    Mutant(
        "bits-per-byte-off-by-one",
        "shardyard/runtime/evaluation.py",
        "covered = torch.full_like(bits, float(targets.shape[1]))",
        "covered = torch.full_like(bits, float(targets.shape[1] + 1))",
        ["tests/runtime/test_export.py", "-k", "expert_parallel", *SLOW],
        "bits per byte divides by seq_len + 1 bytes per window",
    ),
    Mutant(
        "mfu-forward-only",
        "shardyard/runtime/worker.py",
        'out["mfu"] = self.flops_per_token * tokens_per_s / (self.ctx.world * self.peak_flops)',
        'out["mfu"] = self.flops_per_token / 3 * tokens_per_s / (self.ctx.world * self.peak_flops)',
        ["tests/tracking/test_observability.py", "-k", "mfu"],
        "MFU counts forward FLOPs only",
    ),
    Mutant(
        "throughput-skips-logging",
        "shardyard/runtime/worker.py",
        "window_start, window_steps, paused = window_end, 0, 0.0",
        "window_start, window_steps, paused = time.perf_counter(), 0, 0.0",
        ["tests/tracking/test_observability.py", "-k", "throughput"],
        "bytes/s and MFU leave the logging between windows out of the window's time",
    ),
    Mutant(
        "fsdp-gathers-one-block",
        "shardyard/runtime/worker_memory.py",
        "    return int(root + 7 * largest)",
        "    return int(root + largest)",
        ["tests/optim/test_worker_memory.py", "-k", "four_gloo"],
        "validate counts one unsharded block under FSDP2 (it holds up to seven blocks' worth)",
    ),
    Mutant(
        "ddp-buckets-uncounted",
        "shardyard/runtime/worker_memory.py",
        "        grads *= 2  # DDP's all-reduce buckets",
        "        grads *= 1  # DDP's all-reduce buckets",
        ["tests/optim/test_worker_memory.py", "-k", "four_gloo and none"],
        "validate leaves out DDP's gradient buckets",
    ),
    Mutant(
        "pp-block-init-global-rng",
        "shardyard/models/transformer.py",
        "        block.ffn.apply(lambda m, g=ffn: init_weights(m, g))",
        "        block.ffn.apply(init_weights)",
        ["tests/models/test_transformer.py", "-k", "pipeline_ranks"],
        "a block's FFN initialises from the global RNG: a pipeline rank's blocks differ from the whole model's",
    ),
    Mutant(
        "param-count-misses-1d",
        "shardyard/models/__init__.py",
        "total = sum(p.numel() for p in model.parameters())",
        "total = sum(p.numel() for p in model.parameters() if p.dim() > 1)",
        ["tests/tracking/test_observability.py", "-k", "falls_back"],
        "parameter count (6N FLOPs fallback) misses 1-D parameters",
    ),
    Mutant(
        "report-restarts-first-run",
        "shardyard/tracking/report.py",
        'rows.append(row("restarts", [str(len(r.restarts)) for r in runs]))',
        'rows.append(row("restarts", [str(len(runs[0].restarts)) for r in runs]))',
        ["tests/tracking/test_report.py", "-k", "one_run or comparison_table"],
        "report shows the first run's restart count in every column",
    ),
    Mutant(
        "zero-export-reads-one-rank",
        "shardyard/runtime/parallel/deepspeed_zero.py",
        "self.files[piece.rank].read_into(piece.ref",
        "self.files[0].read_into(piece.ref",
        ["tests/runtime/test_export.py", "-k", "streams and zero2", *SLOW],
        "streaming ZeRO export reads every rank's slice of a weight from rank 0's partition file",
    ),
]
