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
