"""Growth follows the saliency signal: experts that receive the routing mass and the gradient get the ranks."""

import pytest
import torch

from drlora import get_dr_lora_model
from tiny_models import small_config, tiny_moe, train


def test_skewed_routing_ends_with_a_heterogeneous_rank_map():
    base = tiny_moe("gpt_oss")
    with torch.no_grad():  # gpt_oss routers have a bias: make experts 0 and 1 take nearly every token
        for layer in base.model.layers:
            layer.mlp.router.bias.zero_()
            layer.mlp.router.bias[:2] = 10.0
    model = get_dr_lora_model(base, small_config(train_router=False, total_steps=20, growth_interval=3,
                                                 max_grow_per_event=3))
    train(model, steps=20)
    ranks = model.rank_map()
    assert (ranks.sum(-1) == 8 * 4).all()
    assert (ranks[:, :2] == 8).all(), ranks  # the busy experts grew to r_max
    assert len(set(ranks.flatten().tolist())) > 1


def test_frequency_ema_tracks_routing_mass():
    base = tiny_moe("gpt_oss")
    with torch.no_grad():
        for layer in base.model.layers:
            layer.mlp.router.bias.zero_()
            layer.mlp.router.bias[3] = 10.0
    model = get_dr_lora_model(base, small_config(train_router=False))
    train(model, steps=3)
    for adapter in model.adapters:
        assert int(adapter.frequency.ema.argmax()) == 3


def test_importance_is_reset_after_each_growth_event():
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config())
    train(model, steps=2)
    assert all(lora.importance.ema.abs().sum() > 0 for lora in model.expert_loras())
    train(model, steps=1, start=2)  # step 2 is the first growth event
    for lora in model.expert_loras():
        assert lora.importance.ema.abs().sum() == 0


def test_a_replayed_step_drops_its_statistics():
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config())
    train(model, steps=2)
    ema = [a.frequency.ema.clone() for a in model.adapters]
    train(model, steps=1, start=1)  # step 1 again: ignored, and its sums must not leak into step 2
    assert all(float(a.frequency.step_tokens) == 0 for a in model.adapters)
    assert all(torch.equal(a.frequency.ema, e) for a, e in zip(model.adapters, ema))


def test_a_loop_that_skips_a_growth_event_is_told_which_step_it_missed():
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config())
    first = model.schedule.events[0]
    with pytest.raises(RuntimeError, match=f"not called at step {first}, a growth event.*0-based step"):
        model.update_and_allocate(first + 1)  # a loop counting steps from 1 skips the event at `first`
