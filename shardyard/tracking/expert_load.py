"""Expert load that scales to hundreds of experts and layers.

A logged step carries, per MoE layer, a handful of summaries of utilisation (= tokens an expert
received / the ideal, tokens * top_k / experts): max, min, coefficient of variation, p95, and the
number of dead experts (no tokens over the whole logging window), plus the dropped fraction and
the router's mean per-token entropy. The full per-expert counts go to a side file,
`expert_load.bin` in the run directory: one fixed-size little-endian record per logged step
(int64 step, then float64 counts of every layer's experts, layers in order), described by
`expert_load.json` (experts per layer). Appending a record is one write; a record cut short by a
crash is ignored by the reader; a step replayed after a restart is read as its last record.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from shardyard.platform.run_dir import RunDir

# Per-layer accounting summed over a window (MoELayer.take_step_stats names).
LAYER_SUMS = ("aux_loss", "balance_loss", "z_loss", "dropped", "routed", "entropy", "weight")


def utilisation_summary(counts: np.ndarray, top_k: int) -> dict[str, float]:
    """Summaries of one layer's per-expert token counts over a window."""
    experts = counts.shape[0]
    total = float(counts.sum())
    if total <= 0:
        return {"util_max": 0.0, "util_min": 0.0, "util_cv": 0.0, "util_p95": 0.0, "dead": float(experts)}
    util = counts / (total / experts)  # 1.0 = its fair share of the assignments
    return {
        "util_max": float(util.max()),
        "util_min": float(util.min()),
        "util_cv": float(util.std() / util.mean()),
        "util_p95": float(np.percentile(util, 95)),
        "dead": float((counts == 0).sum()),
    }


@dataclass
class WindowLoad:
    """One logging window's reduced expert accounting: per-layer counts and metric summaries."""

    counts: list[np.ndarray]
    metrics: dict[str, float]


class ExpertLoadWindow:
    """Sums the MoE layers' per-step accounting over a logging window (every step, no collective),
    and reduces it over ranks at log time (one all-reduce).

    Under pipeline parallelism a rank holds some of the model's MoE layers: `positions` gives each
    held layer's index among all of them and `shapes` every layer's (experts, top_k), so every rank
    reduces the same vector (zeros for layers held elsewhere) and rank 0 reports every layer."""

    def __init__(
        self,
        layers: list[torch.nn.Module],
        positions: list[int] | None = None,
        shapes: list[tuple[int, int]] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.layers = layers
        self.device = device or torch.device("cpu")  # where the all-reduce runs (the process group's device)
        self.positions = positions if positions is not None else list(range(len(layers)))
        self.shapes = shapes if shapes is not None else [(layer.num_experts, layer.top_k) for layer in layers]
        self._sums: list[torch.Tensor] | None = None
        self.steps = 0

    def add_step(self) -> None:
        """Take (and reset) the layers' accounting of the optimizer step just finished."""
        flat = [
            torch.zeros(experts + len(LAYER_SUMS), dtype=torch.float64, device=self.device)
            for experts, _ in self.shapes
        ]
        for position, layer in zip(self.positions, self.layers):
            s = layer.take_step_stats()
            flat[position] = torch.cat([s["tokens_per_expert"], torch.stack([s[f] for f in LAYER_SUMS])]).to(
                self.device
            )
        self._sums = flat if self._sums is None else [a + b for a, b in zip(self._sums, flat)]
        self.steps += 1

    def take(self, world: int) -> WindowLoad:
        """The window's load summed over ranks (collective when world > 1); resets the window."""
        if self._sums is None:
            self.add_step()
        assert self._sums is not None
        flat = torch.cat(self._sums)
        if world > 1:
            dist.all_reduce(flat)
        flat = flat.cpu().numpy()
        counts: list[np.ndarray] = []
        metrics: dict[str, float] = {"aux_loss": 0.0}
        offset = 0
        for i, (experts, top_k) in enumerate(self.shapes):
            load = flat[offset : offset + experts]
            sums = dict(zip(LAYER_SUMS, flat[offset + experts : offset + experts + len(LAYER_SUMS)]))
            offset += experts + len(LAYER_SUMS)
            counts.append(load.copy())
            weight = max(float(sums["weight"]), 1e-12)  # micro-batch weights summed over steps and ranks
            for name, value in utilisation_summary(load, top_k).items():
                metrics[f"moe/layer{i}/{name}"] = value
            metrics[f"moe/layer{i}/balance_loss"] = float(sums["balance_loss"]) / weight
            metrics[f"moe/layer{i}/z_loss"] = float(sums["z_loss"]) / weight
            metrics[f"moe/layer{i}/router_entropy"] = float(sums["entropy"]) / weight
            metrics[f"moe/layer{i}/dropped_fraction"] = float(sums["dropped"]) / max(float(sums["routed"]), 1.0)
            metrics["aux_loss"] += float(sums["aux_loss"]) / weight
        self._sums, self.steps = None, 0
        return WindowLoad(counts, metrics)


class ExpertLoadFile:
    """Appends one record per logged step to the run's side file (rank 0 only)."""

    def __init__(self, run_dir: Path, experts_per_layer: list[int]) -> None:
        self.path = RunDir(run_dir).expert_load
        index = RunDir(run_dir).expert_load_index
        layout = {"experts_per_layer": experts_per_layer, "dtype": "<f8", "step_dtype": "<i8"}
        if index.exists():
            existing = json.loads(index.read_text())
            if existing.get("experts_per_layer") != experts_per_layer:
                raise ValueError(
                    f"{index}: written for experts {existing.get('experts_per_layer')}, "
                    f"this model has {experts_per_layer}"
                )
        else:
            tmp = index.with_name(f".{index.name}.tmp")
            tmp.write_text(json.dumps(layout))
            os.replace(tmp, index)
        self.record_bytes = 8 + 8 * sum(experts_per_layer)
        self._drop_partial_tail()

    def _drop_partial_tail(self) -> None:
        """A record cut short by a crash would misalign every record appended after it."""
        if self.path.exists():
            size = self.path.stat().st_size
            if size % self.record_bytes:
                with open(self.path, "r+b") as f:
                    f.truncate(size - size % self.record_bytes)

    def append(self, step: int, counts: list[np.ndarray]) -> None:
        record = np.int64(step).astype("<i8").tobytes() + np.concatenate(counts).astype("<f8").tobytes()
        with open(self.path, "ab") as f:
            f.write(record)


def read_expert_load(run_dir: Path) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """(steps [S], per layer an array [S, experts]) from a run's side file, the last record per step
    kept and sorted by step; None when the run has no MoE load records."""
    index, data = RunDir(Path(run_dir)).expert_load_index, RunDir(Path(run_dir)).expert_load
    if not index.exists() or not data.exists():
        return None
    experts = json.loads(index.read_text())["experts_per_layer"]
    width = sum(experts)
    raw = data.read_bytes()
    usable = len(raw) - len(raw) % (8 + 8 * width)
    if usable == 0:
        return None
    records = np.frombuffer(raw[:usable], dtype=np.dtype([("step", "<i8"), ("counts", "<f8", (width,))]))
    last: dict[int, int] = {int(s): i for i, s in enumerate(records["step"])}
    order = [last[s] for s in sorted(last)]
    steps = records["step"][order]
    counts = records["counts"][order]
    bounds = np.cumsum([0, *experts])
    return steps, [counts[:, bounds[i] : bounds[i + 1]] for i in range(len(experts))]


def heatmap_rgb(counts: list[np.ndarray]) -> np.ndarray:
    """An RGB image [layers * 8, max experts * 8, 3] of one step's utilisation (load / ideal) per layer
    and expert, for wandb: dark = idle, bright yellow = 2x its share or more, white = exactly fair."""
    rows = len(counts)
    cols = max(c.shape[0] for c in counts)
    util = np.full((rows, cols), np.nan)
    for i, c in enumerate(counts):
        total = c.sum()
        util[i, : c.shape[0]] = c / (total / c.shape[0]) if total > 0 else 0.0
    x = np.clip(np.nan_to_num(util, nan=0.0) / 2.0, 0.0, 1.0)  # 0..2x the fair share -> 0..1
    stops = np.array([[0.05, 0.03, 0.25], [0.15, 0.55, 0.55], [1.0, 0.9, 0.1]])  # idle, fair, hot
    position = x * (len(stops) - 1)
    low = np.minimum(position.astype(int), len(stops) - 2)
    frac = (position - low)[..., None]
    image = ((stops[low] * (1 - frac) + stops[low + 1] * frac) * 255).astype(np.uint8)
    return np.kron(image, np.ones((8, 8, 1), dtype=np.uint8))
