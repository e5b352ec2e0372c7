"""Grouped matmuls on the CPU as one MKL batched GEMM (`cblas_sgemm_batch`) instead of one `mm` per expert.

Why: torch's CPU `grouped_mm` loops over the experts and dispatches one `mm` each, so at fixed tokens a layer with
many experts pays that dispatch, and a small-matrix GEMM, per expert and per product (bench/expert_scaling.py:
every grouped product grows ~2x from 16 to 128 experts at the same FLOPs). MKL — which torch's x86 wheels link and
export — has a batched GEMM that takes every expert's matrices in one call. With few rows per expert it is faster
(0.6-0.9x of torch's time per product at 32-64 rows per expert on the AMD EPYC machine of 2026-12-02); with many
it is slower than torch's threaded large GEMMs, so it is only used up to `MAX_MEAN_ROWS` rows per expert.
Each expert's product is the same GEMM either way, but MKL may block it differently inside the batch, so results
agree with torch's to float rounding, not always to the bit.

Used only for float32 CPU tensors when the symbol is present (Linux x86 wheels); anything else — another BLAS, a
GPU, bf16, `DRLORA_MKL_BATCH=0` in the environment — goes to torch's kernels. Every pointer handed to MKL is derived
from tensors this module checked (strided CPU float32, a unit stride, bounds of the offsets), and they stay alive for
the call. Everything it allocates is placed on the CPU by name: `torch.set_default_device("cuda")` (or "meta") would
otherwise hand MKL a pointer it cannot read, and a native crash is not an error message.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)
# Mean rows per expert up to which the batched call is used. Per product against torch's loop on the AMD machine:
# 0.6-0.9x at 32 and 64 rows, 0.8-1.1x at 128 (the large base products gain most), 0.9-1.4x at 256 and 512.
MAX_MEAN_ROWS = 128
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS_LAYOUT and CBLAS_TRANSPOSE
enabled = os.environ.get("DRLORA_MKL_BATCH", "1") != "0"


@functools.cache
def _sgemm_batch():
    """MKL's `cblas_sgemm_batch` from torch's own CPU library, or None where torch was built without MKL."""
    if not sys.platform.startswith("linux"):
        return None
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        function = ctypes.CDLL(path).cblas_sgemm_batch
    except (OSError, AttributeError):
        return None
    function.restype = None
    function.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 13 + [ctypes.c_int, ctypes.c_void_p]
    return function


def _self_check() -> bool:
    """Whether the symbol computes what torch computes, on a two-expert product built on the CPU by name (whatever
    the default device is)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(5, 3, generator=generator, device="cpu")
    w = torch.randn(2, 3, 4, generator=generator, device="cpu")
    out = rows_times_weights(x, w, row_ranges(torch.tensor([2, 5], dtype=torch.int32, device="cpu")))
    return torch.allclose(out, torch.cat([x[:2] @ w[0], x[2:] @ w[1]]), rtol=1e-5, atol=1e-6)


@functools.cache
def _verified() -> bool:
    """Whether the symbol computes what torch computes (a guard against ABI surprises), checked once per process.

    Runs with CPU autocast off (its products are CPU products): under `torch.autocast("cpu", dtype=bfloat16)` the
    reference product would come out in bf16 and the comparison would raise. A failure of any kind — wrong values
    or an exception — is cached as "not available" with one warning: an error here would otherwise be raised again by
    every forward of the process.
    """
    if _sgemm_batch() is None:
        return False
    try:
        with torch.autocast("cpu", enabled=False):
            correct = _self_check()
    except Exception as error:  # any failure means: use torch's kernels, and say so once
        logger.warning("MKL's cblas_sgemm_batch self-check failed (%s: %s); drlora uses torch's grouped_mm instead.",
                       type(error).__name__, error)
        return False
    if not correct:
        logger.warning("MKL's cblas_sgemm_batch in this torch build gave wrong results on a test product; drlora "
                       "uses torch's grouped_mm instead.")
    return correct


def available() -> bool:
    """Whether the batched GEMM is on (DRLORA_MKL_BATCH / `enabled`) and this torch build has a working one."""
    return enabled and _verified()


def describe(dtype: torch.dtype) -> str:
    """One line for a run's log: which kernel the experts' grouped matmuls use on the CPU in `dtype`."""
    if dtype != torch.float32:
        return f"CPU grouped matmuls: torch's grouped_mm ({str(dtype).removeprefix('torch.')})"
    if not enabled:
        return "CPU grouped matmuls: torch's grouped_mm (DRLORA_MKL_BATCH=0)"
    if not available():
        return "CPU grouped matmuls: torch's grouped_mm (this torch has no working MKL batched GEMM)"
    return (f"CPU grouped matmuls: MKL's batched GEMM where experts get at most {MAX_MEAN_ROWS} rows on average, "
            "torch's grouped_mm otherwise (DRLORA_MKL_BATCH=0 turns the batched GEMM off)")


def suits(a: torch.Tensor, b: torch.Tensor, rows: int, experts: int) -> bool:
    """Whether the batched call should run a grouped product of these operands over `rows` routed rows."""
    return (a.dtype == b.dtype == torch.float32 and a.device.type == b.device.type == "cpu"
            and rows <= MAX_MEAN_ROWS * experts and available())


def _require_cpu_float32(*tensors: torch.Tensor) -> None:
    """Refuse, before any pointer is taken, a tensor MKL cannot read as float32 host memory."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or t.layout != torch.strided:
            raise ValueError(f"mkl_batch: MKL's batched GEMM takes strided float32 CPU tensors, not {t.dtype} "
                             f"({t.layout}) on {t.device}; use torch.nn.functional.grouped_mm for those "
                             "(mkl_batch.suits says which to use).")


def _address(t: torch.Tensor) -> int:
    """t's data pointer, for a tensor checked to be CPU float32 (also the outputs, against a default device)."""
    _require_cpu_float32(t)
    return t.data_ptr()


def _layout(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(t, CBLAS_TRANSPOSE, leading dimension) for the matrices in t's last two dimensions, as stored row-major.

    A layout MKL cannot read (no unit stride, or rows that overlap, as in an expanded tensor) is copied contiguous.
    """
    rows, cols = t.shape[-2:]
    stride_rows, stride_cols = t.stride()[-2:]
    if stride_cols == 1 and stride_rows >= max(cols, 1):
        return t, _NO_TRANS, stride_rows
    if stride_rows == 1 and stride_cols >= max(rows, 1):
        return t, _TRANS, stride_cols
    t = t.contiguous()
    return t, _NO_TRANS, max(cols, 1)


@dataclass(frozen=True)
class RowRanges:
    """The experts that received rows, their first row and row count — what every batched call of a layer needs.

    numpy arrays, because the per-call argument arrays are built from them, and a dozen tiny torch ops per call cost
    more than MKL's own work at small sizes (~150 µs against ~60 µs for a tiny product at E = 128 on the AMD machine).
    """

    experts: np.ndarray  # [G] int64
    starts: np.ndarray  # [G] int64
    counts: np.ndarray  # [G] int32 (MKL_INT)
    num_experts: int
    covered: int  # rows up to the last offset


def row_ranges(offsets: torch.Tensor) -> RowRanges:
    """From the cumulative row counts `offsets` [E] (as grouped_mm takes them); computed once per layer forward."""
    ends = offsets.detach().to("cpu", torch.int64).numpy()
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    if ends.size and (ends[0] < 0 or (ends < starts).any()):
        raise ValueError("grouped offsets must be non-decreasing from 0")
    experts = np.flatnonzero(ends > starts)
    return RowRanges(experts, starts[experts], (ends - starts)[experts].astype(np.int32), int(ends.size),
                     int(ends[-1]) if ends.size else 0)


def _check_rows(ranges: RowRanges, rows: int, num_experts: int) -> None:
    if ranges.covered > rows or ranges.num_experts != num_experts:
        raise ValueError(f"mkl_batch: offsets of {ranges.num_experts} experts covering {ranges.covered} rows do not "
                         f"fit {rows} rows of {num_experts} experts")


def _call(trans_a, lda, trans_b, ldb, m, n, k, a_ptrs, b_ptrs, c_ptrs, ldc) -> None:
    """One `cblas_sgemm_batch` with a group per expert: C_i = op(A_i) op(B_i), sizes m[i] x n[i] x k[i].

    Every per-group argument is a row of one C-contiguous numpy array, alive until the call returns.
    """
    groups = len(a_ptrs)
    if groups == 0:
        return
    ints = np.empty((9, groups), dtype=np.int32)  # MKL_INT (LP64) and CBLAS_TRANSPOSE
    for row, value in enumerate((trans_a, trans_b, m, n, k, lda, ldb, ldc, 1)):
        ints[row] = value
    scalars = np.empty((2, groups), dtype=np.float32)
    scalars[0], scalars[1] = 1.0, 0.0  # alpha, beta
    ptrs = np.stack([a_ptrs, b_ptrs, c_ptrs]).astype(np.int64, copy=False)
    i, f, p = (array.ctypes.data for array in (ints, scalars, ptrs))
    ri, rf, rp = ints.strides[0], scalars.strides[0], ptrs.strides[0]
    _sgemm_batch()(_ROW_MAJOR, i, i + ri, i + 2 * ri, i + 3 * ri, i + 4 * ri, f, p, i + 5 * ri, p + rp, i + 6 * ri,
                   f + rf, p + 2 * rp, i + 7 * ri, groups, i + 8 * ri)


def rows_times_weights(x: torch.Tensor, w: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    """x [N, K] times w [E, K, M], expert e's rows (`ranges`, from the offsets) with w[e] -> [N, M] (rows past the
    last offset are zero), as `torch.nn.functional.grouped_mm(x, w, offs=offsets)` computes it."""
    _require_cpu_float32(x, w)
    rows, inner = x.shape
    num_experts, w_inner, cols = w.shape
    if w_inner != inner:
        raise ValueError(f"mkl_batch: shapes {tuple(x.shape)} x {tuple(w.shape)}")
    _check_rows(ranges, rows, num_experts)
    out = torch.empty(rows, cols, dtype=torch.float32, device="cpu")
    experts, starts, counts = ranges.experts, ranges.starts, ranges.counts
    x, trans_a, lda = _layout(x)
    w, trans_b, ldb = _layout(w)
    size = x.element_size()
    _call(trans_a, lda, trans_b, ldb, counts, cols, inner, _address(x) + starts * (x.stride(0) * size),
          _address(w) + experts * (w.stride(0) * size), _address(out) + starts * (cols * size), cols)
    if ranges.covered < rows:
        out[ranges.covered:].zero_()
    return out


def outer_sums(a: torch.Tensor, b: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    """Per expert, a[rows]ᵀ b[rows] for a [N, P], b [N, Q] -> [E, P, Q] (zero for experts without rows), as
    `torch.nn.functional.grouped_mm(a.t(), b, offs=offsets)` computes it."""
    _require_cpu_float32(a, b)
    rows, p = a.shape
    if b.shape[0] != rows:
        raise ValueError(f"mkl_batch: outer products of {tuple(a.shape)} and {tuple(b.shape)}")
    _check_rows(ranges, rows, ranges.num_experts)
    q = b.shape[1]
    out = torch.empty(ranges.num_experts, p, q, dtype=torch.float32, device="cpu")
    experts, starts, counts = ranges.experts, ranges.starts, ranges.counts
    if len(experts) < ranges.num_experts:
        empty = torch.ones(ranges.num_experts, dtype=torch.bool, device="cpu")
        empty[torch.from_numpy(experts)] = False
        out[empty] = 0
    a, trans_a, lda = _layout(a)
    b, trans_b, ldb = _layout(b)
    size = a.element_size()
    _call(_TRANS if trans_a == _NO_TRANS else _NO_TRANS, lda, trans_b, ldb, p, q, counts,
          _address(a) + starts * (a.stride(0) * size), _address(b) + starts * (b.stride(0) * size),
          _address(out) + experts * (p * q * size), q)
    return out
