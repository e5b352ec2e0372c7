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

# More families decorated with use_experts_implementation, for the one-code-path smoke test.
MORE_FAMILY_OVERRIDES: dict[str, dict] = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32,
                      head_dim=8),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32,
                        n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4, n_group=1,
                        topk_group=1),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16),
    "qwen3_next": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16, intermediate_size=32, head_dim=8,
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                       linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"]),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32,
                     first_k_dense_replace=0, head_dim=8, n_group=1, topk_group=1),
    "nemotron_h": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32,
                       head_dim=8, hybrid_override_pattern="E*", layers_block_type=["moe", "attention"],
                       mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=1, n_group=1, topk_group=1,
                       moe_shared_expert_intermediate_size=16,  # experts without a gate (has_gate=False)
                       use_cache=False),  # transformers 5.25's NemotronH forward fails on its own empty cache
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=16, intermediate_size=32,
                         moe_layer_start_index=0),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, moe_intermediate_size=16, intermediate_size=16, head_dim=8),
    "minimax": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, head_dim=8,
                    layer_types=["full_attention", "full_attention"]),
}


def tiny_moe(family: str = "olmoe", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A tiny random MoE causal LM of `family` in eval mode."""
    torch.manual_seed(seed)
    family_overrides = FAMILY_OVERRIDES[family] if family in FAMILY_OVERRIDES else MORE_FAMILY_OVERRIDES[family]
    cfg = AutoConfig.for_model(family, **{**_COMMON, **family_overrides, **overrides})
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def token_batch(seed: int = 0, batch: int = 4, length: int = 16, vocab: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


class TokenRows(torch.utils.data.Dataset):
    """64 rows of 16 random token ids, each its own label: a Trainer's training set for a tiny model."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = token_batch(seed=i, batch=1)[0]
        return {"input_ids": ids, "labels": ids.clone()}


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



WORDS = "the cat dog sat ran on mat a big small red blue yes no".split()
SPECIALS = ["[UNK]", "[EOS]", "\n"]
EOS, NEWLINE = 1, 2


def tiny_tokenizer(eos: bool = True):
    """A word-level tokenizer whose 128 ids cover the tiny models' whole vocabulary (so every generated id decodes):
    [UNK], [EOS] (optional), a newline token, a few words, then filler words w17..w127. No pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + [f"w{i}" for i in range(len(SPECIALS) + len(WORDS), 128)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **({"eos_token": "[EOS]"} if eos else {}))


def save_tiny_checkpoint(folder, family: str = "olmoe"):
    """A tiny MoE and its tokenizer saved as a checkpoint folder, as `drlora train model=FOLDER` reads one."""
    model = tiny_moe(family)
    model.generation_config.eos_token_id = 1
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
