"""Metrics of the expert dispatch stack (dedup -> LSH centroids -> payload dtype -> transport).

Every `TransportDispatcher` (comm/token_dispatch.py) keeps its counters in the non-persistent float64 buffer
`comm_counters` (slots named by `COUNTERS`), added to by every forward (several micro-batches may run
per optimizer step). `dispatch_metrics(model)` reads and resets them all; the trainer calls it at
log steps. Byte counts are this rank's view: the rows its tokens send out, the rows that come back
to it, and (when a backward runs) both trips' gradients; rows a rank sends to itself are in
`bytes_sent` but not in `bytes_remote`. Summed over ranks `bytes_remote` is the traffic between ranks,
and `bytes_internode` the part of it between nodes (a node dedup's relay hop inside a node is remote,
not inter-node).
The baseline is today's dispatch: every (token, expert) copy, in the input dtype, both ways.
"""

from __future__ import annotations

import torch
from torch import nn

COUNTERS: dict[str, int] = {
    name: i
    for i, name in enumerate(
        [
            "microbatches",  # forward calls
            "tokens_in",  # (token, expert) rows that entered the stack
            "rows_sent",  # rows handed to the transport (unique rows / centroids), dispatch direction
            "centroids_sent",  # LSH centroids (0 without LSH)
            "bytes_sent",  # payload bytes of all trips, own rank included
            "bytes_remote",  # the same without the rows a rank sends to itself
            "baseline_bytes",  # what today's fp32, one-copy-per-expert dispatch would have moved
            "baseline_remote",
            "bytes_internode",  # the part of bytes_remote between ranks of different nodes
            "baseline_internode",
            "a2a_ms",  # host wall time in planning and transport (forward and backward)
            "expert_rows",  # rows this rank's experts computed
            "err_sq",  # LSH: squared error of expert outputs against the exact dispatch (sampled micro-batches)
            "ref_sq",  # LSH: squared norm of the exact outputs
            "spread_sq",  # LSH: squared norm of the exact outputs minus their expert's mean (their variation)
            "err_samples",
        ]
    )
}


def spread_error(err_sq: float, spread_sq: float, ref_sq: float) -> float:
    """||out - exact|| / ||exact - its expert's mean||; a spread below 1e-3 of the outputs' norm counts as
    1e-3 of it (identical rows: the error is rounding)."""
    return (err_sq / max(spread_sq, 1e-6 * ref_sq, 1e-300)) ** 0.5


def dispatch_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that carry dispatch counters (the transport dispatchers), in order."""
    return [m for m in model.modules() if isinstance(getattr(m, "comm_counters", None), torch.Tensor)]


def dispatch_metrics(model: nn.Module, steps: int = 1) -> dict[str, float]:
    """`comm/...` metrics since the last call, divided by `steps` (additive ones), then reset.

    Per layer i: tokens_in, rows_sent, centroids_sent (LSH), bytes_sent, bytes_remote, bytes_internode, a2a_ms,
    compression_ratio (bytes_sent / baseline), lsh_hashes (hash functions in use). Over all layers:
    comm/bytes_sent, comm/bytes_remote, comm/bytes_internode, comm/a2a_ms, comm/compression_ratio,
    comm/remote_compression_ratio, comm/internode_compression_ratio
    and, when an LSH error sample was taken, comm/lsh_rel_error (||out - exact|| / ||exact||).
    Local to this rank (no collective). Empty when the model has no dispatch wrappers.
    """
    out: dict[str, float] = {}
    totals = torch.zeros(len(COUNTERS), dtype=torch.float64)
    div = float(max(steps, 1))
    for layer in dispatch_layers(model):
        c = layer.comm_counters.detach().cpu().clone()
        layer.comm_counters.zero_()
        totals += c
        i = getattr(layer, "layer", 0)
        get = lambda name: float(c[COUNTERS[name]])  # noqa: E731
        for name in ("tokens_in", "rows_sent", "bytes_sent", "bytes_remote", "bytes_internode", "a2a_ms"):
            out[f"comm/layer{i}/{name}"] = get(name) / div
        if get("baseline_bytes"):
            out[f"comm/layer{i}/compression_ratio"] = get("bytes_sent") / get("baseline_bytes")
        lsh = getattr(layer, "lsh", None)
        if lsh is not None:
            out[f"comm/layer{i}/centroids_sent"] = get("centroids_sent") / div
            out[f"comm/layer{i}/lsh_hashes"] = float(lsh.active_hashes)
            if get("err_samples"):
                out[f"comm/layer{i}/lsh_rel_error"] = (get("err_sq") / max(get("ref_sq"), 1e-300)) ** 0.5
                out[f"comm/layer{i}/lsh_spread_error"] = spread_error(get("err_sq"), get("spread_sq"), get("ref_sq"))
    if not out:
        return out
    t = {name: float(totals[i]) for name, i in COUNTERS.items()}
    out["comm/bytes_sent"] = t["bytes_sent"] / div
    out["comm/bytes_remote"] = t["bytes_remote"] / div
    out["comm/bytes_internode"] = t["bytes_internode"] / div
    out["comm/a2a_ms"] = t["a2a_ms"] / div
    if t["baseline_bytes"]:
        out["comm/compression_ratio"] = t["bytes_sent"] / t["baseline_bytes"]
    if t["baseline_remote"]:
        out["comm/remote_compression_ratio"] = t["bytes_remote"] / t["baseline_remote"]
    if t["baseline_internode"]:
        out["comm/internode_compression_ratio"] = t["bytes_internode"] / t["baseline_internode"]
    if t["err_samples"]:
        out["comm/lsh_rel_error"] = (t["err_sq"] / max(t["ref_sq"], 1e-300)) ** 0.5
        out["comm/lsh_spread_error"] = spread_error(t["err_sq"], t["spread_sq"], t["ref_sq"])
    return out
