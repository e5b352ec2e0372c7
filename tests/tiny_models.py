"""Tiny random MoE models of several transformers families, built from configs (no hub)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

_COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)

# family -> config overrides: 8 experts, top-2, expert width 16 (all strides 16-byte aligned).
FAMILY_OVERRIDES: dict[str, dict] = {
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, intermediate_size=32, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32,
                        n_shared_experts=1, first_k_dense_replace=0, n_group=2, topk_group=1,
                        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, sliding_window=16,
                    head_dim=8, layer_types=["sliding_attention", "full_attention"]),
}

FAMILIES = tuple(FAMILY_OVERRIDES)


def tiny_moe(family: str = "olmoe", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A tiny random MoE causal LM of `family` in eval mode."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **{**_COMMON, **FAMILY_OVERRIDES[family], **overrides})
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def token_batch(seed: int = 0, batch: int = 4, length: int = 16, vocab: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def small_config(**overrides):
    """A DR-LoRA config sized for tiny models: ranks 2 → 4 (of 8), three growth events in 12 steps."""
    from drlora import DRLoRAConfig

    values = dict(r_init=2, r_target=4, r_max=8, total_steps=12, growth_interval=3, warmup_ratio=0.1,
                  max_grow_per_event=2, lora_dropout=0.0)
    values.update(overrides)
    return DRLoRAConfig(**values)


def train(model, steps: int, lr: float = 1e-2, weight_decay: float = 0.0, start: int = 0, data_seed: int = 0,
          optimizer=None):
    """Plain loop: forward, backward, update_and_allocate, step. Returns the optimizer and the growth events."""
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    events = []
    model.train()
    for step in range(start, start + steps):
        x = token_batch(seed=data_seed * 100_003 + step)
        model(x, labels=x).loss.backward()
        event = model.update_and_allocate(step)
        if event is not None:
            events.append(event)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return optimizer, events
