"""Which grouped products go to torch's grouped_mm kernel (drlora.grouped.grouped_mm_usable): one rule for the CPU
and CUDA, checked here on CPU tensors, and the per-expert loop — right values and gradients — for what it refuses."""

import pytest
import torch
import torch.nn.functional as F

from drlora import grouped, mkl_batch
from drlora.grouped import grouped_mm, grouped_mm_usable, grouped_outer, route

E, N = 4, 40


def _routed(skip=(2,)):
    scores = torch.randn(N // 2, E, generator=torch.Generator().manual_seed(0))
    scores[:, list(skip)] = -1e9  # an expert without rows
    return route(torch.topk(scores, 2).indices, E)


def _rows(offsets):
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        yield expert, slice(start, end)
        start = end


def _lora_b(r_max, dtype, width=5, out=16):
    """A LoRA B factor [E, out, r_max] cut to its active width and transposed, as layer.py hands it to grouped_mm."""
    return torch.randn(E, out, r_max, dtype=dtype)[:, :, :width].transpose(1, 2)


def _torch_takes(w):
    """Whether torch's own CPU grouped_mm accepts w [E, K, M] as the weight operand (with an aligned input)."""
    x = torch.randn(N, 64, dtype=w.dtype)[:, :w.shape[1]]  # rows 128 or 256 bytes apart
    try:
        F.grouped_mm(x, w, offs=torch.tensor([10, 20, 30, 40], dtype=torch.int32))
    except RuntimeError:
        return False
    return True


LAYOUTS = {  # name -> (weight operand [E, K, M], whether the kernel takes it)
    "bf16 LoRA B, r_max 12 (row stride 24 bytes)": (lambda: _lora_b(12, torch.bfloat16), False),
    "bf16 LoRA B, r_max 16": (lambda: _lora_b(16, torch.bfloat16), True),
    "fp32 LoRA B, r_max 12 (48 bytes)": (lambda: _lora_b(12, torch.float32), True),
    "bf16 B cut, not transposed (stride 12)": (lambda: torch.randn(E, 16, 12, dtype=torch.bfloat16)[:, :, :5], False),
    "bf16 transposed view, stride 8": (lambda: torch.randn(E, 5, 8, dtype=torch.bfloat16).transpose(1, 2), True),
    "bf16 transposed view, stride 12": (lambda: torch.randn(E, 5, 12, dtype=torch.bfloat16).transpose(1, 2), False),
    "fp32, no unit stride in the last two dims": (lambda: torch.randn(E, 16, 8, 4)[..., 0], False),
    "fp32 one column (strides 1, 1)": (lambda: torch.randn(E, 16, 1), False),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_layout_rule_is_torchs_own_check(name):
    make, accepted = LAYOUTS[name]
    w = make()
    assert grouped.kernel_accepts_layout(w) is accepted
    assert _torch_takes(w) is accepted  # the rule says what torch's kernel does, not a guess


def test_addresses_the_cuda_kernel_cannot_copy_from_are_refused():
    # a data pointer off 16 bytes (torch's CPU kernel took it up to 2.10 only; CUDA never), and an expert stride
    # that puts an expert's matrix off 16 bytes (the CUDA kernel's per-expert TMA copies)
    buffer = torch.randn(E * 16 * 8 + 8, dtype=torch.bfloat16)
    assert grouped.kernel_accepts_layout(buffer[8:].view(E, 16, 8))
    assert not grouped.kernel_accepts_layout(buffer[1:1 + E * 16 * 8].view(E, 16, 8))
    assert not grouped.kernel_accepts_layout(buffer.as_strided((E, 16, 8), (16 * 8 + 1, 8, 1)))
    assert grouped.kernel_accepts_layout(buffer.as_strided((1, 16, 8), (3, 8, 1)))  # one expert: stride never used
    # the dimension the offsets split must not be the unit-stride one (each expert's slice starts 16-byte aligned)
    w = torch.randn(E, 16, 8, dtype=torch.bfloat16)
    x = torch.randn(N, 16, dtype=torch.bfloat16)
    column_major_x = torch.randn(16, N, dtype=torch.bfloat16).t()
    assert grouped.kernel_accepts_layout(column_major_x) and grouped_mm_usable(x, w)
    assert not grouped_mm_usable(column_major_x, w)
    a, b = torch.randn(N, 8, dtype=torch.bfloat16), torch.randn(N, 16, dtype=torch.bfloat16)
    assert grouped_mm_usable(a.t(), b)  # a weight gradient as grouped_outer asks for it
    assert not grouped_mm_usable(a.t().contiguous(), b) and not grouped_mm_usable(a.t(), b.t().contiguous().t())
    assert not grouped_mm_usable(x.double(), w.double()) and not grouped_mm_usable(x.float(), w)


@pytest.fixture
def without_mkl(monkeypatch):
    monkeypatch.setattr(mkl_batch, "enabled", False)  # the products go to grouped_mm_usable, not to MKL's kernel


FALLBACKS = {  # name -> (x [N, K], w [E, K, M]) the kernel refuses
    "bf16 LoRA B, r_max 12": (lambda: torch.randn(N, 8, dtype=torch.bfloat16)[:, :5],  # x itself is aligned
                              lambda: _lora_b(12, torch.bfloat16)),
    "a rank-1 LoRA's activations [N, 1]": (lambda: torch.randn(N, 1), lambda: torch.randn(E, 1, 16)),
    "weights without a unit stride": (lambda: torch.randn(N, 16), lambda: torch.randn(E, 16, 8, 4)[..., 0]),
    "float64": (lambda: torch.randn(N, 16, dtype=torch.float64), lambda: torch.randn(E, 16, 8, dtype=torch.float64)),
}


@pytest.mark.parametrize("name", FALLBACKS)
def test_products_the_kernel_refuses_run_per_expert_with_their_gradients(name, without_mkl):
    routed = _routed()
    make_x, make_w = FALLBACKS[name]
    x, w = make_x().requires_grad_(), make_w().requires_grad_()
    out = grouped_mm(x, w, routed)  # no error from torch's kernel
    grad = torch.randn_like(out)
    x_grad, w_grad = torch.autograd.grad(out, (x, w), grad)
    expected = torch.zeros_like(out)
    for expert, rows in _rows(routed.offsets):
        expected[rows] = x.detach()[rows] @ w.detach()[expert]
    x_ref, w_ref = x.detach().requires_grad_(), w.detach().requires_grad_()
    reference = torch.cat([x_ref[rows] @ w_ref[expert] for expert, rows in _rows(routed.offsets)])
    ex_grad, ew_grad = torch.autograd.grad(reference, (x_ref, w_ref), grad)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x_grad, ex_grad)
    torch.testing.assert_close(w_grad, ew_grad)
    assert w_grad[2].abs().max() == 0  # the expert without rows
    assert not grouped_mm_usable(x, w)  # the loop did it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradients_the_kernel_refuses_run_per_expert(dtype, without_mkl):
    routed = _routed()
    a, b = torch.randn(N, 1, dtype=dtype), torch.randn(N, 16, dtype=dtype)  # a rank-1 LoRA's [N, 1]: strides (1, 1)
    expected = torch.stack([a[rows].t() @ b[rows] for _, rows in _rows(routed.offsets)])
    torch.testing.assert_close(grouped_outer(a, b, routed), expected)
    assert not grouped_mm_usable(a.t(), b)
