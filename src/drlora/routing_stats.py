"""Routing statistics of a model on some data, measured before training (the static and ESFT baselines need them).

Forward pre-hooks on every fused-experts module read the top-k indices and weights the experts are called with —
the same tensors DR-LoRA's routing frequency uses, so k and the weights are right for every family — and count them
with the frequency's own functions (signals.real_tokens, add_routing), so padding is left out the same way. Every
process measures the same rows, so every process allocates the same ranks.
"""

from __future__ import annotations

import torch

from .evaluate import eval_mode
from .layout import find_moe_layers
from .signals import add_routing, real_tokens


@torch.no_grad()
def measure_routing(model, sequences: list[list[int]], batch_size: int = 8, pad_token_id: int = 0) -> dict:
    """{"gate": [L, E] mean routing weight per token (0 where not selected), "token": [L, E] fraction of tokens that
    select the expert, "tokens": count} over `sequences` of token ids (ESFT's gate and token scores)."""
    if not sequences:
        raise ValueError("no sequences to measure the routing on; give at least one training row.")
    layers = find_moe_layers(model)
    device = next(model.parameters()).device
    mass = torch.zeros(len(layers), layers[0].num_experts, dtype=torch.float64)
    hits = torch.zeros_like(mass)
    state = {"mask": None}

    def hook_for(index):
        def hook(module, args, kwargs):
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            top_k_weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            real = real_tokens(state["mask"], top_k_index.shape[0])  # as DR-LoRA's routing frequency counts them
            add_routing(mass[index], top_k_index.cpu(), top_k_weights.cpu(), None if real is None else real.cpu(),
                        hits=hits[index])
        return hook

    handles = [layer.experts.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    tokens = 0
    try:
        with eval_mode(model):
            for start in range(0, len(sequences), batch_size):
                chunk = sequences[start:start + batch_size]
                width = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
                mask = torch.zeros(len(chunk), width, dtype=torch.long)
                for row, seq in enumerate(chunk):
                    ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = 1
                state["mask"] = mask
                model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1, use_cache=False)
                tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return {"gate": (mass / tokens).float(), "token": (hits / tokens).float(), "tokens": tokens}
