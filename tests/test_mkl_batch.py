"""MKL's batched GEMM for the grouped matmuls (drlora.mkl_batch): the same products as torch's grouped_mm, gradients
included, for every layout drlora hands it, only where it is meant to run, and safe where it is not (autocast, a
non-CPU default device, tensors it cannot read)."""

import pytest
import torch
import torch.nn.functional as F

from drlora import get_dr_lora_model, mkl_batch
from drlora.grouped import grouped_mm, grouped_outer, route
from tiny_models import small_config, tiny_moe, token_batch

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


def test_first_products_of_a_process_under_cpu_autocast_work():
    # Trainer(bf16=True, use_cpu=True), TRL and autocast loops: the one-time self-check must not see autocast
    routed = _routed()
    x = torch.randn(routed.expert_ids.numel(), 16, requires_grad=True)
    w = torch.randn(6, 16, 8)
    mkl_batch._verified.cache_clear()  # the first product of a process runs the self-check
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = grouped_mm(x, w, routed)
        assert type(out.grad_fn).__name__ == "_BatchedGroupedMmBackward"  # the check passed: MKL still on
        torch.testing.assert_close(out, reference_rows(x.detach(), w, routed.offsets))
    mkl_batch._verified.cache_clear()
    model = get_dr_lora_model(tiny_moe(), small_config())
    model.train()
    tokens = token_batch()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens, labels=tokens).loss
        loss.backward()
        assert torch.isfinite(loss)
    assert mkl_batch.available()


def test_a_self_check_that_raises_is_one_warning_and_torchs_kernels_for_the_process(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("an ABI surprise")

    routed = _routed()
    x, w = torch.randn(routed.expert_ids.numel(), 16, requires_grad=True), torch.randn(6, 16, 8)
    monkeypatch.setattr(torch, "allclose", broken)  # the check's comparison fails, as anything in it could
    mkl_batch._verified.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="drlora.mkl_batch"):
            outs = [grouped_mm(x, w, routed) for _ in range(3)]
        assert not mkl_batch.available()
    finally:
        monkeypatch.undo()
        mkl_batch._verified.cache_clear()
    assert [type(out.grad_fn).__name__ for out in outs] == ["GroupedMmBackward0"] * 3  # torch's kernel
    torch.testing.assert_close(outs[0], reference_rows(x.detach(), w, routed.offsets))
    assert [r.getMessage() for r in caplog.records] == [
        "MKL's cblas_sgemm_batch self-check failed (RuntimeError: an ABI surprise); drlora uses torch's grouped_mm "
        "instead."]
    assert mkl_batch.available()


def test_a_non_cpu_default_device_neither_crashes_nor_misleads_the_batched_gemm():
    # torch.set_default_device("meta"/"cuda") must not make MKL write through a pointer that is not host memory
    routed = _routed()
    x = torch.randn(routed.expert_ids.numel(), 16, requires_grad=True)
    w = torch.randn(6, 16, 12)
    grad = torch.randn(x.shape[0], 12)
    expected = reference_rows(x.detach(), w, routed.offsets)
    expected_x_grad = reference_rows(grad, w.transpose(1, 2), routed.offsets)
    previous = torch.get_default_device()
    assert mkl_batch.available()
    try:
        torch.set_default_device("meta")
        for fresh_check in (False, True):  # the products, then the self-check as well, under the default device
            if fresh_check:
                mkl_batch._verified.cache_clear()
            out = grouped_mm(x, w, routed)
            assert type(out.grad_fn).__name__ == "_BatchedGroupedMmBackward"
            (x_grad,) = torch.autograd.grad(out, x, grad)
            outer = mkl_batch.outer_sums(x.detach(), grad, routed.ranges)  # experts 0 and 3 get no rows
            assert out.device.type == x_grad.device.type == outer.device.type == "cpu"
            torch.testing.assert_close(out, expected)
            torch.testing.assert_close(x_grad, expected_x_grad)
            torch.testing.assert_close(outer, reference_outer(x.detach(), grad, routed.offsets))
    finally:
        torch.set_default_device(previous)
    assert mkl_batch.available()


@pytest.mark.parametrize("case", ["bfloat16", "float64", "meta x", "meta w"])
def test_anything_but_cpu_float32_is_refused_before_mkl_sees_it(case):
    routed = _routed()
    x, w = torch.randn(routed.expert_ids.numel(), 16), torch.randn(6, 16, 8)
    if case in ("bfloat16", "float64"):
        x, w = x.to(getattr(torch, case)), w.to(getattr(torch, case))
    elif case == "meta x":
        x = x.to("meta")
    else:
        w = w.to("meta")
    with pytest.raises(ValueError, match="takes strided float32 CPU tensors"):
        mkl_batch.rows_times_weights(x, w, routed.ranges)
    with pytest.raises(ValueError, match="takes strided float32 CPU tensors"):
        mkl_batch.outer_sums(x, w.new_zeros(x.shape[0], 4), routed.ranges)
