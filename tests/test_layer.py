"""Invariants of the expert-LoRA layer on tiny models of several families: exactness at init, inert masked ranks,
function-preserving growth, dtype, and how routing statistics are counted."""

import pytest
import torch

from drlora import get_dr_lora_model
from drlora.layer import kaiming_init
from tiny_models import FAMILIES, small_config, tiny_moe, token_batch, train


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).logits.clone()


@pytest.mark.parametrize("family", FAMILIES)
def test_output_equals_base_at_init(family):
    base = tiny_moe(family)
    x = token_batch()
    reference = logits(base, x)
    model = get_dr_lora_model(base, small_config(target_projections=("gate", "up", "down")))
    assert torch.equal(logits(model, x), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_ranks_are_inert_and_get_zero_gradient(family):
    model = get_dr_lora_model(tiny_moe(family), small_config(target_projections=("gate", "up", "down")))
    x = token_batch()
    with torch.no_grad():  # non-trivial active ranks
        for lora in model.expert_loras():
            lora.lora_B.normal_(0, 0.1)
            lora.lora_B.mul_(lora.rank_mask.unsqueeze(1))
    before = logits(model, x)
    with torch.no_grad():  # scribble over every masked rank
        for lora in model.expert_loras():
            masked = ~lora.rank_mask
            lora.lora_A[masked] = torch.randn_like(lora.lora_A[masked])
            lora.lora_B.copy_(torch.where(masked.unsqueeze(1), torch.randn_like(lora.lora_B), lora.lora_B))
    assert torch.equal(logits(model, x), before)
    model.train()
    model(x, labels=x).loss.backward()
    for lora in model.expert_loras():
        masked = ~lora.rank_mask
        assert lora.lora_A.grad[masked].abs().max() == 0
        assert lora.lora_B.grad.transpose(1, 2)[masked].abs().max() == 0
        assert lora.lora_B.grad.abs().max() > 0  # active ranks do learn


@pytest.mark.parametrize("family", FAMILIES)
def test_growth_event_leaves_logits_unchanged(family):
    model = get_dr_lora_model(tiny_moe(family), small_config())
    train(model, steps=2)  # before the first event (step 2): B is non-zero now
    x = token_batch(seed=99)
    before = logits(model, x)
    for lora in model.expert_loras():
        lora.grow(torch.arange(lora.num_experts) % 3)
    assert torch.equal(logits(model, x), before)


def test_weight_decay_cannot_move_masked_ranks_and_new_ranks_start_as_initialised():
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config(total_steps=40, growth_interval=10))
    train(model, steps=3, lr=0.1, weight_decay=0.5)  # through the first growth event (step 4 is the first)
    for lora in model.expert_loras():
        masked = ~lora.rank_mask
        assert lora.lora_B.transpose(1, 2)[masked].abs().max() == 0
        before = lora.ranks().clone()
        lora.grow(torch.ones(lora.num_experts, dtype=torch.long))
        initial = kaiming_init(lora.num_experts, lora.r_max, lora.in_features, lora.seed)
        for expert, r in enumerate(before.tolist()):
            assert torch.equal(lora.lora_A[expert, r], initial[expert, r])


def test_ranks_grow_only_where_saliency_points_and_budget_is_exact():
    model = get_dr_lora_model(tiny_moe("mixtral"), small_config())
    _, events = train(model, steps=12)
    assert [e.step for e in events] == list(model.schedule.events)
    ranks = model.rank_map()
    assert ranks.shape == (2, 8)
    assert (ranks.sum(-1) == 8 * 4).all()
    assert ranks.min() >= 2 and ranks.max() <= 8


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_bf16_forward_backward(family):
    base = tiny_moe(family, dtype=torch.bfloat16)
    x = token_batch()
    reference = logits(base, x)
    model = get_dr_lora_model(base, small_config())
    assert all(lora.lora_A.dtype == torch.bfloat16 for lora in model.expert_loras())
    assert torch.equal(logits(model, x), reference)
    train(model, steps=4)
    assert torch.isfinite(logits(model, x)).all()
    assert (model.rank_map().sum(-1) <= 8 * 4).all()


def _step_tokens(model):
    return [float(a.frequency.step_tokens) for a in model.adapters]


@pytest.mark.parametrize("reentrant", [False, True])
def test_routing_counted_once_per_training_forward_not_in_eval_or_recompute(reentrant):
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config())
    x = token_batch()
    logits(model, x)  # eval forward: not counted
    assert _step_tokens(model) == [0.0, 0.0]
    model.train()
    model(x, labels=x).loss.backward()
    plain = _step_tokens(model)
    assert plain == [float(x.numel())] * 2
    for a in model.adapters:
        a.frequency.step_tokens.zero_()
    model.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    model(x, labels=x).loss.backward()
    assert _step_tokens(model) == plain


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_frequency_uses_the_weights_experts_receive(family):
    model = get_dr_lora_model(tiny_moe(family), small_config())
    seen = {}
    experts = model.moe_layers[0].experts
    handle = experts.register_forward_pre_hook(lambda m, args: seen.setdefault("args", args))
    model.train()
    x = token_batch()
    model(x, labels=x)
    handle.remove()
    _, index, weights = seen["args"]
    expected = torch.zeros(8).index_add_(0, index.reshape(-1), weights.reshape(-1).float())
    torch.testing.assert_close(model.adapters[0].frequency.step_mass, expected)
