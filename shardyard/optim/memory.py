"""Memory of a spec's optimizer, computed from parameter shapes (no step needed).

`optimizer_memory_report(spec.optim, model)` gives parameter, gradient and optimizer-state bytes
for the spec's optimizer next to plain torch AdamW. The formulas are exact for this package's
optimizers (tests compare them with the tensors actually held after a step):

- AdamW: exp_avg + exp_avg_sq in the parameter dtype, plus a 4-byte `step` tensor per parameter.
- GaLore, projected W [.., m, n] (batch E = expert slices, 1 for a matrix), rank r:
  moments 2 * E * max(m, n) * r * 4 bytes, basis E * min(m, n) * r * 4 bytes.
  Dense parameters: 2 * numel * 4 bytes (the step counter is a Python int: no tensor bytes).
- Q-GaLore: moments as GaLore; basis as packed INT4, ceil(N / g) groups * (g / 2 + 4) bytes for
  N = E * min(m, n) * r elements and group size g; INT8 weights of projected parameters,
  numel + 4 * ceil(numel / g_w) bytes, reported separately as `int8_weight_bytes`. On a model
  prepared by `prepare_model_for_optimizer` they are the layers' only weight (`param_bytes` then
  leaves those parameters out); otherwise they sit in the optimizer state next to the fp32 copy.
- int8 moments (`galore.moments: int8`): a moment of N >= 256 elements costs N + 4 ceil(N / 256)
  bytes instead of 4 N.
- Gradients: one per parameter; in layer-wise mode gradients are freed as soon as each parameter
  is stepped, so the peak is about the largest single gradient (`grad_bytes`; upper bound on
  .grad storage, ignoring a few gradients whose hooks fire together).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from shardyard.optim.galore import galore_param_groups, is_projectable
from shardyard.optim.int8_weights import int8_weight_of
from shardyard.optim.quant import MOMENT_BLOCK
from shardyard.platform.schema import OptimSpec

FP32 = 4


def _adamw_state_bytes(model: nn.Module) -> int:
    return sum(2 * p.numel() * p.element_size() + FP32 for p in model.parameters() if p.requires_grad)


def _moment_bytes(numel: int, int8: bool) -> int:
    """Both Adam moments of one tensor of `numel` elements."""
    if int8 and numel >= MOMENT_BLOCK:
        return 2 * (numel + FP32 * math.ceil(numel / MOMENT_BLOCK))
    return 2 * numel * FP32


def optimizer_memory_report(spec: OptimSpec, model: nn.Module) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params if int8_weight_of(p) is None)
    adamw_state = _adamw_state_bytes(model)
    report: dict[str, Any] = {
        "kind": spec.kind,
        "num_params": sum(p.numel() for p in params),
        "param_bytes": param_bytes,
        "adamw_state_bytes": adamw_state,
    }
    if spec.kind == "adamw":
        state, int8_bytes, projected_count, projected_numel = adamw_state, 0, 0, 0
    elif spec.kind == "sgd":  # one momentum buffer per parameter, or no state
        state = sum(p.numel() * p.element_size() for p in params) if spec.momentum else 0
        int8_bytes, projected_count, projected_numel = 0, 0, 0
    else:
        g = spec.galore
        assert g is not None
        groups = galore_param_groups(model, g.targets, g.rank, spec.weight_decay, g.experts)
        projected = [p for grp in groups if grp.get("galore") for p in grp["params"] if is_projectable(p, g.rank)]
        projected_ids = {id(p) for p in projected}
        state, int8_bytes = 0, 0
        int8_moments = g.moments == "int8"
        for p in params:
            if id(p) not in projected_ids:
                state += _moment_bytes(p.numel(), int8_moments)
                continue
            m, n = p.shape[-2], p.shape[-1]
            batch = p.numel() // (m * n)
            state += _moment_bytes(batch * max(m, n) * g.rank, int8_moments)
            basis_numel = batch * min(m, n) * g.rank
            if spec.kind == "q_galore_adamw":
                assert g.quant is not None
                gs, wgs = g.quant.proj_group_size, g.quant.weight_group_size
                state += math.ceil(basis_numel / gs) * (gs // 2 + FP32)
                int8_bytes += p.numel() + FP32 * math.ceil(p.numel() / wgs)
            else:
                state += basis_numel * FP32
        projected_count = len(projected)
        projected_numel = sum(p.numel() for p in projected)
        if g.layerwise:
            grad_bytes = max(p.numel() * p.element_size() for p in params)
    report.update(
        {
            "grad_bytes": grad_bytes,
            "optimizer_state_bytes": state,
            "int8_weight_bytes": int8_bytes,
            "total_bytes": param_bytes + grad_bytes + state + int8_bytes,
            "adamw_total_bytes": 2 * grad_bytes + adamw_state,
            "state_ratio_vs_adamw": state / adamw_state if adamw_state else 0.0,
            "projected_params": projected_count,
            "projected_fraction": projected_numel / max(1, report["num_params"]),
        }
    )
    report["total_ratio_vs_adamw"] = report["total_bytes"] / report["adamw_total_bytes"]
    return report


def measured_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in an optimizer's state (after at least one step)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if hasattr(value, "element_size"):
                total += value.numel() * value.element_size()
    return total


def format_report(report: dict[str, Any]) -> str:
    mib = 1024**2
    lines = [
        f"optimizer {report['kind']}: {report['num_params']:,} parameters, "
        f"{report['projected_params']} projected ({report['projected_fraction']:.0%} of weights)",
        f"  parameters      {report['param_bytes'] / mib:9.2f} MiB",
        f"  gradients       {report['grad_bytes'] / mib:9.2f} MiB",
        f"  optimizer state {report['optimizer_state_bytes'] / mib:9.2f} MiB "
        f"({report['state_ratio_vs_adamw']:.1%} of AdamW's {report['adamw_state_bytes'] / mib:.2f} MiB)",
    ]
    if report["int8_weight_bytes"]:
        lines.append(f"  INT8 weights    {report['int8_weight_bytes'] / mib:9.2f} MiB")
    lines.append(
        f"  total           {report['total_bytes'] / mib:9.2f} MiB "
        f"({report['total_ratio_vs_adamw']:.1%} of AdamW's {report['adamw_total_bytes'] / mib:.2f} MiB)"
    )
    return "\n".join(lines)


def model_tensor_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind a model's parameters and buffers (an expanded INT8
    handle counts its one element, a tied weight once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
