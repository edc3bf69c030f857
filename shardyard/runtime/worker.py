"""The training loop every worker runs.

dims (one device mesh) -> model -> parallelize it, with the optimizer, scheduler, gradient step and
training state beside it (runtime.parallel) -> data -> resume from the newest complete checkpoint ->
train, evaluate, checkpoint -> rank 0 logs. Ray Train has
already initialised torch.distributed (gloo on CPU, nccl on GPU) when this runs under Ray; the
same Trainer runs in one process without Ray (tests), given a `report` callable and a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shardyard import envvars
from shardyard.cluster.secret_env import record_secret_probe
from shardyard.comm.dispatch_metrics import dispatch_metrics
from shardyard.comm.topology import Topology, topology_from_ray
from shardyard.data.training_data import build_data_loader, load_training_data
from shardyard.data.validation import eval_set_texts, rank_batches, rank_controls
from shardyard.models import build_model, moe_layers
from shardyard.models.flops import training_flops_per_token
from shardyard.models.lowrank import set_lowrank_progress
from shardyard.models.moe.accounting import moe_scope
from shardyard.models.moe.layer import (
    MoELayer,
    attach_router_bias_updates,
    clear_balance_counts,
    share_balance_counts,
)
from shardyard.optim.memory import optimizer_memory_report
from shardyard.platform.run_dir import SPEC_FILE
from shardyard.platform.schema import JobSpec
from shardyard.platform.spec import spec_from_json, spec_to_yaml
from shardyard.runtime import checkpoint as ckpt
from shardyard.runtime.devices import worker_device
from shardyard.runtime.elastic import announce_resize
from shardyard.runtime.evaluation import EvalResult, autocast_for, eval_control, evaluate
from shardyard.runtime.parallel import build_training, dims_for
from shardyard.runtime.parallel.pipeline import rank_blocks
from shardyard.runtime.preemption import StepBoundary
from shardyard.runtime.resume_guard import check_corpus_on_every_rank
from shardyard.runtime.run_lease import DriverWatch
from shardyard.runtime.save_guard import refuse_nonfinite_weights
from shardyard.runtime.saving import CheckpointStore, CheckpointWriter, Reporter, state_bytes
from shardyard.runtime.watchdog import beat
from shardyard.tracking.anatomy import StepTimer, memory_metrics, step_anatomy
from shardyard.tracking.expert_load import ExpertLoadFile, ExpertLoadWindow, heatmap_rgb
from shardyard.tracking.logger import MetricsLogger
from shardyard.tracking.peak_flops import peak_flops

LN2 = math.log(2)
warnings.filterwarnings("ignore", message=".*set_vital.*")
FAULT_MARKER = ".injected_fault_done"


@dataclass
class WorkerContext:
    rank: int
    world: int
    device: torch.device


def _all_reduce_mean(values: torch.Tensor, world: int, replicas: int) -> torch.Tensor:
    """Mean over the `replicas` ranks holding a value of a value every rank of the `world` holds (under
    pipeline parallelism only the last stage's ranks hold it, the others contribute zero; every rank of
    a tensor-parallel group holds its batch's)."""
    if world > 1:
        dist.all_reduce(values)
        values /= replicas
    return values


def record_topology(run_dir: Path, topology: Topology) -> None:
    """Where this rank ran (node rank, local rank as Ray Train assigned them), for reports and tests."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": topology.rank,
        "node_local": [topology.node_rank, topology.local_rank],
        "ranks_per_node": topology.ranks_per_node,
        "world_size": topology.world_size,
        "hostname": socket.gethostname(),
        "node_id": os.environ.get("RAY_NODE_ID", ""),
    }
    (run_dir / f"topology-rank{topology.rank}.json").write_text(json.dumps(record))


class Trainer:
    """Wires the components of one worker together; the only place that does."""

    def __init__(self, spec: JobSpec, run_dir: Path, report: Reporter) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.report = report
        device = worker_device()  # Ray Train's device assignment
        topology = topology_from_ray()
        self.dims = dims_for(spec, topology).build(device.type)  # the one device mesh (a world of one too)
        self.ctx = WorkerContext(self.dims.rank, self.dims.world_size, device)
        # One intra-op thread per CPU the worker was given: oversubscribed cores slow small matmuls badly.
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
        torch.manual_seed(spec.seed)  # identical initial weights on every rank

        self.data = load_training_data(spec.data)  # memory-maps (prepared) tokens; sets the vocabulary
        # A pipeline rank builds only its stages' blocks (the others on the meta device, dropped when
        # parallelize splits the model): each with the values the whole model would give it.
        mine = rank_blocks(spec.model.depth, self.dims, spec.parallel.pipeline) if self.dims.pp_enabled else None
        self.model = build_model(
            spec.model, spec.data.seq_len, self.data.vocab_size, None if mine is None else mine.__contains__
        )
        self.model._apply(lambda t: t if t.is_meta else t.to(self.ctx.device))  # meta blocks stay until the split
        moe_names = [name for name, m in self.model.named_modules() if isinstance(m, MoELayer)]  # every layer's
        moe_shapes = [(layer.num_experts, layer.top_k) for layer in moe_layers(self.model)]
        if spec.parallel.zero:  # the backend flattens the weights when it is built: start them before
            self._initial_weights(self.model)
        # parallelize (expert placement, activation checkpointing, FSDP / DDP) and what is built beside it
        training = build_training(spec, self.model, self.dims, self.ctx.device)
        self.module = training.module  # what the forward is called on
        self.optimizer, self.scheduler = training.optimizer, training.scheduler
        self.grad_step, self.train_state = training.step, training.state
        self.pipeline = training.pipeline  # pp > 1: the schedule runs forward and backward
        if not spec.parallel.zero:  # every rank fills only the slices it holds
            self._initial_weights(self.model)
        self.moe = moe_layers(self.model)  # this rank's (its pipeline stages' under pp)
        attach_router_bias_updates(self.moe, self.optimizer, self.dims.group("dp"))
        if self.dims.ep_enabled:
            record_topology(run_dir, topology)

        self.corpus_fingerprint = self.data.fingerprint  # files hash, byte counts, windows (resume check)
        # training.global_batch stays fixed whatever the world: micro-batch x accumulation per data-parallel rank.
        # The ranks of one pipeline, and of one tensor-parallel group, read the same batches: data-parallel
        # coordinates (one rank of each records them: the first stage's first tp rank).
        dp_rank, dp = self.dims.dp_rank, self.dims.dp
        self.micro_batch, self.accum = spec.batch_layout(dp)
        self.global_balance = bool(self.moe) and spec.balance_scope == "global" and dp * self.accum > 1
        self.loader = build_data_loader(
            self.data,
            spec.data.seq_len,
            self.micro_batch,
            dp_rank,
            dp,
            spec.seed,
            self.dims.pp_rank == 0 and self.dims.tp_rank == 0,
        )
        # Validation: {"": held-out split, name: training.eval_sets[name]} -> this rank's batches
        texts = {
            "": self.data.held_out,
            **{
                name: self.data.encode_text(text)
                for name, text in eval_set_texts(
                    spec.training.eval_sets, spec.data.extensions, spec.data.seq_len, dp
                ).items()
            },
        }
        self.token_bytes = None if self.data.token_bytes is None else torch.from_numpy(self.data.token_bytes)
        if self.ctx.rank == 0 and spec.data.prepared:
            print(f"[shardyard] {self.data.describe()}", flush=True)
        self.val = {
            name: rank_batches(
                text,
                spec.data.seq_len,
                spec.training.eval_bytes,
                spec.training.batch_size,
                dp_rank,
                dp,
            )
            for name, text in texts.items()
        }
        control = eval_control(spec, self.data)
        self.val_controls = {
            name: rank_controls(text, spec.data.seq_len, spec.training.eval_bytes, dp_rank, dp, control)
            for name, text in texts.items()
        }
        self.autocast = autocast_for(spec, self.ctx.device)
        self.step = 0
        self.log = MetricsLogger(spec, run_dir, enabled=self.ctx.rank == 0)
        # Observability: step anatomy, MFU against the worker's peak, memory, expert load.
        self.timer = StepTimer(self.ctx.device, enabled=spec.tracking.step_anatomy)
        self.flops_per_token = training_flops_per_token(spec.model, spec.data.seq_len, self.data.vocab_size)
        self.peak_flops, peak_source = peak_flops(
            self.ctx.device, spec.training.precision, max(1, int(spec.resources.cpus_per_worker))
        )
        self.predicted_state_bytes = float(optimizer_memory_report(spec.optim, self.model)["total_bytes"])
        held = [name for name, m in self.model.named_modules() if isinstance(m, MoELayer)]
        self.expert_window = ExpertLoadWindow(
            self.moe, [moe_names.index(name) for name in held], moe_shapes, self.ctx.device
        )
        self.expert_file = (
            ExpertLoadFile(run_dir, [experts for experts, _ in moe_shapes])
            if moe_shapes and self.ctx.rank == 0
            else None
        )
        if self.ctx.rank == 0:
            self.log.describe(
                {
                    "flops_per_token": self.flops_per_token,
                    "peak_flops_per_worker": self.peak_flops,
                    "peak_flops_source": peak_source,
                    "world": self.ctx.world,
                }
            )
        self.boundary = StepBoundary(spec, run_dir, self.ctx.rank, self.ctx.world, self.ctx.device)
        self.writer = CheckpointWriter(
            spec.checkpoint,
            self.train_state,
            report,
            run_dir,
            self.dims.group("world"),
            lambda: state_bytes(self.model, self.optimizer),
        )
        self.driver = DriverWatch(run_dir)  # a driver that is gone: this worker stops before writing more

    def _initial_weights(self, model: torch.nn.Module) -> None:
        """model.init_from / model.upcycle_from (an HF directory or a dense run); the optimizer starts fresh."""
        if not (self.spec.model.init_from or self.spec.model.upcycle_from):
            return
        from shardyard.runtime.hf_import import load_initial_weights

        line = load_initial_weights(model, self.spec, self.data.vocab_size)
        if line and self.ctx.rank == 0:
            print(f"[shardyard] {line}", flush=True)

    # ------------------------------------------------------------------ state
    def layout(self) -> dict[str, Any]:
        return self.train_state.layout()

    def resume(self, directory: Path | None) -> None:
        """Continue from checkpoint `directory` (any layout the state format can reshard), if given."""
        if directory is None:
            return
        check_corpus_on_every_rank(
            ckpt.read_meta(directory).get("corpus"), self.corpus_fingerprint, directory, self.dims.group("world")
        )
        meta = ckpt.load_checkpoint(self.train_state, directory)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.loader.set_position(meta["data_position"])
        self.step = int(meta["step"])
        if self.ctx.rank == 0:
            changed = "" if meta["layout"] == self.layout() else f", resharded from {meta['layout']} to {self.layout()}"
            print(f"[shardyard] resumed from step {self.step} ({directory}){changed}", flush=True)
            before = meta.get("batch") or {"world": meta["layout"].get("world")}
            if before.get("world") != self.ctx.world:
                announce_resize(self.run_dir, before, self.batch_record(), self.step)

    def batch_record(self) -> dict[str, int]:
        """This attempt's world, EP degree and batch split (kept in checkpoints: the next resize line)."""
        return {"world": self.ctx.world, "ep": self.dims.ep, "micro_batch": self.micro_batch, "accum": self.accum}

    def save_and_report(self, metrics: dict[str, Any]) -> None:
        """Collective: start the checkpoint of this step (runtime.saving: with checkpoint.async it is
        written in the background and reported when every rank's write is done; a failed save is
        reported without a checkpoint and training goes on)."""
        # never make a diverged state the resume point
        refuse_nonfinite_weights(self.model, self.step, self.dims.group("world"))
        meta = {
            "step": self.step,
            "name": self.spec.name,
            "layout": self.layout(),
            "scheduler": self.scheduler.state_dict(),
            "data_position": self.loader.position(),
            "corpus": self.corpus_fingerprint,
            "batch": self.batch_record(),
        }
        self.writer.save(self.step, meta, {SPEC_FILE: spec_to_yaml(self.spec)}, metrics)

    # ------------------------------------------------------------------ loop
    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over `self.accum` micro-batches (training.grad_accum, or derived from
        training.global_batch at this world size)."""
        accum = self.accum
        self.model.train()
        if self.spec.model.ffn.kind == "lowrank":
            set_lowrank_progress(self.model, self.step / self.spec.training.steps)  # self-guided blend
        ce_sum = torch.zeros((), device=self.ctx.device)
        timer = self.timer
        if self.global_balance:  # the step's micro-batches are read first: the pre-pass counts their routing
            with timer.section("data"):
                batches = [self._next_batch() for _ in range(accum)]
            with timer.section("forward"):
                self._count_routing(batches)
        for micro in range(accum):
            if self.global_balance:
                inputs, targets = batches[micro]
            else:
                with timer.section("data"):
                    inputs, targets = self._next_batch()
            if self.pipeline is not None:  # both passes, micro-batch by micro-batch, in the schedule's order
                start = time.perf_counter()
                with self.autocast():
                    ce_sum += self.pipeline.forward_backward(inputs, targets, scale=1 / accum).to(ce_sum)
                compute = self.pipeline.take_compute_seconds()
                for part, seconds in compute.items():
                    timer.add(part, seconds)
                timer.add("bubble", time.perf_counter() - start - sum(compute.values()))  # waiting on other stages
                continue
            with (
                self.grad_step.micro_batch(last=micro == accum - 1),
                moe_scope(weight=1 / accum, balance="global" if self.global_balance else None),
            ):
                with timer.section("forward"), self.autocast():
                    _, ce = self.module(inputs, targets)
                with timer.section("backward"):
                    self.grad_step.backward(ce / accum)  # MoE aux losses ride along, weighted 1/accum
            ce_sum += ce.detach().float()
        with timer.section("optimizer"):
            grad_norm = self.grad_step.step()
        if self.global_balance:
            clear_balance_counts(self.moe)
        return {"ce": ce_sum / accum, "grad_norm": grad_norm}

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.loader.next_batch()
        return inputs.to(self.ctx.device, non_blocking=True), targets.to(self.ctx.device, non_blocking=True)

    @torch.no_grad()
    def _count_routing(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The global balance loss's pre-pass (collective): route the step's micro-batches without
        gradients, counting assignments per expert, and sum the counts over the data-parallel ranks.
        The random stream is put back, so the real forwards draw what they would have drawn."""
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), moe_scope(balance="count"):
            for inputs, targets in batches:
                with self.autocast():
                    self.module(inputs, targets)
        share_balance_counts(self.moe, self.dims.group("dp"))

    def observe(self, window_steps: int, window_seconds: float) -> dict[str, float]:
        """The logging window's throughput, MFU, step anatomy, memory and expert load. Collective
        (every rank calls it at the same steps); rank 0 appends the per-expert counts to the side file."""
        spec = self.spec
        tokens_per_s = spec.tokens_per_step(self.ctx.world) * window_steps / max(window_seconds, 1e-9)
        out: dict[str, float] = {"tokens_per_s": tokens_per_s}
        if self.peak_flops:
            out["mfu"] = self.flops_per_token * tokens_per_s / (self.ctx.world * self.peak_flops)
        seconds, steps = self.timer.take()
        if spec.tracking.step_anatomy:
            out.update(step_anatomy(seconds, steps, self.ctx.world))
        out.update(memory_metrics(self.ctx.device, self.ctx.world, self.predicted_state_bytes))
        if not self.expert_window.shapes:
            out["aux_loss"] = 0.0
            return out
        load = self.expert_window.take(self.ctx.world)
        out.update(load.metrics)
        if self.expert_file is not None:
            self.expert_file.append(self.step, load.counts)
            every = spec.tracking.expert_heatmap_every
            if every and (self.step % every < window_steps or self.step == spec.training.steps):
                self.log.image(
                    self.step,
                    "moe/load_heatmap",
                    heatmap_rgb(load.counts),
                    "utilisation per layer (rows) and expert (columns): dark idle, yellow 2x fair share",
                )
        return out

    def evaluate(self) -> dict[str, EvalResult]:
        """Bits per byte (mean and standard error over windows, all ranks) of the held-out split (key "")
        and of every training.eval_sets entry (key: its name). Collective."""
        return {
            name: evaluate(
                self.model,
                batches,
                self.ctx.device,
                self.autocast,
                self.ctx.world // self.dims.tp,  # a tensor-parallel group scores its batch once
                self.dims.group("pp_dp"),
                token_bytes=self.token_bytes,
                controls=self.val_controls[name],
                logits_of=self.pipeline.logits if self.pipeline is not None else None,
            )
            for name, batches in self.val.items()
        }

    def maybe_inject_fault(self) -> None:
        """Test hook ($SHARDYARD_FAULT_STEP="<step>[:kill]"): rank 0 fails once at that step, so the
        worker group restarts from a checkpoint: it raises, or with ":kill" its process is SIGKILLed
        (no exception, no clean-up: what a crash or the OOM killer leaves)."""
        fault = os.environ.get(envvars.FAULT_STEP)
        if not fault:
            return
        at, _, how = fault.partition(":")
        marker = self.run_dir / FAULT_MARKER
        if self.step == int(at) and self.ctx.rank == 0 and not marker.exists():
            marker.write_text(str(self.step))
            if how == "kill":
                # A dead worker's results not yet polled by Ray Train's controller (every 2 s) are lost
                # with it: wait until the checkpoint reported before this step has been taken in.
                time.sleep(5.0)
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at step {self.step} ({envvars.FAULT_STEP})")

    def maybe_pause(self) -> None:
        """Test hook ($SHARDYARD_PAUSE_AT="<step>:<marker>[,<step>:<marker>]"): after that step every rank
        waits at the step boundary, beating, until the marker file exists; a test orders its events
        (a node lost, a node added) against training this way instead of racing the machine's speed."""
        for item in filter(None, os.environ.get(envvars.PAUSE_AT, "").split(",")):
            at, marker = item.split(":", 1)
            while int(at) == self.step and not Path(marker).exists():
                beat(self.step, "paused by a test hook")
                time.sleep(0.1)

    def fit(self) -> None:
        spec = self.spec.training
        ckpt_every = self.spec.checkpoint.every
        self.log.log(
            self.step,
            {
                "kind": "event",
                "event": "start" if self.step == 0 else "resume",
                "world": self.ctx.world,
                "total_steps": spec.steps,
            },
        )
        # Throughput counts every second of a window but evaluation and checkpoints (the stop agreement,
        # the logging and the save polls included: a user's job pays them).
        window_start, window_steps, paused = time.perf_counter(), 0, 0.0
        while self.step < spec.steps:
            self.maybe_inject_fault()
            self.timer.start_step()
            step_metrics = self.train_step()
            self.timer.end_step()
            self.driver.exit_if_gone(self.step)  # before this step writes anything
            self.expert_window.add_step()
            self.step += 1
            window_steps += 1
            last = self.step == spec.steps
            if self.step % spec.log_every == 0 or last:
                ce = _all_reduce_mean(step_metrics["ce"].reshape(1), self.ctx.world, self.dims.dp * self.dims.tp).item()
                window_end = time.perf_counter()  # this window's logging counts in the next one's time
                elapsed = window_end - window_start - paused
                record = {
                    "kind": "train",
                    "loss": ce,
                    "bpb": ce / LN2 / self.data.bytes_per_token,
                    "grad_norm": float(step_metrics["grad_norm"]),
                    "lr": self.scheduler.get_last_lr()[0],
                    "world_size": self.ctx.world,
                    "total_steps": spec.steps,
                }
                comm = dispatch_metrics(self.model, steps=window_steps * self.accum)
                self.timer.add("a2a", comm.get("comm/a2a_ms", 0.0) * window_steps * self.accum / 1000.0)
                record.update(self.observe(window_steps, elapsed))
                record["bytes_per_s"] = record["tokens_per_s"] * self.data.bytes_per_token
                record.update(comm)
                self.log.log(self.step, record)
                window_start, window_steps, paused = window_end, 0, 0.0
            metrics: dict[str, Any] = {"step": self.step}
            self.maybe_pause()
            decision = self.boundary.agree(self.step)  # collective: graceful stop, time-based checkpoint
            self.writer.poll()  # collective while a background save is on its way: finish it once written
            if (spec.eval_every and self.step % spec.eval_every == 0) or last:
                beat(self.step, "evaluation")
                eval_start = time.perf_counter()
                results = self.evaluate()
                eval_s = time.perf_counter() - eval_start
                self.timer.add("eval", eval_s)
                paused += eval_s
                metrics["val_bpb"] = results[""].bpb
                record = {
                    "kind": "eval",
                    "val_bpb": results[""].bpb,
                    "val_bpb_stderr": results[""].stderr,
                    "val_windows": results[""].windows,
                    "val_control_gain": results[""].control_gain,
                    "eval_s": eval_s,
                    "total_steps": spec.steps,
                }
                for name, result in results.items():
                    if name:
                        record[f"val/{name}_bpb"] = result.bpb
                        record[f"val/{name}_bpb_stderr"] = result.stderr
                self.log.log(self.step, record)
            hold = decision.hold and not last  # a planned resize: checkpoint here, then be restarted
            if (ckpt_every and self.step % ckpt_every == 0) or last or decision.checkpoint or decision.stop or hold:
                beat(self.step, "checkpoint")
                save_start = time.perf_counter()
                self.save_and_report(metrics)
                save_s = time.perf_counter() - save_start
                self.timer.add("checkpoint", save_s)
                paused += save_s
                self.boundary.saved()
            if decision.stop and not last:
                self.writer.close()  # a stop waits for the save on its way
                self.boundary.announce_stop(self.step)
                break
            if hold:
                self.writer.close()  # the resize checkpoint is complete before the group is told
                self.log.close()
                self.boundary.hold_for_resize(self.step, self.spec.resources.collective_timeout_minutes * 60)
        self.writer.close()
        self.log.close()


# ------------------------------------------------------------------------------ reporting sinks
class LocalReporter:
    """Runs without Ray (tests, tools; one process or a gloo group sharing a filesystem): checkpoints
    are stored as `<run_dir>/checkpoint_<step>` (as Ray Train stores them) and the newest `keep` kept.
    Metrics go to `self.metrics`."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.run_dir, self.keep = run_dir, keep
        self.store = CheckpointStore(str(run_dir))
        self.metrics: list[dict[str, Any]] = []

    def __call__(self, metrics: dict[str, Any], stored: str | None) -> None:
        self.metrics.append(metrics)
        if stored is not None and dist.get_rank(dist.group.WORLD) == 0:  # the group the Trainer's dims use
            for _, old in ckpt.checkpoints_newest_first(self.run_dir)[self.keep :]:
                shutil.rmtree(old, ignore_errors=True)


class RayReporter:
    """Every rank reports the stored checkpoint directory (written in Ray Train's storage, under the
    run's experiment path): Ray Train registers it without copying (NO_UPLOAD) and prunes to
    checkpoint.keep."""

    def __init__(self) -> None:
        import ray.train

        storage = ray.train.get_context().get_storage()
        self.store = CheckpointStore(storage.experiment_fs_path, storage.storage_filesystem)

    def __call__(self, metrics: dict[str, Any], stored: str | None) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        if stored is None:
            ray.train.report(metrics)
            return
        checkpoint = ray.train.Checkpoint(stored, filesystem=self.store.filesystem)
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=Path(stored).name,
            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
        )


def quiet_ray_train_logs() -> None:
    """Keep the driver's progress bar readable: Ray Train's per-report INFO lines come from a logger
    named after its module's file path, not from the "ray.train" hierarchy."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray Train version: its lines stay
        pass


def _ray_resume_directory(run_dir: Path, rank: int) -> Path | None:
    """The checkpoint Ray Train hands back, if complete; else the newest complete one in the run."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        path = ckpt.local_checkpoint_dir(checkpoint)  # object storage: downloaded first
        problem = ckpt.verify_checkpoint(path, full=False)
        newest = ckpt.find_latest_checkpoint(run_dir)  # a save the group finished before Ray registered it
        if problem is None and (newest is None or ckpt.read_meta(newest)["step"] <= ckpt.read_meta(path)["step"]):
            return path
        if problem is None:
            return newest
        if rank == 0:
            print(f"[shardyard] checkpoint {path.name} is incomplete ({problem}); falling back", flush=True)
    return ckpt.find_latest_checkpoint(
        run_dir, report=(lambda m: print(f"[shardyard] {m}", flush=True)) if rank == 0 else None
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: config carries the resolved spec as JSON and the run directory."""
    from shardyard.runtime.failures import worker_attempt

    quiet_ray_train_logs()
    spec = spec_from_json(config["spec_json"])
    run_dir = Path(config["run_dir"])
    with worker_attempt(spec, run_dir):  # step watchdog; a model that cannot fit is a UserError
        trainer = Trainer(spec, run_dir, RayReporter())
        record_secret_probe(run_dir, trainer.ctx.rank)  # test hook: digests only
        trainer.resume(_ray_resume_directory(run_dir, trainer.ctx.rank))
        trainer.fit()
