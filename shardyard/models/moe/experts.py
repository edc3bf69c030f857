"""Experts stored as stacked [E, ...] weights so one grouped GEMM serves all of them.

The expert MLP (up projection, activation, down projection) over rows sorted by expert runs as one
operator (`expert_mlp`, a torch.library custom op with its own backward), one row tile at a time:

- tiles of `block_rows` rows (CPU default: about 2M elements of up-projection output per tile; 0 =
  one tile, i.e. one grouped GEMM per projection, the GPU default). The whole MLP runs on a tile
  before the next starts, so its intermediates are still in cache when the activation and the second
  product read them; a tile holds the rows of every expert it meets (the backend's grouped primitives
  take the tile's own expert offsets), and weight gradients are accumulated per tile.
- tiles depend on the row count only, so torch.compile sees static shapes and compiles the MoE
  layer without a graph break; the data-dependent expert offsets stay inside the operator.
- `loop` is the reference: autograd through a per-expert loop of matmuls.
"""

from __future__ import annotations

import bisect
import math

import torch
import torch.nn.functional as F
from torch import nn

from shardyard.kernels.grouped_gemm import check_backend_device, get_ops, loop_grouped_mm, resolve_backend
from shardyard.models.transformer import dense_mlp

# ---------------------------------------------------------------- activations


def _swiglu_fwd(h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    half = h.shape[1] // 2
    rows = max(8, 2**17 // max(half, 1))
    out = h.new_empty(h.shape[0], half) if out is None else out
    for s in range(0, h.shape[0], rows):
        torch.mul(F.silu(h[s : s + rows, :half]), h[s : s + rows, half:], out=out[s : s + rows])
    return out


def _swiglu_bwd(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    half = h.shape[1] // 2
    rows = max(8, 2**17 // max(half, 1))
    grad_h = torch.empty_like(h)
    for s in range(0, h.shape[0], rows):
        gate, up, g = h[s : s + rows, :half], h[s : s + rows, half:], grad[s : s + rows]
        torch.mul(g, F.silu(gate), out=grad_h[s : s + rows, half:])
        torch.ops.aten.silu_backward.grad_input(g * up, gate, grad_input=grad_h[s : s + rows, :half])
    return grad_h


def _gelu_bwd(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(grad, h)


def _gelu_fwd(h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return F.gelu(h) if out is None else torch.ops.aten.gelu.out(h, out=out)


ACTIVATIONS = {"swiglu": (_swiglu_fwd, _swiglu_bwd), "gelu": (_gelu_fwd, _gelu_bwd)}


class _SwiGLU(torch.autograd.Function):
    """silu(h[:, :H]) * h[:, H:] computed in row chunks that stay in cache, forward and backward.

    Saves only h; the backward writes both halves of dh straight into one [A, 2H] tensor, so the
    grouped GEMM backward gets a contiguous gradient without the concatenation autograd would do.
    On CPU this halves the time of the activation (fwd+bwd) against the unfused chunk/silu/mul.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        return _swiglu_fwd(h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        return _swiglu_bwd(grad.contiguous(), h)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] along the last dim (2-D input)."""
    return _SwiGLU.apply(h)


# ---------------------------------------------------------------- blocked expert MLP


def row_tiles(rows: int, block_rows: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of block_rows rows (the last shorter) covering `rows`; block_rows 0 (or
    more than rows) = one tile. Depends on the row count only, so a compiler knows the tiles' shapes."""
    if block_rows <= 0 or block_rows >= rows:
        return [(0, rows)]
    return [(r, min(r + block_rows, rows)) for r in range(0, rows, block_rows)]


def expert_blocks(offsets: torch.Tensor, block_rows: int) -> list[tuple[int, int, int, int]]:
    """(first expert, end expert, first row, end row) of each row tile: the experts whose rows meet it."""
    ends = offsets.tolist()
    rows = ends[-1] if ends else 0
    blocks = []
    for r_lo, r_hi in row_tiles(rows, block_rows):
        e_lo = bisect.bisect_right(ends, r_lo)  # the first expert ending after r_lo
        e_hi = min(bisect.bisect_left(ends, r_hi) + 1, len(ends))  # past the expert holding row r_hi - 1
        blocks.append((e_lo, e_hi, r_lo, r_hi))
    return blocks


def _block_offsets(offsets: torch.Tensor, e_lo: int, e_hi: int, r_lo: int, r_hi: int) -> torch.Tensor:
    return (offsets[e_lo:e_hi] - r_lo).clamp(0, r_hi - r_lo)


@torch.library.custom_op("shardyard::expert_mlp", mutates_args=())
def _expert_mlp(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    offsets: torch.Tensor,
    backend: str,
    kind: str,
    block_rows: int,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(y, h tiles, a tiles): the expert MLP over rows grouped by expert, one row tile at a time (see
    row_tiles; a tile's up projection h and activation a are still in cache for the next product),
    keeping each tile's h and a for backward. Tiles are separate tensors of a few MiB: one
    allocation of every row's h would be a fresh mapping of tens of MiB per call, paid in page
    faults. An opaque operator: torch.compile sees static shapes (the tiles depend on the row count
    only) and never the data-dependent expert offsets (no graph break)."""
    ops = get_ops(backend)
    act_fwd, _ = ACTIVATIONS[kind]
    y = x.new_empty(x.shape[0], w_down.shape[2])
    hs, acts = [], []
    for e_lo, e_hi, r_lo, r_hi in _blocks(offsets, block_rows, x.shape[0]):
        local = _block_offsets(offsets, e_lo, e_hi, r_lo, r_hi)
        h = ops.mm(x[r_lo:r_hi], w_up[e_lo:e_hi], local)
        a = act_fwd(h)
        ops.mm_into(a, w_down[e_lo:e_hi], local, y[r_lo:r_hi])
        hs.append(h)
        acts.append(a)
    return y, hs, acts


def _blocks(offsets: torch.Tensor, block_rows: int, rows: int) -> list[tuple[int, int, int, int]]:
    if rows == 0:
        return []
    return expert_blocks(offsets, block_rows)


@_expert_mlp.register_fake
def _(x, w_up, w_down, offsets, backend, kind, block_rows):  # noqa: ANN001, ANN202
    tiles = row_tiles(x.shape[0], block_rows) if x.shape[0] else []
    return (
        x.new_empty(x.shape[0], w_down.shape[2]),
        [x.new_empty(r_hi - r_lo, w_up.shape[2]) for r_lo, r_hi in tiles],
        [x.new_empty(r_hi - r_lo, w_down.shape[1]) for r_lo, r_hi in tiles],
    )


@torch.library.custom_op("shardyard::expert_mlp_backward", mutates_args=())
def _expert_mlp_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    offsets: torch.Tensor,
    hs: list[torch.Tensor],
    acts: list[torch.Tensor],
    backend: str,
    kind: str,
    block_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw_up, dw_down) of _expert_mlp, tile by tile (weight gradients accumulated per tile)."""
    ops, (_, act_bwd) = get_ops(backend), ACTIVATIONS[kind]
    grad_y = grad_y.contiguous()
    grad_x = torch.empty_like(x)  # every row is written (the tiles cover them)
    grad_up = torch.zeros_like(w_up)
    grad_down = torch.zeros_like(w_down)
    for (e_lo, e_hi, r_lo, r_hi), h, a in zip(_blocks(offsets, block_rows, x.shape[0]), hs, acts):
        local = _block_offsets(offsets, e_lo, e_hi, r_lo, r_hi)
        g = grad_y[r_lo:r_hi]
        grad_down[e_lo:e_hi] += ops.wgrad(a, g, local, e_hi - e_lo)
        grad_h = act_bwd(ops.mm(g, w_down[e_lo:e_hi].transpose(1, 2), local), h)
        grad_up[e_lo:e_hi] += ops.wgrad(x[r_lo:r_hi], grad_h, local, e_hi - e_lo)
        ops.mm_into(grad_h, w_up[e_lo:e_hi].transpose(1, 2), local, grad_x[r_lo:r_hi])
    return grad_x, grad_up, grad_down


@_expert_mlp_backward.register_fake
def _(grad_y, x, w_up, w_down, offsets, hs, acts, backend, kind, block_rows):  # noqa: ANN001, ANN202
    return torch.empty_like(x), torch.empty_like(w_up), torch.empty_like(w_down)


def _expert_mlp_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, w_up, w_down, offsets, backend, kind, block_rows = inputs
    _, hs, acts = output
    ctx.mark_non_differentiable(*hs, *acts)  # saved for backward, never differentiated: no zero gradients
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w_up, w_down, offsets, *hs, *acts)
    ctx.config = (backend, kind, block_rows)
    ctx.tiles = len(hs)


def _expert_mlp_grad(ctx, grad_y, grad_hs, grad_acts):  # noqa: ANN001, ANN202
    x, w_up, w_down, offsets, *saved = ctx.saved_tensors
    hs, acts = saved[: ctx.tiles], saved[ctx.tiles :]
    grad_x, grad_up, grad_down = _expert_mlp_backward(grad_y, x, w_up, w_down, offsets, hs, acts, *ctx.config)
    return grad_x, grad_up, grad_down, None, None, None, None


_expert_mlp.register_autograd(_expert_mlp_grad, setup_context=_expert_mlp_setup)


def expert_mlp(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    offsets: torch.Tensor,
    backend: str,
    kind: str,
    block_rows: int,
) -> torch.Tensor:
    """The expert MLP over rows grouped by expert (offsets: [E] int32 cumulative row ends) with a
    grouped-GEMM backend's primitives: blocks of about `block_rows` rows (0: one block, i.e. one
    grouped GEMM per projection)."""
    return _expert_mlp(x, w_up, w_down, offsets, backend, kind, block_rows)[0]


# ---------------------------------------------------------------- modules


class GroupedExperts(nn.Module):
    """E feed-forward experts (SwiGLU or GELU MLP) over tokens already sorted by expert.

    `block_rows`: rows per block of the blocked path; None = automatic (blocked on CPU with about
    2M elements of up-projection output per block, grouped elsewhere); 0 = always grouped.
    """

    def __init__(
        self,
        num_experts: int,
        width: int,
        hidden: int,
        kind: str = "swiglu",
        backend: str = "auto",
        block_rows: int | None = None,
    ) -> None:
        super().__init__()
        if kind not in ACTIVATIONS:
            raise ValueError(f"unknown expert kind {kind!r}; available: {', '.join(ACTIVATIONS)}")
        self.kind = kind
        self.backend = backend
        self.num_experts = num_experts
        self.block_rows = block_rows
        up_width = 2 * hidden if kind == "swiglu" else hidden
        self.w_up = nn.Parameter(torch.empty(num_experts, width, up_width))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, width))
        nn.init.normal_(self.w_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02 / math.sqrt(2))

    def rows_per_block(self, x: torch.Tensor, backend: str) -> int:
        """block_rows resolved for x's device and the backend (0: one block)."""
        if backend == "loop" or self.block_rows == 0:
            return 0
        if self.block_rows is not None:
            return self.block_rows
        return max(64, 2**21 // self.w_up.shape[2]) if x.device.type == "cpu" else 0

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x_sorted: [M, width] grouped by expert; offsets: [E] int32 cumulative row ends."""
        return run_experts(self, x_sorted, offsets, self.w_up, self.w_down)


def run_experts(
    experts: GroupedExperts, x_sorted: torch.Tensor, offsets: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """GroupedExperts' arithmetic on the given weight stacks: the `loop` reference (autograd through a
    per-expert loop), else the expert_mlp operator with the backend's primitives."""
    backend = resolve_backend(experts.backend, x_sorted)
    if backend == "loop":
        h = loop_grouped_mm(x_sorted, w_up, offsets)
        h = swiglu(h) if experts.kind == "swiglu" else F.gelu(h)
        return loop_grouped_mm(h, w_down, offsets)
    check_backend_device(backend, x_sorted)
    block_rows = experts.rows_per_block(x_sorted, backend)
    return expert_mlp(x_sorted, w_up, w_down, offsets.to(torch.int32), backend, experts.kind, block_rows)


def SharedExpert(width: int, hidden: int, kind: str = "swiglu") -> nn.Module:
    """The always-on expert every token also passes through (DeepSeekMoE's shared expert): a dense MLP."""
    return dense_mlp(kind, width, hidden)


EXPERT_SHARD_ATTR = "_shardyard_expert_parallel"  # set on the parameters of one rank's expert shard


def is_expert_shard(p: torch.Tensor) -> bool:
    """True for a parameter holding one expert-parallel rank's slice of an expert stack."""
    return getattr(p, EXPERT_SHARD_ATTR, False)
