"""DeepSpeed ZeRO for `parallel.zero: 1 | 2 | 3`, the one module that knows DeepSpeed.

`DeepSpeedTraining` is both the gradient step (the engine replaces DDP, clipping and the optimizer
step) and the training state (step.GradientStep and state.TrainingState). Its checkpoint is
DeepSpeed's own (one optimizer partition per rank, written by every rank under directory/deepspeed/),
so a ZeRO run resumes at the same number of workers only; `ZeroWeights` reads its full weights one
tensor at a time for export, generate and eval. Use `parallel.shard` (FSDP2) for resharding
checkpoints and for expert parallelism.

DeepSpeed is an optional extra (`pip install 'shardyard[deepspeed]'`); on CPU its accelerator builds a
shared-memory comm op on first use (~40 s, cached in ~/.cache/torch_extensions). Its engine
unpickles its partitions with weights_only=False, so on resume every `*.pt` is checked first against
torch's weights-only allow-list plus DeepSpeed's own state classes (safe_load.check_torch_files);
`ZeroWeights` unpickles only their trees, with those classes kept as data (runtime/torch_file.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shardyard.platform.errors import UserError
from shardyard.platform.schema import JobSpec
from shardyard.runtime.parallel.dims import ParallelDims
from shardyard.runtime.parallel.state import TrainingState, checkpoint_format
from shardyard.runtime.parallel.step import GradientStep
from shardyard.runtime.safe_load import check_torch_files
from shardyard.runtime.torch_file import Record, TensorRef, TorchFile

ENGINE_TAG = "deepspeed"
FORMAT = "deepspeed"  # the state format (checkpoint layout "format") and the directory it writes


def deepspeed_config(spec: JobSpec, workers: int) -> dict[str, Any]:
    """Our optimizer and schedule stay ours; DeepSpeed partitions their state and clips gradients."""
    micro, accum = spec.batch_layout(workers)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": spec.optim.grad_clip,
        "zero_optimization": {"stage": spec.parallel.zero},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _safe_classes() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def check_partitions(directory: Path) -> None:
    """Refuse (UnsafeCheckpoint) partitions that need more than plain tensors and DeepSpeed's state classes."""
    check_torch_files(Path(directory) / FORMAT, _safe_classes())


class DeepSpeedTraining(GradientStep, TrainingState):
    def __init__(self, spec: JobSpec, model, optimizer, scheduler, dims: ParallelDims) -> None:
        super().__init__(optimizer, scheduler)
        try:
            import deepspeed
        except ImportError:
            raise UserError(
                "parallel.zero needs DeepSpeed on the workers: pip install 'shardyard[deepspeed]'"
            ) from None
        self.dims = dims
        self.stage = spec.parallel.zero
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(spec, dims.dp),
            dist_init_required=False,
        )
        self.module = self.engine

    # ------------------------------------------------------------------------------ gradient step
    def backward(self, loss: torch.Tensor) -> None:
        # The trainer already divides each micro-batch's loss by grad_accum.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # applies only at the accumulation boundary

    def step(self) -> torch.Tensor:
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else float(norm), dtype=torch.float32)

    # ------------------------------------------------------------------------------ state
    def layout(self) -> dict[str, Any]:
        return {"format": FORMAT, "world": self.dims.world_size, "zero": self.stage}

    def save(self, directory: Path, group: dist.ProcessGroup | None = None) -> None:
        """Collective: every rank writes its partition under directory/deepspeed/ (DeepSpeed's
        collectives run on the training's own group: `threaded_save` stays False)."""
        self.engine.save_checkpoint(str(directory), tag=ENGINE_TAG)

    def load(self, directory: Path, layout: dict[str, Any]) -> None:
        if checkpoint_format(layout) != FORMAT or layout.get("world") != self.dims.world_size:
            raise RuntimeError(
                f"{directory}: a DeepSpeed ZeRO job resumes only its own checkpoints at the same "
                f"number of workers (checkpoint layout {layout}, this job {self.layout()})"
            )
        check_partitions(directory)
        path, _ = self.engine.load_checkpoint(str(directory), tag=ENGINE_TAG)
        if path is None:
            raise RuntimeError(f"{directory}: no DeepSpeed engine state (was the job started without parallel.zero?)")


# DeepSpeed's state classes in its partitions: kept as data when a checkpoint is read for its weights.
STATE_RECORDS = {
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
}


@dataclass(frozen=True)
class _Piece:
    """`count` elements of one rank's flat fp32 partition, from element `start` of `ref`."""

    rank: int
    ref: TensorRef
    start: int
    count: int


class ZeroWeights:
    """The full fp32 weights of a ZeRO 1-3 checkpoint, read one tensor at a time (single process).

    DeepSpeed's layout (as its utils/zero_to_fp32.py reads it): every rank's optimizer file holds its
    partition of the fp32 master weights as flat vectors, one per parameter group; the model-states
    file names the parameters of each group in order with their shapes. Stages 1-2 split each group's
    concatenated parameters (each followed by its alignment padding) into equal consecutive slices, one
    per rank; stage 3 splits every parameter itself into `ceil(numel / world)` elements per rank,
    consecutive in the rank's flat vector. Only the tree of each file is unpickled (TorchFile, no code
    run); a weight's elements are read from each rank's file by offset, so a read holds one tensor."""

    def __init__(self, directory: Path) -> None:
        root = Path(directory) / FORMAT
        optim_paths = sorted(root.glob("*_optim_states.pt"), key=_rank_order)
        model_paths = sorted(root.glob("*_model_states.pt"), key=_rank_order)
        if not optim_paths or not model_paths:
            raise UserError(f"{root}: no DeepSpeed optimizer or model-states files")
        self.files = [TorchFile(p, STATE_RECORDS) for p in optim_paths]
        model_files = [TorchFile(p, STATE_RECORDS) for p in model_paths]
        states = [f.tree["optimizer_state_dict"] for f in self.files]
        stage = states[0]["zero_stage"]
        self.stage = int(stage.args[0] if isinstance(stage, Record) else stage)
        world = states[0]["partition_count"]
        self.world = max(world) if isinstance(world, list) else int(world)
        if self.world != len(self.files):
            raise UserError(
                f"{root}: {len(self.files)} optimizer partitions, but the checkpoint was written by {self.world}"
            )
        model = model_files[0].tree
        self.model_files = model_files
        self.buffers: dict[str, tuple[TorchFile, TensorRef]] = {
            name: (model_files[0], ref) for name, ref in model["module"].items() if name in model["buffer_names"]
        }
        self.shared: dict[str, str] = dict(model.get("shared_params") or {})
        self.frozen = {name: torch.Size(s) for name, s in (model.get("frozen_param_shapes") or {}).items()}
        self.shapes: dict[str, torch.Size] = {}
        self.pieces: dict[str, list[_Piece]] = {}
        if self.stage <= 2:
            groups = [s["single_partition_of_fp32_groups"] for s in states]
            self._plan_stage2(model["param_shapes"], groups, states[0].get("param_alignment_paddings"))
        else:
            self._plan_stage3(model["param_shapes"], [s["fp32_flat_groups"] for s in states])

    def _plan_stage2(self, param_shapes: list[dict], groups: list[list[TensorRef]], paddings: list | None) -> None:
        for g, shapes in enumerate(param_shapes):
            ranks = [groups[r][g] for r in range(self.world)]
            bounds = [0]
            for ref in ranks:
                bounds.append(bounds[-1] + ref.numel())
            offset = 0
            for p, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                pieces = []
                for r, ref in enumerate(ranks):
                    lo, hi = max(offset, bounds[r]), min(offset + numel, bounds[r + 1])
                    if lo < hi:
                        pieces.append(_Piece(r, ref, lo - bounds[r], hi - lo))
                self.shapes[name], self.pieces[name] = torch.Size(shape), pieces
                offset += numel + (paddings[g][p] if paddings else 0)
            align = 2 * self.world  # stage 1-2 pad each group to a multiple of 2 x world
            if math.ceil(offset / align) * align != math.ceil(bounds[-1] / align) * align:
                raise UserError(f"group {g}: parameters take {offset} elements, the partitions hold {bounds[-1]}")

    def _plan_stage3(self, param_shapes: list[dict], flats: list[list[TensorRef]]) -> None:
        starts = [0]
        for ref in flats[0]:
            starts.append(starts[-1] + ref.numel())
        offset = 0
        for name, shape in ((n, s) for shapes in param_shapes for n, s in shapes.items()):
            numel = math.prod(shape)
            per_rank = math.ceil(numel / self.world)
            pieces = []
            for r in range(self.world):
                want = min(per_rank, numel - r * per_rank)  # the last ranks hold padding past the end
                for g, ref in enumerate(flats[r]):
                    lo, hi = max(offset, starts[g]), min(offset + max(want, 0), starts[g + 1])
                    if lo < hi:
                        pieces.append(_Piece(r, ref, lo - starts[g], hi - lo))
            self.shapes[name], self.pieces[name] = torch.Size(shape), pieces
            offset += per_rank
        if offset != starts[-1]:
            raise UserError(f"parameters take {offset} elements of each rank's partition, which holds {starts[-1]}")

    def names(self) -> set[str]:
        return set(self.pieces) | set(self.buffers) | set(self.shared) | set(self.frozen)

    def read(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """One full weight or buffer by its single-worker name, as `like`'s dtype (the master weights
        are fp32)."""
        return self._read(self.shared.get(name, name)).to(like.dtype)

    def _read(self, name: str) -> torch.Tensor:
        if name in self.buffers:
            file, ref = self.buffers[name]
            return file.read(ref).float()
        if name in self.frozen:
            return self._read_frozen(name)
        if name not in self.pieces:
            raise KeyError(f"{self.files[0].path.parent}: no weight {name!r}")
        out = torch.empty(self.shapes[name], dtype=torch.float32)
        flat, at = out.view(-1), 0
        for piece in self.pieces[name]:
            self.files[piece.rank].read_into(piece.ref, flat[at : at + piece.count], piece.start)
            at += piece.count
        if at != flat.numel():
            raise UserError(
                f"{self.files[0].path.parent}: the partitions hold {at} of {name}'s {flat.numel()} elements"
            )
        return out

    def _read_frozen(self, name: str) -> torch.Tensor:
        """Frozen weights sit in the model-states files: whole at stages 1-2, a slice per rank at 3."""
        shape = self.frozen[name]
        if self.stage <= 2:
            file = self.model_files[0]
            return file.read(file.tree["frozen_param_fragments"][name]).float().view(shape)
        out = torch.empty(math.prod(shape), dtype=torch.float32)
        at = 0
        for file in self.model_files:
            ref = file.tree["frozen_param_fragments"][name]
            count = min(ref.numel(), out.numel() - at)
            if count > 0:
                piece = torch.empty(count, dtype=ref.dtype)
                file.read_into(ref, piece)
                out[at : at + count] = piece
                at += count
        return out.view(shape)

    def close(self) -> None:
        for file in self.files + self.model_files:
            file.close()


def _rank_order(path: Path) -> list[int | str]:
    """Natural order of DeepSpeed's file names (rank 10 after rank 9)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]
