"""The training loop every Ray Train worker runs.

topology -> model, optimizer, data -> resume from the newest checkpoint -> train, evaluate,
checkpoint -> rank 0 logs. Ray Train has already initialised torch.distributed (gloo on CPU,
nccl on GPU) when this runs; the same loop runs single-process when it has not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shardyard.cluster.topology import Topology, topology_from_ray
from shardyard.comm.expert_parallel import apply_expert_parallel, clip_grad_norm, sync_gradients
from shardyard.comm.groups import build_groups
from shardyard.data.corpus import load_corpus
from shardyard.data.loader import build_train_loader, validation_batches
from shardyard.models import build_model, moe_layers
from shardyard.models.moe.layer import attach_router_bias_updates
from shardyard.models.lowrank import set_lowrank_progress
from shardyard.optim import build_optimizer, build_scheduler
from shardyard.platform.schema import JobSpec
from shardyard.platform.spec import spec_from_json
from shardyard.runtime import checkpoint as ckpt
from shardyard.runtime import zero
from shardyard.tracking.logger import MetricsLogger

LN2 = math.log(2)
warnings.filterwarnings("ignore", message=".*set_vital.*")
FAULT_MARKER = ".injected_fault_done"


@dataclass
class WorkerContext:
    rank: int
    world: int
    device: torch.device


def _context() -> WorkerContext:
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return WorkerContext(rank, world, device)


def _all_reduce_mean(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return values


def _autocast(spec: JobSpec, device: torch.device):
    if spec.training.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def record_topology(run_dir: Path, topology: Topology) -> None:
    """Where this rank ran (node rank, local rank as Ray Train assigned them), for reports and tests."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"rank": topology.rank, "node_local": [topology.node_rank, topology.local_rank],
              "ranks_per_node": topology.ranks_per_node, "world_size": topology.world_size,
              "hostname": socket.gethostname(), "node_id": os.environ.get("RAY_NODE_ID", "")}
    (run_dir / f"topology-rank{topology.rank}.json").write_text(json.dumps(record))


class Trainer:
    """Wires the components of one worker together; the only place that does."""

    def __init__(self, spec: JobSpec, run_dir: Path, fault_step: int | None = None) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.fault_step = fault_step
        self.ctx = _context()
        # One intra-op thread per CPU the worker was given: oversubscribed cores slow small matmuls badly.
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
        torch.manual_seed(spec.seed)  # identical initial weights on every rank

        self.model = build_model(spec.model, spec.data.seq_len).to(self.ctx.device)
        self.moe = moe_layers(self.model)
        self.groups = None  # expert-parallel process groups when parallel.expert_parallel > 1
        self.ddp: torch.nn.Module = self.model
        if spec.parallel.expert_parallel > 1:
            # Experts sharded over EP groups: gradients are reduced explicitly (dense over the
            # world, experts over their expert-data-parallel group), not by DDP.
            topology = topology_from_ray()
            self.groups = build_groups(topology, spec.parallel.expert_parallel)
            record_topology(run_dir, topology)
            apply_expert_parallel(self.model, self.groups, spec.parallel)
        else:
            # EP 1: parallel.dispatch stages (if any) still wrap the experts, with a local transport.
            apply_expert_parallel(self.model, None, spec.parallel)
            if self.ctx.world > 1:
                self.ddp = DistributedDataParallel(self.model, device_ids=None if self.ctx.device.type == "cpu" else [self.ctx.device])
        self.optimizer = build_optimizer(spec.optim, self.model)
        attach_router_bias_updates(self.moe, self.optimizer)
        self.scheduler = build_scheduler(spec.optim, self.optimizer, spec.training.steps)
        self.engine = None  # DeepSpeed ZeRO engine: replaces DDP, clipping and the optimizer step
        if spec.parallel.zero:
            self.engine = zero.build_engine(spec, self.model, self.optimizer, self.scheduler)
            self.ddp = self.engine

        corpus = load_corpus(spec.data)
        self.loader = build_train_loader(corpus.train, spec.data.seq_len, spec.training.batch_size,
                                         self.ctx.rank, self.ctx.world, spec.seed)
        self.val = validation_batches(corpus.val, spec.data.seq_len, spec.training.batch_size,
                                      spec.training.eval_batches, self.ctx.rank, self.ctx.world)
        self.step = 0
        self.log = MetricsLogger(spec, run_dir, enabled=self.ctx.rank == 0)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        gathered = self._gather(self.loader.state_dict())
        if self.engine is not None:  # model and optimizer live in the engine's own files
            return {"model": self.model.state_dict() if self.spec.parallel.zero < 3 else None,
                    "optimizer": None, "scheduler": self.scheduler.state_dict(), "loaders": gathered,
                    "step": self.step, "rng": ckpt.rng_state()}
        model_state, optim_state = self.model.state_dict(), self.optimizer.state_dict()
        if self.groups is not None:  # each rank holds different experts: keep every rank's shard
            model_state, optim_state = self._gather(model_state), self._gather(optim_state)
        return {
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "loaders": gathered,
            "step": self.step,
            "rng": ckpt.rng_state(),
        }

    def _gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (collective)."""
        if self.ctx.world == 1:
            return [obj]
        gathered: list[Any] = [None] * self.ctx.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def load_state(self, state: dict[str, Any]) -> None:
        if self.engine is None and state["optimizer"] is None:
            raise RuntimeError("checkpoint was written by a DeepSpeed ZeRO job; this job has parallel.zero 0")
        if self.engine is not None:
            self._load_progress(state)
            return
        sharded = isinstance(state["model"], list)
        if sharded != (self.groups is not None):
            raise RuntimeError("checkpoint and job disagree on expert parallelism (parallel.expert_parallel)")
        rank = self.ctx.rank
        self.model.load_state_dict(state["model"][rank] if sharded else state["model"])
        self.optimizer.load_state_dict(state["optimizer"][rank] if sharded else state["optimizer"])
        self._load_progress(state)

    def _load_progress(self, state: dict[str, Any]) -> None:
        """Scheduler, every rank's data position, step and RNG."""
        self.scheduler.load_state_dict(state["scheduler"])
        loaders = state["loaders"]
        if len(loaders) != self.ctx.world:
            raise RuntimeError(f"checkpoint was written by {len(loaders)} workers, this job has {self.ctx.world}")
        self.loader.load_state_dict(loaders[self.ctx.rank])
        self.step = int(state["step"])
        ckpt.set_rng_state(state["rng"])

    def resume_if_possible(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            state, _ = ckpt.read_checkpoint(Path(directory))
            if self.engine is not None:
                zero.load_engine(self.engine, Path(directory))
        self.load_state(state)
        if self.ctx.rank == 0:
            print(f"[shardyard] resumed from step {self.step} ({checkpoint.path})", flush=True)

    def save_and_report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        state = self.state()  # collective: every rank takes part
        if self.engine is not None:
            self._save_and_report_engine(state, metrics)
            return
        if self.ctx.rank == 0:
            with tempfile.TemporaryDirectory(prefix="shardyard-ckpt-") as tmp:
                directory = ckpt.write_checkpoint(Path(tmp) / f"step_{self.step:08d}", state,
                                                  {"step": self.step, "name": self.spec.name})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
        else:
            ray.train.report(metrics, checkpoint=None)

    def _save_and_report_engine(self, state: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Every rank reports its own directory (its optimizer partition); Ray Train merges them."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="shardyard-ckpt-") as tmp:
            directory = Path(tmp) / f"step_{self.step:08d}"
            zero.save_engine(self.engine, directory)
            if self.ctx.rank == 0:
                staged = ckpt.write_checkpoint(Path(tmp) / "staged", state, {"step": self.step, "name": self.spec.name,
                                                                            "deepspeed_zero": self.spec.parallel.zero})
                for item in staged.iterdir():
                    item.rename(directory / item.name)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))

    # ------------------------------------------------------------------ loop
    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        inputs, targets = (t.to(self.ctx.device, non_blocking=True) for t in batch)
        self.model.train()
        if self.spec.model.ffn.kind == "lowrank":
            set_lowrank_progress(self.model, self.step / self.spec.training.steps)  # self-guided blend
        with _autocast(self.spec, self.ctx.device):
            _, ce = self.ddp(inputs, targets)
        loss = ce  # the MoE layers' aux losses ride along in backward
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()  # clip, optimizer step, scheduler step, zero grads
            norm = self.engine.get_global_grad_norm()
            grad_norm = torch.as_tensor(0.0 if norm is None else float(norm))
            return {"ce": ce.detach(), "grad_norm": grad_norm}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.spec.optim.grad_clip
        max_norm = clip if clip > 0 else float("inf")
        if self.groups is not None:
            sync_gradients(self.model, self.groups)
            grad_norm = clip_grad_norm(self.model, max_norm, self.groups)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        return {"ce": ce.detach(), "grad_norm": grad_norm.detach()}

    def moe_metrics(self) -> dict[str, float]:
        """The step's MoE accounting, summed over ranks (collective); resets the layers' buffers."""
        if not self.moe:
            return {"aux_loss": 0.0}
        stats = [layer.take_step_stats() for layer in self.moe]
        flat = torch.cat([torch.cat([s["tokens_per_expert"], torch.stack([s["aux_loss"], s["balance_loss"], s["z_loss"],
                                                                         s["dropped"], s["routed"]])]) for s in stats])
        if self.ctx.world > 1:
            dist.all_reduce(flat)
        out: dict[str, float] = {"aux_loss": 0.0}
        offset = 0
        for i, layer in enumerate(self.moe):
            load = flat[offset:offset + layer.num_experts]
            aux, balance, z, dropped, routed = (flat[offset + layer.num_experts:offset + layer.num_experts + 5] / torch.tensor([self.ctx.world] * 3 + [1, 1], dtype=flat.dtype)).tolist()
            offset += layer.num_experts + 5
            share = load / load.sum().clamp(min=1)
            out.update({f"moe/layer{i}/expert{e}_share": float(s) for e, s in enumerate(share)})
            out[f"moe/layer{i}/max_share"] = float(share.max())
            out[f"moe/layer{i}/balance_loss"] = balance
            out[f"moe/layer{i}/z_loss"] = z
            out[f"moe/layer{i}/dropped_fraction"] = dropped / max(routed, 1.0)
            out["aux_loss"] += aux
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss in bits per byte, averaged over all ranks' validation batches."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        for inputs, targets in self.val:
            with _autocast(self.spec, self.ctx.device):
                _, ce = self.model(inputs.to(self.ctx.device), targets.to(self.ctx.device))
            total += torch.tensor([ce.item() * targets.numel(), targets.numel()], dtype=torch.float64, device=self.ctx.device)
        if self.ctx.world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1].clamp(min=1)) / LN2

    def maybe_inject_fault(self) -> None:
        """Test hook: crash rank 0 once at `fault_step` so Ray Train restarts from a checkpoint."""
        marker = self.run_dir / FAULT_MARKER
        if self.fault_step is not None and self.step == self.fault_step and self.ctx.rank == 0 and not marker.exists():
            marker.write_text(str(self.step))
            raise RuntimeError(f"injected fault at step {self.step} (SHARDYARD_FAULT_STEP)")

    def fit(self) -> None:
        spec = self.spec.training
        ckpt_every = self.spec.checkpoint.every
        tokens_per_step = self.spec.tokens_per_step()
        data = iter(self.loader)
        window_start, window_steps, paused = time.perf_counter(), 0, 0.0  # throughput excludes eval/checkpoints
        while self.step < spec.steps:
            self.maybe_inject_fault()
            step_metrics = self.train_step(next(data))
            self.step += 1
            window_steps += 1
            last = self.step == spec.steps
            if not (self.step % spec.log_every == 0 or last):
                for layer in self.moe:
                    layer.take_step_stats()  # the accounting covers one optimizer step
            else:
                ce = _all_reduce_mean(step_metrics["ce"].float().reshape(1), self.ctx.world).item()
                elapsed = time.perf_counter() - window_start - paused
                record = {"kind": "train", "loss": ce, "bpb": ce / LN2,
                          "grad_norm": float(step_metrics["grad_norm"]),
                          "lr": self.scheduler.get_last_lr()[0],
                          "tokens_per_s": tokens_per_step * window_steps / max(elapsed, 1e-9),
                          "total_steps": spec.steps}
                record.update(self.moe_metrics())
                self.log.log(self.step, record)
                window_start, window_steps, paused = time.perf_counter(), 0, 0.0
            pause_start = time.perf_counter()
            metrics: dict[str, Any] = {"step": self.step}
            if (spec.eval_every and self.step % spec.eval_every == 0) or last:
                val_bpb = self.evaluate()
                metrics["val_bpb"] = val_bpb
                self.log.log(self.step, {"kind": "eval", "val_bpb": val_bpb, "total_steps": spec.steps})
            if (ckpt_every and self.step % ckpt_every == 0) or last:
                self.save_and_report(metrics)
            paused += time.perf_counter() - pause_start
        self.log.close()


def quiet_ray_train_logs() -> None:
    """Keep the driver's progress bar readable: Ray Train's per-report INFO lines come from a logger
    named after its module's file path, not from the "ray.train" hierarchy."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray Train version: its lines stay
        pass


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: config carries the resolved spec as JSON and the run directory."""
    quiet_ray_train_logs()
    spec = spec_from_json(config["spec_json"])
    trainer = Trainer(spec, Path(config["run_dir"]), config.get("fault_step"))
    trainer.resume_if_possible()
    trainer.fit()
