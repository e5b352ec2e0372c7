"""MKL's batched GEMM for the grouped matmuls (drlora.mkl_batch): the same products as torch's grouped_mm, gradients
included, for every layout drlora hands it, and only where it is meant to run."""

import pytest
import torch
import torch.nn.functional as F

from drlora import mkl_batch
from drlora.grouped import grouped_mm, grouped_outer, route

pytestmark = pytest.mark.skipif(not mkl_batch.available(), reason="torch was built without MKL's batched GEMM")


def _routed(experts=6, tokens=40, top_k=2, seed=0, skip=(0, 3)):
    """Routing in which the experts in `skip` (the first one among them) receive no rows."""
    scores = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))
    scores[:, list(skip)] = -1e9
    return route(torch.topk(scores, top_k).indices, experts)


def _per_expert(offsets):
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        yield expert, slice(start, end)
        start = end


def reference_rows(x, w, offsets):
    out = torch.zeros(x.shape[0], w.shape[2])
    for expert, rows in _per_expert(offsets):
        out[rows] = x[rows] @ w[expert]
    return out


def reference_outer(a, b, offsets):
    return torch.stack([a[rows].t() @ b[rows] for _, rows in _per_expert(offsets)])


def _weights(experts, k, m, transposed):
    """[E, K, M] weights stored either way round, as transformers stores fused experts."""
    w = torch.randn(experts, m, k) if transposed else torch.randn(experts, k, m)
    return w.transpose(1, 2) if transposed else w


@pytest.mark.parametrize("transposed", [False, True])
def test_rows_times_weights_is_torchs_grouped_mm(transposed):
    routed = _routed()
    x_wide = torch.randn(routed.expert_ids.numel(), 27)
    x = x_wide[:, 2:21]  # a column slice, as the gate/up halves of a fused projection are
    w = _weights(6, 19, 13, transposed)
    expected = reference_rows(x, w, routed.offsets)
    torch.testing.assert_close(mkl_batch.rows_times_weights(x, w, routed.ranges), expected, rtol=1e-6, atol=1e-6)
    # a layout without a usable leading dimension (expanded rows) is copied, not misread
    x_expanded = torch.randn(1, 19).expand(x.shape[0], 19)
    torch.testing.assert_close(mkl_batch.rows_times_weights(x_expanded, w, routed.ranges),
                               reference_rows(x_expanded, w, routed.offsets))


def test_outer_sums_are_torchs_and_zero_for_experts_without_rows():
    routed = _routed(skip=(0, 3, 5))  # the first and the last expert get nothing
    rows = routed.expert_ids.numel()
    a, b = torch.randn(rows, 7), torch.randn(rows, 30)[:, 3:25]
    out = mkl_batch.outer_sums(a, b, routed.ranges)
    torch.testing.assert_close(out, reference_outer(a, b, routed.offsets), rtol=1e-6, atol=1e-6)
    assert out[[0, 3, 5]].abs().max() == 0
    torch.testing.assert_close(mkl_batch.outer_sums(a.t().contiguous().t(), b, routed.ranges), out)


def test_rows_past_the_last_offset_are_zero_and_bad_offsets_are_refused():
    x, w = torch.randn(10, 4), torch.randn(2, 4, 3)
    out = mkl_batch.rows_times_weights(x, w, mkl_batch.row_ranges(torch.tensor([3, 7], dtype=torch.int32)))
    torch.testing.assert_close(out, reference_rows(x, w, torch.tensor([3, 7])))
    assert out[7:].abs().max() == 0
    with pytest.raises(ValueError, match="non-decreasing"):
        mkl_batch.row_ranges(torch.tensor([5, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="covering 11 rows do not fit 10 rows"):
        mkl_batch.outer_sums(x, x, mkl_batch.row_ranges(torch.tensor([3, 11], dtype=torch.int32)))
    with pytest.raises(ValueError, match="offsets of 2 experts"):
        mkl_batch.rows_times_weights(x, torch.randn(3, 4, 3), mkl_batch.row_ranges(torch.tensor([3, 7])))


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_mm_through_mkl_has_torchs_gradients(transposed):
    routed = _routed()
    x = torch.randn(routed.expert_ids.numel(), 16, requires_grad=True)
    w = _weights(6, 16, 12, transposed).requires_grad_()
    out = grouped_mm(x, w, routed)
    assert type(out.grad_fn).__name__ == "_BatchedGroupedMmBackward"
    grad = torch.randn_like(out)
    x_grad, w_grad = torch.autograd.grad(out, (x, w), grad)
    expected = F.grouped_mm(x, w, offs=routed.offsets)
    ex_grad, ew_grad = torch.autograd.grad(expected, (x, w), grad)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x_grad, ex_grad)
    torch.testing.assert_close(w_grad, ew_grad)
    assert w_grad[[0, 3]].abs().max() == 0  # experts without rows


def test_used_only_for_float32_cpu_with_few_rows_per_expert_and_switched_off_by_the_flag(monkeypatch):
    routed = _routed(experts=4, tokens=400, top_k=2, skip=())  # 200 rows per expert: torch's threaded GEMMs
    x, w = torch.randn(800, 16, requires_grad=True), torch.randn(4, 16, 8)
    assert type(grouped_mm(x, w, routed).grad_fn).__name__ == "GroupedMmBackward0"
    few = _routed()
    x_few = torch.randn(few.expert_ids.numel(), 16, requires_grad=True)
    w_few = torch.randn(6, 16, 8)
    assert type(grouped_mm(x_few, w_few, few).grad_fn).__name__ == "_BatchedGroupedMmBackward"
    assert not mkl_batch.suits(x_few.bfloat16(), w_few.bfloat16(), x_few.shape[0], 6)
    assert "MKL's batched GEMM" in mkl_batch.describe(torch.float32)
    assert "torch's grouped_mm (bfloat16)" in mkl_batch.describe(torch.bfloat16)
    monkeypatch.setattr(mkl_batch, "enabled", False)
    assert "DRLORA_MKL_BATCH=0" in mkl_batch.describe(torch.float32)
    assert type(grouped_mm(x_few, w_few, few).grad_fn).__name__ == "GroupedMmBackward0"
    a = torch.randn(few.expert_ids.numel(), 8)
    torch.testing.assert_close(grouped_outer(a, x_few.detach(), few), reference_outer(a, x_few.detach(), few.offsets))
