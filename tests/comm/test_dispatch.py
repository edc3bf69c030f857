"""The dispatch stack against the stage below it.

Payload dtype and deduplication against the plain transport, on 4 real gloo ranks faking 2 nodes of
2 (flat, hierarchical, leader), and on one worker (the local transport). Deduplication is
bit-identical to the MoE layer's expert-parallel path, on 4 ranks and on one worker (outputs and
every gradient; both sum a token's terms per destination rank first, see comm/dedup.py), bf16 / fp8
payloads within their rounding. LSH with one row per bucket must equal the plain transport exactly, and hash identically on every rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from shardyard.comm.alltoall import ALGORITHMS
from shardyard.comm.dispatch_metrics import dispatch_metrics
from shardyard.comm.launch import spawn
from shardyard.comm.token_dispatch import TransportDispatcher
from shardyard.comm.topology import Topology
from shardyard.comm.wire import FP8Codec
from shardyard.models.moe.dispatcher import LocalDispatcher
from shardyard.models.moe.experts import GroupedExperts
from shardyard.models.moe.layer import MoELayer
from shardyard.models.moe.permute import gather_rows, weighted_sum
from shardyard.platform.schema import DispatchSpec, ParallelSpec
from shardyard.runtime.parallel.dims import replicated_dims
from shardyard.runtime.parallel.parallelize import keep_expert_slice_, place_experts

WIDTH, HIDDEN, EXPERTS, TOKENS, TOP_K = 16, 24, 8, 40, 3


def _routing(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, token_of, weight_of (grouped by expert, token-choice top-3), offsets."""
    g = torch.Generator().manual_seed(50 + rank)
    tokens = torch.randn(TOKENS, WIDTH, generator=g)
    scores = torch.rand(TOKENS, EXPERTS, generator=g)
    weights, experts = scores.topk(TOP_K, dim=1)
    expert_ids, token_ids = experts.reshape(-1), torch.arange(TOKENS).repeat_interleave(TOP_K)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=EXPERTS)
    return tokens, token_ids[order], weights.reshape(-1)[order], torch.cumsum(counts, 0).to(torch.int32)


def _experts() -> GroupedExperts:
    torch.manual_seed(3)
    e = GroupedExperts(EXPERTS, WIDTH, HIDDEN, "swiglu", "auto")
    with torch.no_grad():
        e.w_up.normal_(std=0.3)
        e.w_down.normal_(std=0.3)
    return e


class _Stack:
    """A dispatcher with this rank's experts: `stack(x_sorted, offsets)` is the plain stage (rows grouped
    by expert in, expert outputs out), `forward_tokens` what the MoE layer calls; the rest is the
    dispatcher's."""

    def __init__(self, dispatcher: TransportDispatcher, experts: GroupedExperts) -> None:
        self.dispatcher, self.local = dispatcher, experts

    def __call__(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.dispatcher.run_experts(x_sorted, offsets, self.local)

    def forward_tokens(self, tokens, token_of, weight_of, offsets, num_tokens: int) -> torch.Tensor:
        return self.dispatcher(tokens, token_of, weight_of, offsets, num_tokens, self.local)

    def __getattr__(self, name: str):
        return getattr(self.dispatcher, name)


def _run(module: _Stack, rank: int, fused: bool) -> dict[str, torch.Tensor]:
    """Forward + backward of the layer's dispatch -> experts -> weighted combine; outputs and grads."""
    tokens, token_of, weight_of, offsets = _routing(rank)
    tokens.requires_grad_(True)
    weight_of.requires_grad_(True)
    if fused:
        out = module.forward_tokens(tokens, token_of, weight_of, offsets, TOKENS)
    else:  # today's path, as the MoE layer runs it
        out = weighted_sum(module(gather_rows(tokens, token_of), offsets), weight_of, token_of, TOKENS)
    (out.sin() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return {
        "out": out.detach(),
        "tokens": tokens.grad,
        "weights": weight_of.grad,
        "w_up": module.local.w_up.grad,
        "w_down": module.local.w_down.grad,
    }


def _wrap(groups, algo: str, **dispatch_settings) -> _Stack:
    dispatcher = TransportDispatcher(EXPERTS, WIDTH, groups, algo, DispatchSpec(**dispatch_settings), slots=TOP_K)
    experts = _experts()
    if dispatcher.ep_size > 1:
        keep_expert_slice_(experts, dispatcher.first_expert, dispatcher.first_expert + dispatcher.experts_per_rank)
    return _Stack(dispatcher, experts)


def _check_stack(topo: Topology) -> None:
    groups = replicated_dims(topo, ep=topo.world_size).expert_groups
    for algo in ALGORITHMS:
        plain = _run(_wrap(groups, algo), topo.rank, fused=False)  # dispatch -> experts -> combine
        layer_path = _run(_wrap(groups, algo), topo.rank, fused=True)  # what the MoE layer runs under EP
        dedup_module = _wrap(groups, algo, dedup=True)
        dedup = _run(dedup_module, topo.rank, fused=True)
        for key in plain:
            assert torch.equal(dedup[key], layer_path[key]), f"{algo}: dedup {key} is not bit-identical"
            # the layer's path sums each token's terms per destination rank first: an association only
            torch.testing.assert_close(
                layer_path[key], plain[key], rtol=1e-6, atol=1e-6, msg=lambda m: f"{algo}: {key}: {m}"
            )
        metrics = dispatch_metrics(dedup_module)
        assert metrics["comm/layer0/rows_sent"] < metrics["comm/layer0/tokens_in"], metrics
        if algo == "flat":  # node dedup has its own two hops (inter-node, then intra-node): any algo
            _check_node_dedup(groups, topo.rank, layer_path, metrics)
        # Rounding to the payload's dtype must show (far above the 1e-6 an association changes, so a
        # payload silently left at fp32 fails) and stay within the dtype's precision.
        for payload, floor, rtol in (("bf16", 5e-4, 2e-2), ("fp8", 1e-2, 1.5e-1)):
            for dedup_on in (False, True):
                low = _run(_wrap(groups, algo, payload=payload, dedup=dedup_on), topo.rank, fused=dedup_on)
                scale = plain["out"].abs().max()
                err = (low["out"] - plain["out"]).abs().max() / scale
                assert floor < err < rtol, f"{algo} {payload} dedup={dedup_on}: {err}"
                for key in ("tokens", "w_up"):
                    gerr = (low[key] - plain[key]).norm() / plain[key].norm()
                    assert floor < gerr < rtol, f"{algo} {payload} dedup={dedup_on} grad {key}: {gerr}"
        # LSH with so many buckets that every row is alone: exactly the plain transport
        lone = _wrap(groups, algo, lsh={"hashes": 16, "buckets_per_hash": 64, "error_every": 0})
        alone = _run(lone, topo.rank, fused=False)
        metrics = dispatch_metrics(lone)
        assert metrics["comm/layer0/centroids_sent"] == metrics["comm/layer0/tokens_in"]
        for key in plain:
            assert torch.equal(plain[key], alone[key]), f"{algo}: lone-bucket LSH {key} differs"
    # every rank draws the same rotation and hashes the same rows alike
    hasher = _wrap(groups, "flat", lsh={"hashes": 4}).lsh
    x = torch.randn(64, WIDTH, generator=torch.Generator().manual_seed(9))
    codes = hasher.codes(x)
    gathered = [torch.empty_like(codes) for _ in range(topo.world_size)]
    dist.all_gather(gathered, codes)
    assert all(torch.equal(codes, c) for c in gathered)
    dist.barrier()


def _check_node_dedup(groups, rank: int, layer_path: dict[str, torch.Tensor], rank_dedup: dict[str, float]) -> None:
    """Node-level dedup equals the layer's path (up to the order of a token's 3-term sums) and sends each
    token across the node boundary once per remote node holding any of its experts."""
    module = _wrap(groups, "flat", dedup="node")
    assert module.dedup == "node"
    node = _run(module, rank, fused=True)
    for key in layer_path:
        # expert rows arrive in another order (relay, node, token), so weight gradients sum in another order
        torch.testing.assert_close(
            node[key], layer_path[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"node dedup {key}: {m}"
        )
    metrics = dispatch_metrics(module)
    _, token_of, _, offsets = _routing(rank)
    expert_of = torch.repeat_interleave(
        torch.arange(EXPERTS), torch.diff(offsets.long(), prepend=torch.zeros(1, dtype=torch.long))
    )
    node_of = expert_of // (EXPERTS // 2)  # 2 nodes of 2 ranks, 2 experts per rank
    remote = node_of != rank // 2
    crossing_rows = torch.unique(node_of[remote] * TOKENS + token_of[remote]).numel()
    row_bytes = 2 * 2 * (WIDTH * 4 + 3 * 4)  # out and back, forward and backward: fp32 row + 3 fp32 weights
    assert metrics["comm/bytes_internode"] == crossing_rows * row_bytes
    assert (
        metrics["comm/bytes_internode"]
        < rank_dedup["comm/bytes_internode"]
        < metrics["comm/layer0/tokens_in"] * row_bytes
    )
    low = _run(_wrap(groups, "flat", dedup="node", payload="bf16"), rank, fused=True)
    err = (low["out"] - layer_path["out"]).abs().max() / layer_path["out"].abs().max()
    assert 5e-4 < err < 2e-2, err


@pytest.mark.distributed
def test_dispatch_stack_4_ranks_2_nodes() -> None:
    spawn(_check_stack, 4, 2)


# ------------------------------------------------------------------------------ one worker (EP 1)
def test_dedup_one_worker_bit_identical_and_counted() -> None:
    plain = _run(_wrap(None, "flat"), 0, fused=False)
    module = _wrap(None, "flat", dedup=True)
    dedup = _run(module, 0, fused=True)
    for key in plain:
        assert torch.equal(plain[key], dedup[key]), key
    m = dispatch_metrics(module)
    assert m["comm/layer0/tokens_in"] == TOKENS * TOP_K
    assert m["comm/layer0/rows_sent"] == TOKENS  # one worker holds every expert: each token once
    # 4 trips (rows out, back, and their gradients) of 16 floats plus 3 weights (+ their grads) and 3 ids
    per_token = 4 * WIDTH * 4 + 4 * TOP_K * 4
    assert m["comm/layer0/bytes_sent"] == TOKENS * per_token
    assert m["comm/compression_ratio"] == pytest.approx(per_token / (TOP_K * 4 * WIDTH * 4))
    assert dispatch_metrics(module)["comm/layer0/rows_sent"] == 0  # read resets


def test_fp8_codec_rounding() -> None:
    x = torch.randn(50, 33) * torch.logspace(-3, 3, 50).unsqueeze(1)
    codec = FP8Codec()
    wire = codec.encode(x)
    assert wire.dtype == torch.uint8 and wire.shape == (50, 37)
    back = codec.decode(wire, torch.float32)
    # e4m3: 3 mantissa bits, so a relative step of 2^-4; values far below the row's max go subnormal
    amax = x.abs().amax(1, keepdim=True)
    assert ((back - x).abs() <= x.abs() * 2**-4 + amax * 2**-9 / 448 * 8).all()


def test_apply_on_one_worker_wraps_only_when_compressed() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = MoELayer(WIDTH, HIDDEN, 4, 2)
            self.b = MoELayer(WIDTH, HIDDEN, 4, 2)

    net = place_experts(Net(), None, ParallelSpec())
    assert isinstance(net.a.dispatcher, LocalDispatcher)
    torch.manual_seed(0)
    ref = Net()
    x = torch.randn(2, 20, WIDTH)
    expect = ref.b(ref.a(x))
    net = Net()
    net.load_state_dict(ref.state_dict())
    place_experts(net, None, ParallelSpec(dispatch={"payload": "bf16"}))
    assert isinstance(net.b.dispatcher, TransportDispatcher) and net.b.dispatcher.layer == 1
    out = net.b(net.a(x))
    torch.testing.assert_close(out, expect, rtol=0.05, atol=2e-3)
    m = dispatch_metrics(net)
    assert m["comm/compression_ratio"] == 0.5 and m["comm/bytes_remote"] == 0.0
    assert {"comm/layer0/bytes_sent", "comm/layer1/a2a_ms"} <= m.keys()


def test_fp8_gradients_on_one_worker() -> None:
    """grad_payload: fp8 sends the backward's rows as e4m3 with a per-row scale too: within fp8's rounding
    of the fp32 path, and the bytes are (row + scale) both ways, forward and backward."""
    plain = _run(_wrap(None, "flat"), 0, fused=False)
    results = {}
    for grad in ("auto", "fp8"):
        module = _wrap(None, "flat", payload="fp8", grad_payload=grad)
        results[grad] = _run(module, 0, fused=False)
        results[grad]["ratio"] = dispatch_metrics(module)["comm/compression_ratio"]
    fp32_bytes = 2 * 2 * WIDTH * 4  # out and back, forward and backward
    assert results["auto"]["ratio"] == (2 * (WIDTH + 4) + 2 * 2 * WIDTH) / fp32_bytes  # bf16 gradients
    assert results["fp8"]["ratio"] == 4 * (WIDTH + 4) / fp32_bytes
    for key in ("tokens", "w_up", "w_down"):
        err = (results["fp8"][key] - plain[key]).norm() / plain[key].norm()
        assert 0 < err < 0.15, (key, err)


def test_dispatch_spec_validation() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="buckets_per_hash"):
        DispatchSpec(lsh={"buckets_per_hash": 3})
    with pytest.raises(ValidationError, match="parallel.dispatch.dedup and parallel.dispatch.lsh"):
        DispatchSpec(dedup=True, lsh={})
    with pytest.raises(ValidationError, match="payload"):
        DispatchSpec(payload="int4")
    with pytest.raises(ValidationError, match="target_ratio and max_error"):
        DispatchSpec(lsh={"target_ratio": 0.2, "max_error": 0.1})
    with pytest.raises(ValidationError, match="error_every"):
        DispatchSpec(lsh={"max_error": 0.1, "error_every": 0})
    assert not DispatchSpec().compressed and DispatchSpec(payload="bf16").compressed
    assert DispatchSpec(dedup="node").compressed
    with pytest.raises(ValidationError, match="dedup"):
        DispatchSpec(dedup="nodes")


def test_lsh_max_error_steers_the_hashes_in_use() -> None:
    """Below half the bound (identical rows: no error) one hash function fewer per measured micro-batch;
    above it (scattered rows merged into few buckets) one more, never beyond `hashes`."""
    module = _wrap(None, "flat", lsh={"hashes": 8, "max_error": 0.05, "error_every": 1})
    module.train()
    offsets = torch.tensor([64] + [64] * (EXPERTS - 1), dtype=torch.int32)
    same = torch.ones(64, WIDTH).requires_grad_(True)
    for _ in range(5):
        module(same, offsets)
    assert int(module.lsh.active_hashes) == 3  # 8 -> 3
    scattered = torch.randn(64, WIDTH, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    errors = []
    for _ in range(3):
        module(scattered, offsets)
        errors.append(dispatch_metrics(module)["comm/lsh_rel_error"])
    assert min(errors) > 0.05 and int(module.lsh.active_hashes) == 6  # 3 -> 6
    for _ in range(10):
        module(scattered, offsets)
    assert int(module.lsh.active_hashes) == 8  # capped at lsh.hashes
    with torch.no_grad():  # evaluation neither measures nor steers
        module.eval()
        module(same, offsets)
    assert int(module.lsh.active_hashes) == 8


def test_lsh_one_worker_metrics_and_state() -> None:
    module = _wrap(None, "flat", lsh={"hashes": 3, "error_every": 2, "rotation_refresh": 5})
    for _ in range(3):
        _run(module, 0, fused=False)
    m = dispatch_metrics(module, steps=3)
    assert m["comm/layer0/tokens_in"] == TOKENS * TOP_K
    assert 0 < m["comm/layer0/centroids_sent"] < m["comm/layer0/tokens_in"]
    assert m["comm/layer0/compression_ratio"] == pytest.approx(m["comm/layer0/centroids_sent"] / (TOKENS * TOP_K))
    assert m["comm/lsh_rel_error"] > 0 and m["comm/layer0/lsh_hashes"] == 3
    state = module.state_dict()
    assert int(state["lsh.forwards"]) == 3 and "comm_counters" not in state  # counters are not persistent
    with torch.no_grad():  # evaluation does not advance the rotation schedule
        module.eval()
        tokens, token_of, weight_of, offsets = _routing(0)
        module(gather_rows(tokens, token_of), offsets)
    assert int(module.lsh.forwards) == 3


def test_lsh_under_activation_checkpointing_hashes_alike() -> None:
    """rotation_refresh 1 draws a new rotation every micro-batch; the recompute (shardyard's
    activation checkpointing, which flags recomputes) must reuse this one's."""
    from shardyard.models.moe.accounting import checkpointed

    tokens, token_of, weight_of, offsets = _routing(0)
    grads = []
    for use_checkpoint in (False, True):
        module = _wrap(None, "flat", lsh={"hashes": 3, "rotation_refresh": 1, "target_ratio": 0.05, "error_every": 0})
        module.lsh.forwards.fill_(5)
        module.dispatcher._pending_ratio = 1.0  # the adaptation also happens before hashing
        x = tokens.clone().requires_grad_(True)
        run = lambda t: module(gather_rows(t, token_of), offsets)  # noqa: E731
        out = checkpointed(run, x) if use_checkpoint else run(x)
        out.square().sum().backward()
        assert int(module.lsh.forwards) == 6 and int(module.lsh.active_hashes) == 2
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
