"""The expert-LoRA math. Where the LoRA is computed.

For each adapted projection of one fused-experts module: A [E, r_max, in], B [E, out, r_max] and an active-rank
mask [E, r_max]. The update is ΔW_e = s · B_e diag(m_e) A_e with s = lora_alpha / r_max constant. It is applied on
the routed tokens only, grouped by expert with grouped matmuls — a per-expert ΔW is never materialised in training.

The mask multiplies the rank activations h = x·Aᵀ of each routed row in the forward pass, so a masked rank
contributes nothing and its A row and B column get exactly zero gradient by construction (not by zeroing .grad
afterwards, which ZeRO would already have consumed).
Growth flips mask bits; masked A rows keep their (seeded) initial values and B columns stay zero, so a new rank
starts as initialised, the model's output does not move, and nothing else has to be written — which keeps
optimizers that hold their own master copy of the weights (DeepSpeed, FSDP mixed precision) consistent.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .signals import RankImportance, RoutingFrequency, in_backward

logger = logging.getLogger(__name__)
_warned_fallback = False


def _grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cuda":  # the CUDA kernel takes bfloat16 on SM >= 80
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    if x.device.type != "cpu":
        return False
    # the CPU kernel needs 16-byte aligned strides and data pointers
    size = x.element_size()
    return (x.shape[1] * size) % 16 == 0 and (w.shape[2] * size) % 16 == 0 and x.data_ptr() % 16 == 0 \
        and w.data_ptr() % 16 == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [N, K] sorted by expert, times that expert's `w` [E, K, M]; `offsets` are cumulative row ends."""
    x = x.to(w.dtype)
    if _grouped_mm_usable(x, w):
        return F.grouped_mm(x, w, offs=offsets)
    global _warned_fallback
    if not _warned_fallback:
        logger.warning("torch.nn.functional.grouped_mm is unavailable for these shapes/device (%s, K=%d, M=%d); "
                       "using a per-expert loop, which is slower at large expert counts.", x.device.type,
                       x.shape[1], w.shape[2])
        _warned_fallback = True
    pieces, start = [], 0
    for expert, end in enumerate(offsets.tolist()):
        pieces.append(x[start:end] @ w[expert])
        start = end
    pieces.append(x.new_zeros(x.shape[0] - start, w.shape[2]))  # rows past the last offset (none when routed)
    return torch.cat(pieces)


def _grouped_linear(x, weight, offsets, bias, is_transposed):
    out = grouped_mm(x, weight if is_transposed else weight.transpose(-2, -1), offsets)
    if bias is not None:
        out.add_(bias)
    return out


def kaiming_init(num_experts: int, rank: int, in_features: int, seed: int) -> torch.Tensor:
    """A's initial values, as nn.Linear would draw them (U(±1/sqrt(in))); the same on every device and process."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)
    return torch.empty(num_experts, rank, in_features).uniform_(-bound, bound, generator=generator)


class ExpertLoRA(nn.Module):
    """Per-expert LoRA of one projection (gate, up or down) with an active-rank mask."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r_max: int, r_init: int,
                 scaling: float, dropout: float, seed: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.num_experts, self.in_features, self.out_features, self.r_max = num_experts, in_features, out_features, r_max
        self.scaling = scaling
        self.seed = seed
        self.lora_A = nn.Parameter(kaiming_init(num_experts, r_max, in_features, seed).to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r_max, device=device, dtype=dtype))
        mask = (torch.arange(r_max, device=device) < r_init).expand(num_experts, r_max).clone()
        self.register_buffer("rank_mask", mask)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.importance = RankImportance(num_experts, r_max).to(device)
        self.importance.attach(self.lora_A, self.lora_B)

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """LoRA output [N, out] for rows of `x_sorted` [N, in] grouped by expert (`expert_ids` [N], sorted)."""
        h = grouped_mm(self.dropout(x_sorted), self.lora_A.transpose(1, 2), offsets)
        # the mask and the scaling act on the rank activations h [N, r], row by row: far fewer elements than
        # masking A [E, r, in] at large E, and a masked rank's h column is zero, so its A row and B column get
        # exactly zero gradient
        rank_scale = (self.rank_mask.to(h.dtype) * self.scaling)[expert_ids]
        return grouped_mm(h * rank_scale, self.lora_B.transpose(1, 2), offsets)

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
        if int(new_ranks.sum()) == 0:
            return
        initial = kaiming_init(self.num_experts, self.r_max, self.in_features, self.seed)
        ranks = self.ranks().tolist()
        for expert, extra in enumerate(new_ranks.tolist()):
            if extra <= 0:
                continue
            start, stop = ranks[expert], ranks[expert] + extra
            if stop > self.r_max:
                raise ValueError(f"expert {expert} cannot grow to {stop} ranks: r_max is {self.r_max}.")
            self.lora_A[expert, start:stop] = initial[expert, start:stop].to(self.lora_A)
            self.lora_B[expert, :, start:stop] = 0
            self.rank_mask[expert, start:stop] = True

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B diag(m) A as [E, out, in] in float32 — for merging only, never in training."""
        a = self.lora_A.float() * self.rank_mask.unsqueeze(-1)
        return self.scaling * torch.bmm(self.lora_B.float(), a)


class ExpertsAdapter(nn.Module):
    """Everything drlora attaches to one experts module: per-projection LoRA and the routing frequency."""

    def __init__(self, layer, projections: dict[str, ExpertLoRA]):
        super().__init__()
        self.layer_index = layer.index
        self.projections = nn.ModuleDict(projections)
        self.frequency = RoutingFrequency(layer.num_experts).to(next(iter(projections.values())).lora_A.device)
        self.slices = {name: layer.out_slice(name) for name in projections}

    def ranks(self) -> torch.Tensor:
        """Active ranks per expert [E]; all adapted projections of an expert share its rank."""
        return next(iter(self.projections.values())).ranks()


def dr_lora_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts forward with DR-LoRA, bound to a transformers fused-experts module (`self`).

    Mirrors transformers' grouped_mm experts implementation op for op, so with B = 0 the output is the base
    model's exactly, and adds the LoRA terms on the routed tokens, grouped by expert.
    """
    adapter: ExpertsAdapter = self.dr_lora
    if self.training and not in_backward():  # count real training forwards once, not checkpoint recomputes
        adapter.frequency.record(top_k_index, top_k_weights.detach())
    num_tokens, hidden_dim = hidden_states.shape
    num_top_k = top_k_index.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states[perm // num_top_k]
    sample_weights = top_k_weights.reshape(-1)[perm]
    counts_input = expert_ids.float() if hidden_states.device.type in ("cpu", "mps") else expert_ids.int()
    counts = torch.histc(counts_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)

    up_weight = self.gate_up_proj if self.has_gate else self.up_proj
    up_bias = None
    if self.has_bias:
        up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[expert_ids]
    proj = _grouped_linear(x, up_weight, offsets, up_bias, self.is_transposed)
    for name in ("gate", "up"):
        if name in adapter.projections:
            proj[:, adapter.slices[name]] += adapter.projections[name](x, offsets, expert_ids)
    hidden = self._apply_gate(proj) if self.has_gate else self.act_fn(proj)

    down_bias = self.down_proj_bias[expert_ids] if self.has_bias else None
    out = _grouped_linear(hidden, self.down_proj, offsets, down_bias, self.is_transposed)
    if "down" in adapter.projections:
        out += adapter.projections["down"](hidden, offsets, expert_ids)
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)

    weighted = out * sample_weights.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    return weighted[inverse].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


class LinearLoRA(nn.Module):
    """Plain uniform-rank LoRA for an nn.Linear outside the routed experts (attention, shared experts).

    Attached as a forward hook so the base module and its state_dict keys stay untouched.
    """

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float, seed: int):
        super().__init__()
        weight = base.weight
        self.scaling = scaling
        init = kaiming_init(1, rank, base.in_features, seed)[0]
        self.lora_A = nn.Parameter(init.to(device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @staticmethod
    def hook(module: nn.Module, args, output):
        return output + module.dr_lora(args[0]).to(output.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())
