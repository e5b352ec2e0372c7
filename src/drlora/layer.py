"""The expert-LoRA math. Where the LoRA is computed.

For each adapted projection of one fused-experts module: A [E, r_max, in], B [E, out, r_max] and an active-rank
mask [E, r_max]. The update is ΔW_e = s · B_e diag(m_e) A_e with s = lora_alpha / r_max constant. It is applied on
the routed tokens only, grouped by expert with grouped matmuls (grouped.py) — a per-expert ΔW is never materialised
in training.

The mask multiplies the rank activations h = x·Aᵀ of each routed row in the forward pass, so a masked rank
contributes nothing and its A row and B column get exactly zero gradient by construction (not by zeroing .grad
afterwards, which ZeRO would already have consumed). The matmuls only run over the *active width* — the ranks up to
the highest active one, rounded up for the kernels' alignment — so a DR-LoRA run pays for r_init-wide LoRA early in
training, not for r_max. The backward computes the six grouped matmuls by hand and hands the per-rank grad·weight
sums to the importance statistics on the way; LoRA dropout happens inside too, with a cheap mask (dropout_keep_mask).
Growth flips mask bits; masked A rows keep their (seeded) initial values and B columns stay zero, so a new rank
starts as initialised, the model's output does not move, and nothing else has to be written — which keeps
optimizers that hold their own master copy of the weights (DeepSpeed, FSDP mixed precision) consistent.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .grouped import RoutedRows, combine, dispatch, grouped_linear, grouped_mm, grouped_outer, route, sort_weights
from .sharding import local_rows, refuse_zero3
from .signals import RankImportance, RoutingFrequency, in_backward, real_tokens


def kaiming_init(num_experts: int, rank: int, in_features: int, seed: int) -> torch.Tensor:
    """A's initial values, as nn.Linear would draw them (U(±1/sqrt(in))); the same on every device and process."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)
    return torch.empty(num_experts, rank, in_features).uniform_(-bound, bound, generator=generator)


def dropout_keep_mask(shape, p: float, device) -> torch.Tensor:
    """A Bernoulli(1 - p) keep mask, three elements from each 64-bit random word (16 bits each).

    nn.Dropout draws one float per element, and on a CPU that draw dominates: 11.8 ms for [4096, 512] against
    about 2 ms here, and an expert LoRA drops its input on every routed row (k per token). P(drop) =
    round(p · 2^16) / 2^16, within 7.7e-6 of p. `random_` leaves a word's top bit 0, so its fourth 16-bit lane is
    not used. Drawn from torch's default generator, so `torch.manual_seed` reproduces it.
    """
    numel = math.prod(shape)
    words = torch.empty((numel + 2) // 3, dtype=torch.int64, device=device).random_()  # bits 0..62 uniform
    lanes = words.view(torch.int16).view(-1, 4)[:, :3]  # signed 16-bit, uniform over [-2^15, 2^15)
    return (lanes >= round(p * 65536) - 32768).view(-1)[:numel].view(shape)


class _AddExpertLoRA(torch.autograd.Function):
    """base_out[:, columns] += s · (drop(x) A_wᵀ ⊙ mask) B_wᵀ per routed row, in place, over the active width w.

    Hand-written because autograd would differentiate the in-place add on a column slice through a copy of the whole
    output gradient, and because the backward's rank activations give the importance statistics almost for free
    (signals.RankImportance), where hooks on the parameters would need products over the full [E, r, features].

    The factors may be float32 masters in a bf16 model (DRLoRAConfig.adapter_dtype): the matmuls run in the base
    output's dtype (CUDA's grouped_mm takes bf16 only), on w-wide copies of the factors, and the factors' gradients
    come back in their own dtype.
    """

    @staticmethod
    def forward(ctx, base_out, x, lora_A, lora_B, rank_scale, routed: RoutedRows, columns, importance, dropout_p):
        width, dtype = rank_scale.shape[1], base_out.dtype
        a, b = lora_A[:, :width].to(dtype), lora_B[:, :, :width].to(dtype)
        ctx.x_dtype = x.dtype
        x = x.to(dtype)
        # dropout: the kept inputs go through A unscaled, and 1 / (1 - p) joins mask · s on the narrow [N, w] side
        row_scale = rank_scale.index_select(0, routed.expert_ids)  # [N, w]: mask · s of each row's expert
        keep = None
        if dropout_p > 0:
            keep = dropout_keep_mask(x.shape, dropout_p, x.device)
            x = x * keep  # saved as is: the weight gradient needs the dropped input
            row_scale.mul_(1.0 / (1.0 - dropout_p))
        scaled_h = grouped_mm(x, a.transpose(1, 2), routed).mul_(row_scale)
        base_out[:, columns] += grouped_mm(scaled_h, b.transpose(1, 2), routed)
        ctx.mark_dirty(base_out)
        ctx.save_for_backward(x, keep, scaled_h, row_scale, a, b)
        ctx.routed, ctx.columns, ctx.importance = routed, columns, importance
        ctx.factors = (lora_A.shape, lora_A.dtype), (lora_B.shape, lora_B.dtype)
        return base_out

    @staticmethod
    def backward(ctx, grad_out):
        x, keep, scaled_h, row_scale, a, b = ctx.saved_tensors
        routed, needs = ctx.routed, ctx.needs_input_grad
        (a_shape, a_dtype), (b_shape, b_dtype) = ctx.factors
        grad_y = grad_out[:, ctx.columns]
        if grad_y.stride(-1) != 1:  # interleaved gate/up columns (GPT-OSS): the kernels want unit stride
            grad_y = grad_y.contiguous()
        grad_y = grad_y.to(b.dtype)
        grad_scaled_h = grouped_mm(grad_y, b, routed)  # [N, w]
        if ctx.importance is not None:  # Σ (∂L/∂A ⊙ A) over a rank's A row (= over its B column), per row
            ctx.importance.accumulate(grad_scaled_h * scaled_h, routed.expert_ids)
        grad_h = grad_scaled_h.mul_(row_scale)  # zero on masked ranks, and so are their A and B gradients
        grad_x = None
        if needs[1]:
            grad_x = grouped_mm(grad_h, a, routed)
            grad_x = (grad_x if keep is None else grad_x.mul_(keep)).to(ctx.x_dtype)
        grad_a = _pad_ranks(grouped_outer(grad_h, x, routed).to(a_dtype), a_shape, dim=1) if needs[2] else None
        grad_b = _pad_ranks(grouped_outer(grad_y, scaled_h, routed).to(b_dtype), b_shape, dim=2) if needs[3] else None
        return grad_out, grad_x, grad_a, grad_b, None, None, None, None, None


def _pad_ranks(grad: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """The gradient of the full r_max-wide parameter: zero beyond the active width (one pass over the memory)."""
    missing = shape[dim] - grad.shape[dim]
    if missing == 0:
        return grad
    padding = [0, 0] * (grad.dim() - 1 - dim) + [0, missing]  # F.pad lists the last dimension first
    return F.pad(grad, padding)


class ExpertLoRA(nn.Module):
    """Per-expert LoRA of one projection (gate, up or down) with an active-rank mask."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r_max: int, r_init: int,
                 scaling: float, dropout: float, seed: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.r_max, self.r_init = r_max, r_init
        self.scaling = scaling
        self.seed = seed
        self.lora_A = nn.Parameter(kaiming_init(num_experts, r_max, in_features, seed).to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r_max, device=device, dtype=dtype))
        mask = (torch.arange(r_max, device=device) < r_init).expand(num_experts, r_max).clone()
        self.register_buffer("rank_mask", mask)
        self.dropout_p = dropout  # applied inside _AddExpertLoRA (see dropout_keep_mask)
        self.importance = RankImportance(num_experts, r_max).to(device)
        self.track_importance = True  # off for fixed allocations, which never read it
        self._scale_cache: tuple | None = None

    def add_to(self, base_out: torch.Tensor, x: torch.Tensor, routed: RoutedRows, columns=slice(None)) -> torch.Tensor:
        """Add the LoRA output of routed rows `x` [N, in] to `base_out[:, columns]` in place, computed in
        `base_out`'s dtype; returns `base_out`."""
        importance = self.importance if self.track_importance and torch.is_grad_enabled() else None
        return _AddExpertLoRA.apply(base_out, x, self.lora_A, self.lora_B, self.rank_scale(base_out.dtype), routed,
                                    columns, importance, self.dropout_p if self.training else 0.0)

    def rank_scale(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """mask · s over the active width, [E, w] in the compute `dtype` (default: the factors' dtype).

        The width is the highest active rank rounded up to a multiple of 16 bytes of `dtype` (the grouped-matmul
        kernels' alignment), never 0. Cached until the mask changes (its version counter moves on every in-place
        write), so the host reads the mask once per growth event, not once per forward.
        """
        mask, dtype = self.rank_mask, dtype or self.lora_A.dtype
        cached = self._scale_cache
        if cached is None or cached[0] is not mask or cached[1] != mask._version or cached[2] != dtype:
            align = max(1, 16 // dtype.itemsize)
            active = mask.any(0).nonzero()
            highest = int(active.max()) + 1 if active.numel() else 0
            width = min(self.r_max, max(align, -(-highest // align) * align))
            cached = self._scale_cache = (mask, mask._version, dtype,
                                          (mask[:, :width].to(dtype) * self.scaling).contiguous())
        return cached[3]

    def ranks(self) -> torch.Tensor:
        return self.rank_mask.sum(-1)

    @torch.no_grad()
    def set_ranks(self, ranks) -> None:
        """Make the lowest `ranks[e]` slots of expert e its active ranks, and mask the rest."""
        device = self.rank_mask.device
        self.rank_mask.copy_(torch.arange(self.r_max, device=device) < torch.as_tensor(ranks, device=device)[:, None])

    @torch.no_grad()
    def grow(self, new_ranks: torch.Tensor) -> None:
        """Activate `new_ranks[e]` more ranks of expert e (lowest free indices), function-preserving.

        The A rows are reset to their seeded initial values (in case weight decay shrank them while masked) and the
        B columns to zero, so each new rank starts exactly as initialised and the output does not change.
        """
        device = self.rank_mask.device
        new_ranks = torch.as_tensor(new_ranks, device=device)
        ranks = self.ranks()
        grown = ranks + new_ranks.clamp_min(0)
        if int(grown.max()) > self.r_max:
            expert = int(grown.argmax())
            raise ValueError(f"expert {expert} cannot grow to {int(grown[expert])} ranks: r_max is {self.r_max}.")
        slot = torch.arange(self.r_max, device=device)
        new = (slot >= ranks[:, None]) & (slot < grown[:, None])  # [E, r_max]
        if not bool(new.any()):
            return
        refuse_zero3((self.lora_A, self.lora_B))  # a partitioned factor is an empty placeholder here
        initial = kaiming_init(self.num_experts, self.r_max, self.in_features, self.seed)
        rows, lora_a = local_rows(self.lora_A)  # under FSDP2, the experts this process holds (sharding.py)
        lora_a[new[rows]] = initial[rows].to(lora_a)[new[rows]]
        rows, lora_b = local_rows(self.lora_B)
        lora_b.masked_fill_(new[rows][:, None, :], 0)
        self.rank_mask |= new

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Back to the state at construction — seeded A, B = 0, r_init active ranks, no importance — e.g. after
        `to_empty` materialised a model built on the meta device (under FSDP2, each process writes its experts)."""
        rows, lora_a = local_rows(self.lora_A)
        lora_a.copy_(kaiming_init(self.num_experts, self.r_max, self.in_features, self.seed)[rows])
        local_rows(self.lora_B)[1].zero_()
        self.set_ranks(torch.full((self.num_experts,), self.r_init))
        self.importance.reset()
        self.importance.clear_step()

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B diag(m) A as [E, out, in] in float32 — for merging only, never in training."""
        a = self.lora_A.float() * self.rank_mask.unsqueeze(-1)
        return self.scaling * torch.bmm(self.lora_B.float(), a)


class BatchTokens:
    """The attention mask of the model's current forward, shared by all its MoE layers, so that the routing frequency
    counts real tokens only. Hooks on the model set it before its forward and clear it after."""

    def __init__(self):
        self.attention_mask: torch.Tensor | None = None
        self._real: tuple | None = None

    def capture(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)  # forward(input_ids, attention_mask)
        self.attention_mask = mask if isinstance(mask, torch.Tensor) else None
        self._real = None

    def release(self, *unused) -> None:
        self.attention_mask, self._real = None, None

    def real(self, num_tokens: int) -> torch.Tensor | None:
        """Which of the `num_tokens` routed positions are real tokens (signals.real_tokens), once per forward."""
        if self._real is None or self._real[0] != num_tokens:
            self._real = (num_tokens, real_tokens(self.attention_mask, num_tokens))
        return self._real[1]


class ExpertsAdapter(nn.Module):
    """Everything drlora attaches to one experts module: per-projection LoRA and the routing frequency."""

    def __init__(self, layer, projections: dict[str, ExpertLoRA], batch: BatchTokens):
        super().__init__()
        self.layer_index = layer.index
        self.projections = nn.ModuleDict(projections)
        self.frequency = RoutingFrequency(layer.num_experts).to(next(iter(projections.values())).lora_A.device)
        self.slices = {name: layer.out_slice(name) for name in projections}
        self.batch = batch

    def ranks(self) -> torch.Tensor:
        """Active ranks per expert [E]; all adapted projections of an expert share its rank."""
        return next(iter(self.projections.values())).ranks()


def dr_lora_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts forward with DR-LoRA, bound to a transformers fused-experts module (`self`).

    Computes what transformers' grouped_mm experts implementation computes, op for op (so with B = 0 the output is
    the base model's, exactly or, where grouped.py uses MKL's batched GEMM, to float rounding), and adds the LoRA
    terms in place on the routed rows, grouped by expert.
    """
    adapter: ExpertsAdapter = self.dr_lora
    if self.training and not in_backward():  # count real training forwards once, not checkpoint recomputes
        adapter.frequency.record(top_k_index, top_k_weights, adapter.batch.real(top_k_index.shape[0]))
    routed = route(top_k_index, self.num_experts)
    x = dispatch(hidden_states, routed)
    loras = adapter.projections

    up_weight = self.gate_up_proj if self.has_gate else self.up_proj
    up_bias = None
    if self.has_bias:
        up_bias = self.gate_up_proj_bias if self.has_gate else self.up_proj_bias
    proj = grouped_linear(x, up_weight, routed, up_bias, self.is_transposed)
    for name in ("gate", "up"):
        if name in loras:
            proj = loras[name].add_to(proj, x, routed, adapter.slices[name])
    hidden = self._apply_gate(proj) if self.has_gate else self.act_fn(proj)

    down_bias = self.down_proj_bias if self.has_bias else None
    out = grouped_linear(hidden, self.down_proj, routed, down_bias, self.is_transposed)
    if "down" in loras:
        out = loras["down"].add_to(out, hidden, routed)
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)

    weighted = out * sort_weights(top_k_weights, routed).unsqueeze(-1)
    return combine(weighted, routed).to(hidden_states.dtype)


class LinearLoRA(nn.Module):
    """Plain uniform-rank LoRA for an nn.Linear outside the routed experts (attention, shared experts).

    Attached as a forward hook so the base module and its state_dict keys stay untouched. Like the expert LoRA it
    computes in the dtype of the base module's output, whatever dtype its factors are stored in.
    """

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float, seed: int, dtype: torch.dtype):
        super().__init__()
        device = base.weight.device
        self.scaling, self.seed = scaling, seed
        init = kaiming_init(1, rank, base.in_features, seed)[0]
        self.lora_A = nn.Parameter(init.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        h = F.linear(self.dropout(x.to(dtype)), self.lora_A.to(dtype))
        return F.linear(h, self.lora_B.to(dtype)) * self.scaling

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Seeded A, B = 0, as constructed (see ExpertLoRA.reset_parameters)."""
        rows, lora_a = local_rows(self.lora_A)
        lora_a.copy_(kaiming_init(1, self.lora_A.shape[0], self.lora_A.shape[1], self.seed)[0][rows])
        local_rows(self.lora_B)[1].zero_()

    @staticmethod
    def hook(module: nn.Module, args, output):
        return output + module.dr_lora(args[0], output.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())
