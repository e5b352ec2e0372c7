"""The two growth signals, kept on-device in buffers so every checkpoint of the model's state_dict carries them.

* `RoutingFrequency` — f: EMA over optimizer steps of the routing weight mass each expert receives, taken from the
  very top-k indices and weights the experts module is called with (so k is right for every family). Counted once
  per real training forward: not in eval mode, and not again when activation checkpointing recomputes the forward
  during backward.
* `RankImportance` — g: per rank of one projection, |Σ (∂L/∂A ⊙ A)| over the A row and |Σ (∂L/∂B ⊙ B)| over the B
  column, from the gradient accumulated over one optimizer step. Gradient hooks sum the signed products per
  micro-batch (the sum is linear, so this equals the product of the accumulated gradient), which works whatever
  wraps the parameters afterwards (DDP, ZeRO, FSDP).

Per-step sums are plain tensors, not buffers, so DistributedDataParallel's buffer broadcast cannot overwrite one
process's sums with another's; they are all-reduced across processes (when torch.distributed is initialised) before they enter the EMAs,
so every process holds the same statistics and makes the same growth decision.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def in_backward() -> bool:
    """True while the autograd engine runs (e.g. an activation-checkpointing recompute of the forward)."""
    return torch._C._current_graph_task_id() != -1


class RoutingFrequency(nn.Module):
    """Routing weight mass per expert: per-step sums (not saved) and their EMA (saved)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.register_buffer("ema", torch.zeros(num_experts))
        self.step_mass = torch.zeros(num_experts)
        self.step_tokens = torch.zeros(())

    def _apply(self, fn, recurse=True):  # keep the per-step sums on the module's device
        super()._apply(fn, recurse)
        self.step_mass, self.step_tokens = self.step_mass.to(self.ema.device), self.step_tokens.to(self.ema.device)
        return self

    @torch.no_grad()
    def record(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        self.step_mass.index_add_(0, top_k_index.reshape(-1), top_k_weights.reshape(-1).to(self.step_mass.dtype))
        self.step_tokens.add_(top_k_index.shape[0])

    @torch.no_grad()
    def update(self, beta: float) -> None:
        """Fold this step's mean routing weight (0 for tokens that did not pick the expert) into the EMA."""
        mean = self.step_mass / self.step_tokens.clamp_min(1.0)
        self.ema.mul_(beta).add_(mean, alpha=1.0 - beta)
        self.clear_step()

    def clear_step(self) -> None:
        self.step_mass.zero_()
        self.step_tokens.zero_()


class RankImportance(nn.Module):
    """Per-rank |grad·weight| sensitivity of one projection's LoRA factors, A side and B side."""

    def __init__(self, num_experts: int, r_max: int):
        super().__init__()
        self.register_buffer("ema_a", torch.zeros(num_experts, r_max))
        self.register_buffer("ema_b", torch.zeros(num_experts, r_max))
        self.step_a = torch.zeros(num_experts, r_max)
        self.step_b = torch.zeros(num_experts, r_max)
        self._handles: list = []

    def _apply(self, fn, recurse=True):  # keep the per-step sums on the module's device
        super()._apply(fn, recurse)
        self.step_a, self.step_b = self.step_a.to(self.ema_a.device), self.step_b.to(self.ema_a.device)
        return self

    def attach(self, lora_A: nn.Parameter, lora_B: nn.Parameter) -> None:
        """Sum grad·weight per rank at every backward: A rows [E, r, in] over in, B columns [E, out, r] over out."""
        self.detach_hooks()

        def on_grad_a(grad):
            with torch.no_grad():
                self.step_a.add_((grad.float() * lora_A.float()).sum(-1))

        def on_grad_b(grad):
            with torch.no_grad():
                self.step_b.add_((grad.float() * lora_B.float()).sum(-2))

        self._handles = [lora_A.register_hook(on_grad_a), lora_B.register_hook(on_grad_b)]

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def update(self, beta: float) -> None:
        self.ema_a.mul_(beta).add_(self.step_a.abs(), alpha=1.0 - beta)
        self.ema_b.mul_(beta).add_(self.step_b.abs(), alpha=1.0 - beta)
        self.clear_step()

    def clear_step(self) -> None:
        self.step_a.zero_()
        self.step_b.zero_()

    @torch.no_grad()
    def reset(self) -> None:
        """Start the EMA afresh (after a growth event, ranks and their meaning changed)."""
        self.ema_a.zero_()
        self.ema_b.zero_()

    def per_rank(self, mode: str) -> torch.Tensor:
        """Combined sensitivity [E, r_max]: A-side × B-side ('product', the paper) or A + B ('sum')."""
        return self.ema_a * self.ema_b if mode == "product" else self.ema_a + self.ema_b

    def per_expert(self, mode: str, mask: torch.Tensor) -> torch.Tensor:
        """Mean combined sensitivity over each expert's active ranks: [E]."""
        active = mask.to(self.ema_a.dtype)
        return (self.per_rank(mode) * active).sum(-1) / active.sum(-1).clamp_min(1.0)


@torch.no_grad()
def all_reduce_step_sums(frequencies: list[RoutingFrequency], importances: list[RankImportance]) -> None:
    """Sum routing mass and tokens, and average grad·weight sums, over processes — in one collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    parts = [t for f in frequencies for t in (f.step_mass, f.step_tokens.reshape(1))]
    parts += [t.reshape(-1) for imp in importances for t in (imp.step_a, imp.step_b)]
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    world = dist.get_world_size()
    offset = 0
    for f in frequencies:
        for t in (f.step_mass, f.step_tokens):
            n = t.numel()
            t.copy_(flat[offset:offset + n].reshape(t.shape))
            offset += n
    for imp in importances:
        for t in (imp.step_a, imp.step_b):
            n = t.numel()
            # the effective gradient of data parallelism is the mean of the processes' gradients
            t.copy_(flat[offset:offset + n].reshape(t.shape) / world)
            offset += n
