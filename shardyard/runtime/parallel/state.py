"""What a job's training state looks like to a checkpoint: the one interface every backend implements.

    state.layout()                  what the checkpoint's tensors depend on (resuming under another
                                    layout reshards, where the format allows it)
    state.save(directory, group)    collective: every rank writes its part of the model and optimizer
                                    (over `group`, a process group of its own, when the state allows
                                    `threaded_save`: the checkpoint writer then runs it off the main thread)
    state.save_async(directory, group)  copy the state to CPU memory now, write it in the background;
                                    returns the write's Future (DCP only: the spec refuses the rest)
    state.load(directory, layout)   collective: read it back (`layout`: the checkpoint's)

`DCPState` (every mode but a backend with a format of its own, in its own module) writes with
torch.distributed.checkpoint (DCP) under directory/shards/. State dicts use canonical parameter
names, the names of a single worker holding every expert: an expert-parallel shard `...experts.w_up`
is saved as a DTensor over the dims' (edp, ep) mesh placed Shard(0) on ep; a fused projection that
tensor parallelism reordered by heads (tensor_parallel.HeadAligned) is saved in the single worker's row
order. DCP then writes each rank's own chunks and reads any layout back, which is what makes
resharding on resume the normal path.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from shardyard.models.moe.layer import MoELayer
from shardyard.optim import KERNEL_FLAGS
from shardyard.runtime.checkpoint import SHARDS_DIR
from shardyard.runtime.parallel.dims import ParallelDims
from shardyard.runtime.parallel.tensor_parallel import HeadAligned
from shardyard.runtime.safe_load import SafeFileSystemReader, read_dcp_metadata

DCP_FORMAT = "dcp"
LEGACY_DCP_MODES = ("replicated", "mesh")  # layouts written before formats were named: their mode


class TrainingState:
    """The interface (see the module docstring)."""

    threaded_save = False  # save() may run in a thread, its collectives on the group it is given

    def layout(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, directory: Path, group: dist.ProcessGroup | None = None) -> None:
        raise NotImplementedError

    def save_async(self, directory: Path, group: dist.ProcessGroup | None) -> Future:
        raise NotImplementedError

    def load(self, directory: Path, layout: dict[str, Any]) -> None:
        raise NotImplementedError


def checkpoint_format(layout: dict[str, Any]) -> str:
    """The state format a checkpoint was written in (older checkpoints name their parallel mode in "mode")."""
    if "format" in layout:
        return layout["format"]
    mode = layout.get("mode", DCP_FORMAT)
    return DCP_FORMAT if mode in LEGACY_DCP_MODES else mode


def expert_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the MoE layers' experts modules (what expert parallelism slices)."""
    return tuple(
        f"{name}.experts." if name else "experts." for name, m in model.named_modules() if isinstance(m, MoELayer)
    )


class DCPState(TrainingState):
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dims: ParallelDims,
        shard: str,
        aligned: HeadAligned | None = None,
    ) -> None:
        self.model, self.optimizer, self.dims, self.shard = model, optimizer, dims, shard
        self.aligned = aligned or HeadAligned()
        self.expert_mesh = dims.mesh("experts") if dims.ep_enabled else None
        self.experts = expert_prefixes(model)
        self.stager = None  # DCP's CPU staging for save_async, made on first use

    def layout(self) -> dict[str, Any]:
        return {
            "format": DCP_FORMAT,
            "world": self.dims.world_size,
            "ep": self.dims.ep,
            "tp": self.dims.tp,
            "shard": self.shard if self.dims.fsdp_enabled else "none",
            "pp": self.dims.pp,
        }

    threaded_save = True

    def save(self, directory: Path, group: dist.ProcessGroup | None = None) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self.state_dict(), checkpoint_id=str(Path(directory) / SHARDS_DIR), process_group=group)

    def save_async(self, directory: Path, group: dist.ProcessGroup | None) -> Future:
        """DCP's asynchronous save: the state is copied to CPU memory before this returns (so training
        may change it), the files are written by DCP's own thread; its collectives run on `group`.
        One stager serves every save: its CPU buffers are reused (the caller starts a save only
        after the previous one's write ended), so staging is a copy, not an allocation."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if self.stager is None:
            # no pinned or shared memory, copies in this thread: the CPU case; on a GPU the same copy
            # is a device-to-host transfer (pinned memory and a side stream would overlap it)
            self.stager = DefaultStager(StagingOptions(False, False, False, False))
        return dcp.async_save(
            self.state_dict(),
            checkpoint_id=str(Path(directory) / SHARDS_DIR),
            process_group=group,
            async_stager=self.stager,
        )

    def load(self, directory: Path, layout: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        fmt = checkpoint_format(layout)
        if fmt != DCP_FORMAT:
            raise RuntimeError(
                f"{directory}: written in the {fmt!r} state format (layout {layout}); resume it with the "
                "parallel settings that wrote it, or `shardyard export` it"
            )
        state = self.state_dict()
        read_dcp_metadata(Path(directory) / SHARDS_DIR / ".metadata")  # refuses code before DCP wraps the error
        dcp.load(state, storage_reader=SafeFileSystemReader(str(Path(directory) / SHARDS_DIR)))
        self.load_state_dict(state)

    # ------------------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """{"model": ..., "optim": ...} with canonical names; tensors plain or DTensor (collective)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model_sd = get_model_state_dict(self.model)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer)
        return {
            "model": {k: self._export_tensor(k, v) for k, v in model_sd.items()},
            "optim": {
                "state": {
                    k: {key: self._export_tensor(k, v) for key, v in entry.items()}
                    for k, entry in optim_sd["state"].items()
                },
                "param_groups": optim_sd["param_groups"],
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what `state_dict()` gave (after DCP filled it from a checkpoint of any layout)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        model_sd = {k: self._import_tensor(k, v) for k, v in state["model"].items()}
        optim_sd = {
            "state": {
                k: {key: self._import_tensor(k, v) for key, v in entry.items()}
                for k, entry in state["optim"]["state"].items()
            },
            "param_groups": self._own_param_groups(state["optim"]["param_groups"]),
        }
        set_model_state_dict(self.model, model_sd)
        set_optimizer_state_dict(self.model, self.optimizer, optim_sd)

    def _own_param_groups(self, saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The saved groups' settings over this rank's parameters. DCP keeps one rank's copy of the
        (non-tensor) groups, whose name lists cover only that rank's pipeline stages; the settings are
        the same on every rank, the names are this rank's own. The kernel flags are this job's too: the
        layout picks them (optim.kernel_options), and a fused kernel chosen at the saved layout may
        not run at this one."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        mine = get_optimizer_state_dict(self.model, self.optimizer)["param_groups"]
        if len(saved) != len(mine):
            raise RuntimeError(f"checkpoint has {len(saved)} optimizer parameter groups, this job {len(mine)}")
        return [
            {**group, **{key: own[key] for key in KERNEL_FLAGS if key in own}, "params": own["params"]}
            for group, own in zip(saved, mine)
        ]

    def _export_tensor(self, name: str, value: Any) -> Any:
        """An expert-parallel shard becomes a DTensor over (edp, ep), Shard(0) on ep; a head-aligned
        fused projection (and its optimizer moments) goes back to the canonical row order."""
        if name in self.aligned.orders and isinstance(value, torch.Tensor) and value.dim() >= 1:
            return self.aligned.canonical(name, value)
        if (
            self.expert_mesh is not None
            and name.startswith(self.experts)
            and isinstance(value, torch.Tensor)
            and not isinstance(value, DTensor)
            and value.dim() >= 1
        ):
            shape = (value.shape[0] * self.dims.ep, *value.shape[1:])
            return DTensor.from_local(
                value,
                self.expert_mesh,
                [Replicate(), Shard(0)],
                run_check=False,
                shape=torch.Size(shape),
                stride=torch.empty(shape, device="meta").stride(),
            )
        return value

    def _import_tensor(self, name: str, value: Any) -> Any:
        if name in self.aligned.orders and isinstance(value, torch.Tensor) and value.dim() >= 1:
            return self.aligned.reordered(name, value)
        if self.expert_mesh is not None and isinstance(value, DTensor) and value.device_mesh is self.expert_mesh:
            return value.to_local()
        return value


def read_dcp_weights(checkpoint: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of `model` (single-worker names) from a DCP checkpoint, in this one process."""
    import warnings

    import torch.distributed.checkpoint as dcp

    read_dcp_metadata(Path(checkpoint) / SHARDS_DIR / ".metadata")  # refuses code before DCP wraps the error
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():  # no_dist=True is the intent; DCP still warns that it assumed so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=SafeFileSystemReader(str(Path(checkpoint) / SHARDS_DIR)), no_dist=True)
    return state["model"]


class DCPWeights:
    """Reads one weight of a DCP checkpoint at a time, by its single-worker name (any layout: DCP
    assembles the ranks' chunks of that one tensor)."""

    def __init__(self, checkpoint: Path) -> None:
        read_dcp_metadata(Path(checkpoint) / SHARDS_DIR / ".metadata")  # refuses code before DCP reads it
        self.path = str(Path(checkpoint) / SHARDS_DIR)

    def read(self, name: str, like: torch.Tensor) -> torch.Tensor:
        import warnings

        import torch.distributed.checkpoint as dcp

        state = {"model": {name: torch.empty(like.shape, dtype=like.dtype)}}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeFileSystemReader(self.path), no_dist=True)
        return state["model"][name]

    def close(self) -> None:
        pass
