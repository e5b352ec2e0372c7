"""The growth signals measure what they claim whatever the batching: padding does not count, activation checkpointing
changes nothing, and k micro-batches of an optimizer step give the statistics of one batch k times larger."""

import pytest
import torch
import torch.nn.functional as F

from drlora import get_dr_lora_model
from drlora.routing_stats import measure_routing
from tiny_models import small_config, tiny_moe

LENGTHS = [16, 12, 9, 5, 14, 7, 16, 3]


def rows(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=generator) for n in LENGTHS]


def left_padded(sequences, extra=0, pad=0):
    """A batch as drlora's recipe collates it: left padding, attention mask, positions counted over real tokens."""
    width = max(len(s) for s in sequences) + extra
    ids = torch.full((len(sequences), width), pad)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}


def model_with_live_lora(family="olmoe"):
    """B ≠ 0, so the LoRA's rank activations get gradients and the importance is not trivially zero."""
    model = get_dr_lora_model(tiny_moe(family), small_config())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in model.expert_loras():
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=generator) * 0.1)
    return model.train()


def step_sums(model):
    frequencies = [a.frequency for a in model.adapters]
    return ([f.step_mass.clone() for f in frequencies], [float(f.step_tokens) for f in frequencies],
            [lora.importance.step_sum.clone() for lora in model.expert_loras()])


def assert_same_sums(got, expected):
    for g, e in zip(got[0] + got[2], expected[0] + expected[2]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert got[1] == expected[1]


def summed_loss(model, batch, total_tokens):
    """Next-token loss summed over real positions, over `total_tokens`: additive over micro-batches."""
    logits, mask = model(**batch).logits[:, :-1], batch["attention_mask"]
    labels = batch["input_ids"][:, 1:].masked_fill((mask[:, :-1] == 0) | (mask[:, 1:] == 0), -100)  # real → real
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum") / total_tokens


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_routing_frequency_counts_real_tokens_only(family):
    model = model_with_live_lora(family)
    sequences = rows()
    with torch.no_grad():
        model(**left_padded(sequences, extra=8))  # every row padded, by 8 to 21 positions
    padded = step_sums(model)
    for a in model.adapters:
        a.frequency.clear_step()
    with torch.no_grad():
        for seq in sequences:  # each row alone: no padding at all
            model(input_ids=seq[None])
    alone = step_sums(model)
    assert alone[1] == [float(sum(LENGTHS))] * len(model.adapters)
    assert_same_sums(padded, alone)  # counting the pads changed f by ~37 % (relative) on a Qwen3-MoE


def test_a_loop_that_calls_the_backbone_directly_counts_real_tokens_too():
    """TRL's fused LM-head loss calls `model.base_model` (the backbone) and never the wrapper's forward."""
    model = model_with_live_lora()
    batch = left_padded(rows(), extra=8)
    with torch.no_grad():
        model(**batch)
    through_wrapper = step_sums(model)
    for a in model.adapters:
        a.frequency.clear_step()
    with torch.no_grad():
        model.base_model(**batch)
    assert_same_sums(step_sums(model), through_wrapper)
    assert through_wrapper[1] == [float(sum(LENGTHS))] * len(model.adapters)


def test_static_frequency_baseline_and_dr_lora_measure_the_same_routing_frequency():
    base = tiny_moe("qwen2_moe")
    sequences = rows()
    measured = measure_routing(base, [s.tolist() for s in sequences], batch_size=3)  # right-padded, in eval mode
    model = get_dr_lora_model(tiny_moe("qwen2_moe"), small_config()).train()  # B = 0: the base model's routing
    with torch.no_grad():
        model(**left_padded(sequences, extra=4))  # left-padded, in training mode
    frequency = torch.stack([a.frequency.step_mass / a.frequency.step_tokens for a in model.adapters])
    assert measured["tokens"] == sum(LENGTHS)
    torch.testing.assert_close(frequency, measured["gate"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reentrant", [False, True])
def test_statistics_are_the_same_with_activation_checkpointing(reentrant):
    batch = left_padded(rows(), extra=2)
    model = model_with_live_lora()
    summed_loss(model, batch, 1.0).backward()
    plain = step_sums(model)
    assert all(s.abs().sum() > 0 for s in plain[2])  # the importance is live, so the comparison is not vacuous
    model = model_with_live_lora()
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    summed_loss(model, batch, 1.0).backward()
    assert_same_sums(step_sums(model), plain)


def test_statistics_of_micro_batches_equal_one_batch_k_times_larger():
    sequences = rows()
    total = sum(n - 1 for n in LENGTHS)  # predicted positions
    model = model_with_live_lora()
    summed_loss(model, left_padded(sequences), total).backward()
    whole = step_sums(model)
    model.update_and_allocate(0)
    whole_ema = [a.frequency.ema.clone() for a in model.adapters], [lora.importance.ema.clone()
                                                                    for lora in model.expert_loras()]
    model = model_with_live_lora()
    for start in range(0, len(sequences), 3):  # three micro-batches of different widths: 3 + 3 + 2 rows
        summed_loss(model, left_padded(sequences[start:start + 3]), total).backward()
    assert_same_sums(step_sums(model), whole)
    model.update_and_allocate(0)
    for got, expected in zip([a.frequency.ema for a in model.adapters], whole_ema[0]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    for got, expected in zip([lora.importance.ema for lora in model.expert_loras()], whole_ema[1]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
