"""DR-LoRA in a bf16 model: float32 masters for what trains, so the paper's learning rate moves it; saving, loading,
merging, exporting and resuming keep each tensor's dtype and reproduce the trained model."""

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file

from drlora import get_dr_lora_model, load_dr_lora_model
from drlora.saving import restore_training_state
from tiny_models import small_config, tiny_moe, token_batch, train


def run(dtype, lr, steps, adapter_dtype=None, same_batch=False):
    """Train a tiny Qwen3-MoE (identical initial weights in every dtype, router trained from step 0) with AdamW; returns
    (losses, fraction of active A entries moved, of active B entries moved, of router entries moved, ΔA, Δrouter)."""
    model = get_dr_lora_model(tiny_moe("qwen3_moe").to(dtype),
                              small_config(total_steps=20, warmup_ratio=0.0, growth_interval=5,
                                           **({"adapter_dtype": adapter_dtype} if adapter_dtype else {})))
    loras, routers = model.expert_loras(), [layer.router.weight for layer in model.moe_layers]
    a0, r0 = [lora.lora_A.detach().float().clone() for lora in loras], [r.detach().float().clone() for r in routers]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        x = token_batch(seed=0 if same_batch else step)
        loss = model(x, labels=x).loss
        loss.backward()
        losses.append(loss.item())
        model.update_and_allocate(step)
        optimizer.step()
        optimizer.zero_grad()
    active = [lora.rank_mask.unsqueeze(-1).expand_as(lora.lora_A) for lora in loras]  # no growth in these steps
    moved_a = sum(int(((lora.lora_A.float() != a) & m).sum()) for lora, a, m in zip(loras, a0, active))
    moved_b = sum(int(((lora.lora_B != 0) & lora.rank_mask.unsqueeze(1)).sum()) for lora in loras)
    moved_r = sum(int((r.float() != r_init).sum()) for r, r_init in zip(routers, r0))
    delta_a = torch.cat([(lora.lora_A.detach().float() - a).flatten() for lora, a in zip(loras, a0)])
    delta_r = torch.cat([(r.detach().float() - r_init).flatten() for r, r_init in zip(routers, r0)])
    active_b = sum(int(lora.rank_mask.sum()) * lora.out_features for lora in loras)
    return (losses, moved_a / sum(int(m.sum()) for m in active), moved_b / active_b,
            moved_r / sum(r.numel() for r in r0), delta_a, delta_r)


def cosine(u, v):
    return float(torch.nn.functional.cosine_similarity(u, v, dim=0))


def test_adapters_and_router_of_a_bf16_model_train_at_the_papers_learning_rate_like_float32():
    # 5 AdamW steps at lr 2e-5 (step 0's B = 0 leaves A a zero gradient; it moves from step 1 on)
    _, a32, b32, r32, delta_a32, delta_r32 = run(torch.float32, 2e-5, 5)
    _, a, b, r, delta_a, delta_r = run(torch.bfloat16, 2e-5, 5)
    assert min(a32, b32, r32) >= 0.95, (a32, b32, r32)
    assert min(a, b, r) >= 0.95, (a, b, r)  # bf16 factors: 1.5 % of A and 30 % of the router moved
    # and they move as in float32: the same direction and size (bf16 factors: cosine 0.12, 13 % of the size)
    assert cosine(delta_a, delta_a32) > 0.9 and cosine(delta_r, delta_r32) > 0.9
    assert 0.9 < float(delta_a.norm() / delta_a32.norm()) < 1.1


def test_adapter_dtype_base_keeps_the_factors_in_bf16_and_documents_why_that_barely_trains():
    _, a, _, r, _, _ = run(torch.bfloat16, 2e-5, 5, adapter_dtype="base")
    assert a < 0.5 and r < 0.5, (a, r)


def test_bf16_loss_curve_follows_the_float32_run():
    # one batch, a learning rate at which the tiny model learns: 12 steps take the loss down by ~0.38
    losses32 = run(torch.float32, 3e-2, 12, same_batch=True)[0]
    losses = run(torch.bfloat16, 3e-2, 12, same_batch=True)[0]
    assert losses32[0] - losses32[-1] > 0.2
    # measured 0.0024 at most; bf16 rounding of the forward alone is ~0.004 here (one bf16 step at 4.8 is 0.03)
    assert max(abs(x - y) for x, y in zip(losses, losses32)) < 0.02, (losses, losses32)


def trained_bf16(family="qwen3_moe", **overrides):
    model = get_dr_lora_model(tiny_moe(family, dtype=torch.bfloat16), small_config(**overrides))
    train(model, steps=6, lr=1e-2)  # two growth events, router trained after warmup
    return model


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).logits.float()


def test_base_model_state_dict_keeps_its_keys_and_dtypes_while_the_wrapper_holds_float32_masters():
    fresh = tiny_moe("qwen3_moe", dtype=torch.bfloat16).state_dict()
    model = trained_bf16()
    base_state = model.get_base_model().state_dict()  # the base's keys, plus the adapters' (under experts.dr_lora)
    assert {k: base_state[k].dtype for k in fresh} == {k: v.dtype for k, v in fresh.items()}
    assert all(".dr_lora." in k for k in base_state.keys() - fresh.keys())
    router = model.moe_layers[0].router_name
    # the wrapper's state_dict, which a Trainer checkpoint holds, keeps the master: resuming is exact
    assert model.state_dict()[f"model.{router}.weight"].dtype == torch.float32
    assert torch.equal(base_state[f"{router}.weight"], model.moe_layers[0].router.weight.to(torch.bfloat16))


def test_bf16_save_load_records_dtypes_and_reproduces_logits(tmp_path):
    model = trained_bf16()
    x = token_batch(seed=7)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["dtypes"] == {"base": "bfloat16", "lora": "float32", "router": "float32"}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    loaded = load_dr_lora_model(tiny_moe("qwen3_moe", dtype=torch.bfloat16), tmp_path)
    assert torch.equal(logits(loaded, x), expected)


def test_bf16_merge_gives_a_plain_bf16_model_with_the_same_logits():
    model = trained_bf16()
    x = token_batch(seed=7)
    expected = logits(model, x)
    merged = model.merge_and_unload()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert not any("forward" in layer.router.__dict__ for layer in model.moe_layers)
    # ΔW rounds once into the bf16 weights: bf16's resolution, not an error of the merge
    torch.testing.assert_close(logits(merged, x), expected, atol=0.03, rtol=0.02)


def test_bf16_resume_from_training_state_continues_identically(tmp_path):
    reference = trained_bf16()
    train(reference, steps=4, start=6, lr=1e-2)
    model = trained_bf16()
    model.save_pretrained(tmp_path, include_training_state=True)
    resumed = get_dr_lora_model(tiny_moe("qwen3_moe", dtype=torch.bfloat16), small_config())
    restore_training_state(resumed, tmp_path)
    train(resumed, steps=4, start=6, lr=1e-2)  # a fresh optimizer on both sides would differ: compare the same path
    x = token_batch(seed=7)
    assert torch.equal(resumed.rank_map(), reference.rank_map())
    assert torch.equal(logits(resumed, x), logits(reference, x))


def deepseek_v3_with_a_load_balancing_bias():
    """DeepSeek-V3 picks experts by sigmoid score + a float32 bias (kept in float32 in a bf16 model); real checkpoints
    have close, non-zero biases, whose bf16 rounding (a step of 0.004 at 0.5) changes which experts are picked."""
    model = tiny_moe("deepseek_v3", dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    for layer in model.model.layers:
        bias = layer.mlp.gate.e_score_correction_bias
        bias.copy_(0.5 + 0.002 * torch.randn(bias.shape, generator=generator))
    return model


def test_bf16_peft_export_keeps_the_router_and_its_float32_bias_and_reproduces_logits(tmp_path):
    model = get_dr_lora_model(deepseek_v3_with_a_load_balancing_bias(), small_config())
    train(model, steps=6, lr=1e-2)
    x = token_batch(seed=5)
    expected = logits(model, x)
    model.export_peft(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    biases = [v for k, v in tensors.items() if k.endswith("e_score_correction_bias")]
    assert biases and all(b.dtype == torch.float32 for b in biases)
    assert all(v.dtype == torch.float32 for k, v in tensors.items() if "lora_" in k)
    assert all(v.dtype == torch.bfloat16 for k, v in tensors.items() if k.endswith("modules_to_save.default.weight"))
    peft_model = PeftModel.from_pretrained(deepseek_v3_with_a_load_balancing_bias(), tmp_path).eval()
    # measured 0.002 (PEFT computes the LoRA in float32, drlora in bf16; logits up to 0.42); with the bias rounded to
    # bf16 on export, 0.012
    assert float((logits(peft_model, x) - expected).abs().max()) < 0.005
