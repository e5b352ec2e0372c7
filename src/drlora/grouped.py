"""Routed rows grouped by expert: the sort, the moves between token order and expert order, the grouped matmuls.

An MoE layer sends each of its T tokens to k experts. Sorting the T·k (token, expert) pairs by expert gives N = T·k
"routed rows" in expert order, and every expert's matmul becomes one slice of a grouped matmul
(`torch.nn.functional.grouped_mm`). The base experts and every LoRA of the layer share one `RoutedRows`.

Why the moves have their own autograd functions: indexing `hidden[rows]` differentiates into `index_put_` with
accumulation — a serial scatter on the CPU and atomics on a GPU (bench/layer_parts.py: dispatch + combine take
~16 ms that way at T=512, k=8, H=512, and ~4 ms here). Here the routing is a permutation of the k copies of each
token, so the adjoint of every move is again a gather: the gradient of dispatch is combine and the gradient of
combine is dispatch. The values are the same as transformers' own grouped_mm experts path, op for op, so an adapter
with B = 0 reproduces the base model bit for bit — except on the CPU in float32 with few rows per expert, where the
grouped matmuls run as one MKL batched GEMM (mkl_batch.py: torch's kernel pays one `mm` dispatch per expert), whose
blocking can round differently from torch's per-expert GEMMs (logits within ~1e-6 in bench/step_time.py's models).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import mkl_batch

logger = logging.getLogger(__name__)
_warned_fallback = False


@dataclass
class RoutedRows:
    """The T·k routed rows of one MoE forward, sorted by expert."""

    expert_ids: torch.Tensor  # [N] expert of each row, ascending
    offsets: torch.Tensor  # [E] int32 cumulative row counts: expert e owns rows offsets[e-1]:offsets[e]
    token_of_row: torch.Tensor  # [N] token each row came from
    row_of_slot: torch.Tensor  # [T·k] row holding each (token, choice) slot: the inverse of the sort
    slot_of_row: torch.Tensor  # [N] (token, choice) slot of each row: the sort's permutation
    num_top_k: int
    _bounds: list[int] | None = field(default=None, repr=False)
    _ranges: mkl_batch.RowRanges | None = field(default=None, repr=False)

    @property
    def bounds(self) -> list[int]:
        """Row ends per expert as Python ints — for the per-expert fallback loop only (one host sync per layer)."""
        if self._bounds is None:
            self._bounds = self.offsets.tolist()
        return self._bounds

    @property
    def ranges(self) -> mkl_batch.RowRanges:
        """Row ranges per expert for MKL's batched GEMM, computed once for all the layer's products."""
        if self._ranges is None:
            self._ranges = mkl_batch.row_ranges(self.offsets)
        return self._ranges


def route(top_k_index: torch.Tensor, num_experts: int) -> RoutedRows:
    """Sort the (token, choice) slots of `top_k_index` [T, k] by expert."""
    num_top_k = top_k_index.size(-1)
    expert_ids, slot_of_row = torch.sort(top_k_index.reshape(-1))
    # histc as transformers counts (float on CPU/MPS where integer histc is missing), so offsets match its path
    counts_input = expert_ids.float() if expert_ids.device.type in ("cpu", "mps") else expert_ids.int()
    counts = torch.histc(counts_input, bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    row_of_slot = torch.empty_like(slot_of_row)
    row_of_slot[slot_of_row] = torch.arange(slot_of_row.numel(), device=slot_of_row.device)
    return RoutedRows(expert_ids, offsets, slot_of_row // num_top_k, row_of_slot, slot_of_row, num_top_k)


def _sum_choices(rows_in_slot_order: torch.Tensor, num_top_k: int) -> torch.Tensor:
    return rows_in_slot_order.view(-1, num_top_k, rows_in_slot_order.shape[-1]).sum(dim=1)


class _Dispatch(torch.autograd.Function):
    """hidden [T, H] -> routed rows [N, H] (each token copied to its k rows); adjoint: sum a token's k rows."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, routed: RoutedRows) -> torch.Tensor:
        ctx.routed = routed
        return hidden.index_select(0, routed.token_of_row)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        routed = ctx.routed
        return _sum_choices(grad_rows.index_select(0, routed.row_of_slot), routed.num_top_k), None


class _Combine(torch.autograd.Function):
    """routed rows [N, H] -> tokens [T, H] (sum of each token's k rows); adjoint: copy a token to its k rows."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, routed: RoutedRows) -> torch.Tensor:
        ctx.routed = routed
        return _sum_choices(rows.index_select(0, routed.row_of_slot), routed.num_top_k)

    @staticmethod
    def backward(ctx, grad_tokens: torch.Tensor):
        return grad_tokens.index_select(0, ctx.routed.token_of_row), None


def dispatch(hidden: torch.Tensor, routed: RoutedRows) -> torch.Tensor:
    return _Dispatch.apply(hidden, routed)


def combine(rows: torch.Tensor, routed: RoutedRows) -> torch.Tensor:
    return _Combine.apply(rows, routed)


def sort_weights(top_k_weights: torch.Tensor, routed: RoutedRows) -> torch.Tensor:
    """The routing weight of each routed row [N] (differentiable: the router learns through it)."""
    return top_k_weights.reshape(-1).index_select(0, routed.slot_of_row)


# ---- grouped matmuls ------------------------------------------------------------------------------------------------
# Whether torch's grouped_mm kernel takes a pair of operands is one rule on both devices — the device's support and
# the operands' layouts — so the shapes the CPU tests pass through the kernel are the shapes a GPU runs through it.
# The layout rule is torch's own check (aten/src/ATen/native/GroupedMMUtils.h, check_valid_strides_and_return_
# transposed, run by `_grouped_mm_validate_inputs` on every device) plus what the CUDA kernel needs without checking
# it on the host (aten/src/ATen/native/cuda/GroupMM.cu, GroupMMCommon.cuh: every expert's matrix is a TMA copy whose
# address must be 16-byte aligned). A product the rule refuses runs as the per-expert loop, never as an error.
def kernel_accepts_layout(t: torch.Tensor) -> bool:
    """Whether t's memory layout suits torch's grouped_mm kernels as a 2-D or 3-D operand.

    torch requires: one of the last two dimensions has unit stride and the other a stride at least the unit
    dimension's size (tested in that order: column-major first, as torch does) and a multiple of 16 bytes; a 16-byte
    aligned data pointer (CUDA always; the CPU kernel too up to torch 2.10). The CUDA kernel also needs each
    expert's matrix at a 16-byte aligned address, so a 3-D operand's batch stride must be a multiple of 16 bytes.
    """
    if t.layout != torch.strided or t.dim() not in (2, 3) or t.data_ptr() % 16 != 0:
        return False
    size = t.element_size()
    (rows, cols), (stride_rows, stride_cols) = t.shape[-2:], t.stride()[-2:]
    if stride_rows == 1 and stride_cols >= max(1, rows):
        leading = stride_cols
    elif stride_cols == 1 and stride_rows >= max(1, cols):
        leading = stride_rows
    else:
        return False
    experts_aligned = t.dim() == 2 or t.shape[0] == 1 or t.stride(0) * size % 16 == 0  # one expert: stride unused
    return leading * size % 16 == 0 and experts_aligned


def _ragged_dimension_not_unit(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the dimension `offs` splits is not a unit-stride one, in a 2-D x 3-D product (a's rows) or a 2-D x 2-D
    one (a's columns, b's rows).

    The CUDA kernel starts an expert's slice at offs[e - 1] along that dimension: with a unit stride there the
    address is 16-byte aligned only when every group size is a multiple of 16 bytes, which GroupMMCommon.cuh asserts
    on the device (a context-killing error, not an exception); the 2-D x 2-D kernel also refuses empty groups unless
    a is column-major and b row-major. The CPU kernel does not need it; the rule is one for both devices.
    """
    if a.dim() == 2 and b.dim() == 3:
        return a.stride(-1) == 1
    if a.dim() == 2 and b.dim() == 2:
        return a.stride(-1) != 1 and b.stride(-1) == 1
    return True


def device_runs_grouped_mm(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch's grouped_mm kernel runs operands of this dtype on this device.

    CUDA: bf16 on SM >= 8.0, as torch documents it. Its CUTLASS kernel runs bf16 on SM 9.x/10.x only; torch >= 2.10
    also takes float32/float16 on CUDA, but runs them (and bf16 on SM 8.x) as its own per-group mm loop with a host
    sync — the same work as the per-expert loop here. CPU: float32, bf16, float16 (torch's per-group loop).
    """
    if not hasattr(F, "grouped_mm") or a.device != b.device or a.dtype != b.dtype:
        return False
    if a.device.type == "cuda":
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (8, 0)
    return a.device.type == "cpu" and a.dtype in (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `F.grouped_mm(a, b, offs=...)` runs: the device's support and both operands' layouts (see above)."""
    return (device_runs_grouped_mm(a, b) and kernel_accepts_layout(a) and kernel_accepts_layout(b)
            and _ragged_dimension_not_unit(a, b))


def _expert_rows(routed: RoutedRows):
    """(expert, row slice) of every expert that received rows — the fallback loops' iteration."""
    start = 0
    for expert, end in enumerate(routed.bounds):
        if end > start:
            yield expert, slice(start, end)
        start = end


def _warn_fallback(a: torch.Tensor, b: torch.Tensor) -> None:
    global _warned_fallback
    if not _warned_fallback:
        logger.warning("torch.nn.functional.grouped_mm is unavailable for these shapes/device (%s %s, %s x %s, "
                       "strides %s x %s); using a per-expert loop, which is slower at large expert counts.",
                       a.device.type, a.dtype, tuple(a.shape), tuple(b.shape), a.stride(), b.stride())
        _warned_fallback = True


class _BatchedGroupedMm(torch.autograd.Function):
    """`mkl_batch.rows_times_weights` with its gradients (the base projections run through it under autograd)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, ranges: mkl_batch.RowRanges) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)
        ctx.ranges = ranges
        return mkl_batch.rows_times_weights(x, w, ranges)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        needs_x, needs_w = ctx.needs_input_grad[:2]
        grad_x = mkl_batch.rows_times_weights(grad_out, w.transpose(1, 2), ctx.ranges) if needs_x else None
        grad_w = mkl_batch.outer_sums(x, grad_out, ctx.ranges) if needs_w else None
        return grad_x, grad_w, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, routed: RoutedRows) -> torch.Tensor:
    """Rows of `x` [N, K] times their expert's `w` [E, K, M] -> [N, M]."""
    x = x.to(w.dtype)
    if mkl_batch.suits(x, w, x.shape[0], w.shape[0]):
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return _BatchedGroupedMm.apply(x, w, routed.ranges)
        return mkl_batch.rows_times_weights(x, w, routed.ranges)
    if grouped_mm_usable(x, w):
        return F.grouped_mm(x, w, offs=routed.offsets)
    _warn_fallback(x, w)
    pieces = [x[rows] @ w[expert] for expert, rows in _expert_rows(routed)]  # differentiable: base projections
    covered = routed.bounds[-1] if routed.bounds else 0
    pieces.append(x.new_zeros(x.shape[0] - covered, w.shape[2]))  # rows past the last expert's (none when routed)
    return torch.cat(pieces)


def grouped_outer(a: torch.Tensor, b: torch.Tensor, routed: RoutedRows) -> torch.Tensor:
    """Per expert, the sum over its rows of outer products: a [N, P], b [N, Q] -> [E, P, Q] (a weight gradient)."""
    differentiable = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if not differentiable and mkl_batch.suits(a, b, a.shape[0], routed.offsets.numel()):
        return mkl_batch.outer_sums(a, b, routed.ranges)
    a_t = a.t()
    if grouped_mm_usable(a_t, b):
        return F.grouped_mm(a_t, b, offs=routed.offsets)
    _warn_fallback(a_t, b)
    out = a.new_zeros(routed.offsets.numel(), a.shape[1], b.shape[1])
    for expert, rows in _expert_rows(routed):
        out[expert] = a_t[:, rows] @ b[rows]
    return out


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, routed: RoutedRows, bias: torch.Tensor | None,
                   is_transposed: bool) -> torch.Tensor:
    """A base expert projection on the routed rows: weight [E, out, in] (or [E, in, out] when transposed)."""
    out = grouped_mm(x, weight if is_transposed else weight.transpose(-2, -1), routed)
    if bias is not None:
        out.add_(bias.index_select(0, routed.expert_ids))
    return out
