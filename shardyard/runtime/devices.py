"""Which accelerator a worker owns: Ray Train's assignment, never a guess from LOCAL_RANK.

Ray gives each GPU worker whole devices and sets CUDA_VISIBLE_DEVICES; on a node where workers see
different device lists, LOCAL_RANK is not the index of this worker's GPU, and two ranks indexing by
it would share a device (and one RNG, and one NCCL communicator slot). `ray.train.torch.get_device()`
is the index Ray assigned within what this process can see. Outside Ray Train (tests, one-process
tools) the local rank is the only information there is. The spec refuses fractional GPUs per worker
(resources.gpus_per_worker), so a device is never shared.
"""

from __future__ import annotations

import os

import torch


def worker_device() -> torch.device:
    """This worker's device, made current (so CUDA RNG state and allocations are this device's)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = _ray_train_device()
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _ray_train_device() -> torch.device | None:
    try:
        import ray.train
        from ray.train.torch import get_device

        ray.train.get_context()  # raises outside a Ray Train worker
        device = get_device()
    except Exception:  # not under Ray Train (or an older API): fall back to the local rank
        return None
    return device if device.type == "cuda" else None
