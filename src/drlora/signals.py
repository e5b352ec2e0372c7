"""The two growth signals, kept on-device in buffers so every checkpoint of the model's state_dict carries them.

* `RoutingFrequency` — f: EMA over optimizer steps of the routing weight mass each expert receives, taken from the
  very top-k indices and weights the experts module is called with (so k is right for every family). Counted once
  per real training forward: not in eval mode, and not again when activation checkpointing recomputes the forward
  during backward. Only real tokens count: positions whose attention mask is 0 (padding) do not (`real_tokens`,
  `add_routing`; the static-frequency baselines measure with the same two functions).
* `RankImportance` — g: per rank of one projection, |Σ (∂L/∂A ⊙ A)| over the A row and |Σ (∂L/∂B ⊙ B)| over the B
  column (the same number, see the class), from the gradient accumulated over one optimizer step. The LoRA's
  backward adds the signed sums of every micro-batch (the sum is linear, so this equals the accumulated gradient's)
  as it computes them, before anything that wraps the parameters (DDP, ZeRO, FSDP) reduces or partitions gradients.

Per-step sums are plain tensors, not buffers, so DistributedDataParallel's buffer broadcast cannot overwrite one
process's sums with another's; they are all-reduced across processes (when torch.distributed is initialised) before
they enter the EMAs, so every process holds the same statistics and makes the same growth decision.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


def in_backward() -> bool:
    """True while the autograd engine runs (e.g. an activation-checkpointing recompute of the forward)."""
    return torch._C._current_graph_task_id() != -1


_warned_mask_shape = False


def real_tokens(attention_mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    """Which of the `num_tokens` positions an MoE layer routes are real tokens, as a bool [num_tokens] in the order
    the experts see them (batch-major, as transformers flattens [batch, seq]); None when every position counts.

    `attention_mask` is the model's [batch, seq] mask (1 = token, 0 = padding). With a cache the mask also covers the
    past, so the last num_tokens / batch columns are the routed ones. A mask of another shape (a custom 4-D mask)
    cannot be read this way: every position counts, with a warning once.
    """
    global _warned_mask_shape
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2 and num_tokens % attention_mask.shape[0] == 0:
        length = num_tokens // attention_mask.shape[0]
        if 0 < length <= attention_mask.shape[1]:
            return attention_mask[:, attention_mask.shape[1] - length:].reshape(-1) != 0
    if not _warned_mask_shape:
        _warned_mask_shape = True
        logger.warning("drlora: an attention mask of shape %s does not match the %d routed positions; the routing "
                       "frequency counts every position, padding included.", tuple(attention_mask.shape), num_tokens)
    return None


def add_routing(mass: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                real: torch.Tensor | None, hits: torch.Tensor | None = None):
    """Add each expert's routing weight over the real tokens to `mass` [E] (and how many real tokens chose it to
    `hits`); returns the number of real tokens (a tensor where `real` is given: no host sync)."""
    index, weights = top_k_index.reshape(-1), top_k_weights.detach().to(mass.dtype)
    keep = None if real is None else real.to(mass.device, mass.dtype).unsqueeze(-1).expand_as(weights)
    mass.index_add_(0, index, (weights if keep is None else weights * keep).reshape(-1))
    if hits is not None:
        hits.index_add_(0, index, (torch.ones_like(weights) if keep is None else keep).reshape(-1))
    return top_k_index.shape[0] if real is None else real.sum()


def _moved(step_sum: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-step sum (a plain attribute, not a buffer) on `like`'s device; zeros when it was on the meta device,
    which holds no values (a model built there and materialised with `to_empty`)."""
    if step_sum.is_meta and not like.is_meta:
        return torch.zeros(step_sum.shape, dtype=step_sum.dtype, device=like.device)
    return step_sum.to(like.device)


class RoutingFrequency(nn.Module):
    """Routing weight mass per expert: per-step sums (not saved) and their EMA (saved)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.register_buffer("ema", torch.zeros(num_experts))
        self.step_mass = torch.zeros(num_experts)
        self.step_tokens = torch.zeros(())

    def _apply(self, fn, recurse=True):  # keep the per-step sums on the module's device
        super()._apply(fn, recurse)
        self.step_mass, self.step_tokens = _moved(self.step_mass, self.ema), _moved(self.step_tokens, self.ema)
        return self

    @torch.no_grad()
    def reset(self) -> None:
        """No routing seen yet (as constructed)."""
        self.ema.zero_()
        self.clear_step()

    @torch.no_grad()
    def record(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, real: torch.Tensor | None = None) -> None:
        """Add one forward's routing (`real`: which of its positions are real tokens, None for all)."""
        self.step_tokens.add_(add_routing(self.step_mass, top_k_index, top_k_weights, real))

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
    """Per-rank |grad·weight| sensitivity of one projection's LoRA factors.

    The A-side sum of rank j, Σ_k (∂L/∂A ⊙ A)_jk, and the B-side sum, Σ_k (∂L/∂B ⊙ B)_kj, are the same number: A_j
    and B_j reach the loss only through the rank's activation h_j on each routed row, so both equal
    Σ_rows h_j · ∂L/∂h_j — the first-order change of the loss when rank j's output is scaled. One sum therefore
    serves both sides; it costs O(rows × rank) from the backward's rank activations instead of two
    O(experts × rank × features) products with the weight gradients. The 'product' combination of the two sides
    is its square, the 'sum' combination twice it.
    """

    def __init__(self, num_experts: int, r_max: int):
        super().__init__()
        self.register_buffer("ema", torch.zeros(num_experts, r_max))
        self.step_sum = torch.zeros(num_experts, r_max)

    def _apply(self, fn, recurse=True):  # keep the per-step sums on the module's device
        super()._apply(fn, recurse)
        self.step_sum = _moved(self.step_sum, self.ema)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "ema_a" in state_dict and prefix + "ema" not in state_dict:  # drlora 0.1 kept both sides
            state_dict[prefix + "ema"] = state_dict.pop(prefix + "ema_a")
            state_dict.pop(prefix + "ema_b", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def accumulate(self, h_times_grad: torch.Tensor, expert_ids: torch.Tensor) -> None:
        """Add one backward's h_j · ∂L/∂h_j [rows, w] (the first w ranks) to each row's expert."""
        self.step_sum[:, :h_times_grad.shape[1]].index_add_(0, expert_ids, h_times_grad.to(self.step_sum.dtype))

    @torch.no_grad()
    def update(self, beta: float) -> None:
        self.ema.mul_(beta).add_(self.step_sum.abs(), alpha=1.0 - beta)
        self.clear_step()

    def clear_step(self) -> None:
        self.step_sum.zero_()

    @torch.no_grad()
    def reset(self) -> None:
        """Start the EMA afresh (after a growth event, ranks and their meaning changed)."""
        self.ema.zero_()

    def per_rank(self, mode: str) -> torch.Tensor:
        """Combined sensitivity [E, r_max]: A-side × B-side ('product', the paper) or A + B ('sum')."""
        return self.ema * self.ema if mode == "product" else 2.0 * self.ema

    def per_expert(self, mode: str, mask: torch.Tensor) -> torch.Tensor:
        """Mean combined sensitivity over each expert's active ranks: [E]."""
        active = mask.to(self.ema.dtype)
        return (self.per_rank(mode) * active).sum(-1) / active.sum(-1).clamp_min(1.0)


@torch.no_grad()
def all_reduce_step_sums(frequencies: list[RoutingFrequency], importances: list[RankImportance]) -> None:
    """Sum routing mass and tokens, and average grad·weight sums, over processes — in one collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    parts = [t for f in frequencies for t in (f.step_mass, f.step_tokens.reshape(1))]
    parts += [imp.step_sum.reshape(-1) for imp in importances]
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
        n = imp.step_sum.numel()
        # the effective gradient of data parallelism is the mean of the processes' gradients
        imp.step_sum.copy_(flat[offset:offset + n].reshape(imp.step_sum.shape) / world)
        offset += n
